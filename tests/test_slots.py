"""The concurrency cap: each slot pool alone (threads, real processes, a real redis-server),
and the scheduler taking a slot before a test's tokens."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_ratebatch.engine.limiter import RateLimiter
from pytest_ratebatch.engine.scheduler import SlotTicket, TaskScheduler, Ticket
from pytest_ratebatch.limits.policy import ExecutionPolicy, RateLimit
from pytest_ratebatch.stores.base import Slot, SlotPool, StoreError
from pytest_ratebatch.stores.files import POLL_SECONDS as FILE_POLL_SECONDS
from pytest_ratebatch.stores.files import FileSlotPool
from pytest_ratebatch.stores.memory import MemoryBucketStore, MemoryLedger, MemorySlotPool
from pytest_ratebatch.stores.redis import LEASE_SECONDS, POLL_SECONDS, RedisSlotPool
from tests.fakes import FakeClock
from tests.redis_server import RedisServer, free_port

SECOND = 1_000_000_000
REPO_ROOT = Path(__file__).resolve().parent.parent


def eventually(condition: Callable[..., bool], *args: object, timeout: float = 10.0) -> None:
    """Wait (really) until ``condition(*args)`` holds: for another thread or process to get
    going."""
    deadline = time.monotonic() + timeout
    while not condition(*args):
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


class Waiter(threading.Thread):
    """A thread that asks ``pool`` for a slot and notes what it got, and when."""

    def __init__(self, pool: SlotPool, name: str, log: list[str], max_wait_ns: int | None = None):
        super().__init__(name=name, daemon=True)
        self.pool = pool
        self.log = log
        self.max_wait_ns = max_wait_ns
        self.slot: Slot | None = None
        self.got_at: float | None = None

    def run(self) -> None:
        self.slot = self.pool.acquire(self.max_wait_ns)
        self.got_at = time.monotonic()
        self.log.append(self.name if self.slot is not None else f"{self.name}: none")


# --- the pool of one process -------------------------------------------------------------


def test_memory_pool_caps_and_refuses_without_waiting() -> None:
    pool = MemorySlotPool(2)
    first, second = pool.acquire(), pool.acquire()
    assert first is not None
    assert second is not None
    assert {first.index, second.index} == {0, 1}
    assert pool.acquire(0) is None
    assert pool.in_use() == 2
    pool.release(first)
    pool.release(first)  # a second release of the same handle does nothing
    assert pool.in_use() == 1
    third = pool.acquire(0)
    assert third is not None
    assert pool.acquire(0) is None


@pytest.mark.parametrize("capacity", [0, -1, True, 1.5])
def test_pools_refuse_a_bad_capacity(capacity: object, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="capacity must be an integer >= 1"):
        MemorySlotPool(capacity)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="capacity must be an integer >= 1"):
        FileSlotPool(tmp_path, capacity)  # type: ignore[arg-type]


def test_memory_pool_serves_waiters_in_arrival_order() -> None:
    pool = MemorySlotPool(1)
    held = pool.acquire()
    assert held is not None
    log: list[str] = []
    waiters = []
    for count, name in enumerate(("first", "second", "third"), 1):
        waiter = Waiter(pool, name, log)
        waiter.start()
        eventually(lambda n: len(pool._waiters) == n, count)
        waiters.append(waiter)
    assert pool.acquire(0) is None  # a newcomer never overtakes the line
    pool.release(held)
    for waiter in waiters:
        waiter.join(timeout=10)
        assert waiter.slot is not None
        pool.release(waiter.slot)
    assert log == ["first", "second", "third"]
    assert pool.in_use() == 0


def test_memory_pool_gives_up_after_the_max_wait() -> None:
    pool = MemorySlotPool(1)
    held = pool.acquire()
    assert held is not None
    began = time.monotonic()
    assert pool.acquire(SECOND // 10) is None
    assert 0.09 <= time.monotonic() - began < 5
    assert not pool._waiters  # it left the line
    pool.release(held)
    assert pool.in_use() == 0


# --- the file pool: several pools on one directory are several processes -------------------


def tickets(directory: Path) -> int:
    """How many tickets the line of the file pool in ``directory`` has given out."""
    try:
        data = (directory / "slots.queue").read_bytes()
    except FileNotFoundError:
        return 0
    return struct.unpack("<qq", data)[0] if len(data) == 16 else 0


def file_pools(directory: Path, capacity: int, count: int) -> list[FileSlotPool]:
    return [FileSlotPool(directory, capacity) for _ in range(count)]


def test_file_pools_share_the_cap(tmp_path: Path) -> None:
    ours, theirs = file_pools(tmp_path, 2, 2)
    first, second = ours.acquire(0), theirs.acquire(0)
    assert first is not None
    assert second is not None
    assert ours.acquire(0) is None
    assert theirs.acquire(0) is None
    assert ours.in_use() == 2
    theirs.release(second)
    assert ours.in_use() == 1
    again = ours.acquire(0)
    assert again is not None
    for pool in (ours, theirs):
        pool.close()  # closing gives back what a pool still holds
    assert FileSlotPool(tmp_path, 2).in_use() == 0


class BellWatch:
    """The real clock, for the head of a line with a deadline: it reads the clock once its bell
    is bound and its last scan found no slot, just before it waits on the bell. ``waiting`` is
    set from then on: a slot released later reaches it only by the bell (or a rescan)."""

    def __init__(self, directory: Path) -> None:
        self._bell = directory / "slots.bell"
        self.waiting = threading.Event()

    def now_ns(self) -> int:
        if self._bell.exists():
            self.waiting.set()
        return time.monotonic_ns()

    sleep = staticmethod(time.sleep)


def test_file_pools_serve_the_longest_waiter_first(tmp_path: Path) -> None:
    # The waiters rescan once an hour and the head gives up after a minute: within the test's
    # 10 s, only the bell a release rings can wake the head.
    watch = BellWatch(tmp_path)
    holder = FileSlotPool(tmp_path, 1)
    head_pool = FileSlotPool(tmp_path, 1, clock=watch, rescan_seconds=3600)
    behind_pool = FileSlotPool(tmp_path, 1, rescan_seconds=3600)
    held = holder.acquire()
    assert held is not None
    log: list[str] = []
    first = Waiter(head_pool, "waiter 0", log, max_wait_ns=60 * SECOND)
    first.start()
    assert watch.waiting.wait(timeout=10)  # its bell bound, past its last scan
    second = Waiter(behind_pool, "waiter 1", log)
    second.start()
    eventually(lambda: tickets(tmp_path) == 3)  # the holder took the first ticket
    time.sleep(0.05)  # the second waiter is blocked behind the first, not in a race with it
    assert FileSlotPool(tmp_path, 1).acquire(0) is None  # a newcomer does not jump the line
    released = time.monotonic()
    holder.release(held)
    first.join(timeout=10)
    assert first.slot is not None, "the release did not wake the head of the line"
    assert first.got_at is not None
    assert first.got_at - released < 10
    assert second.slot is None
    head_pool.release(first.slot)
    second.join(timeout=10)
    assert log == ["waiter 0", "waiter 1"]
    # Only the newest tickets' files remain: the head removes those of the waiters before it.
    assert len(list(tmp_path.glob("slots.wait-*"))) <= 2


def test_file_pool_waiters_give_up_in_line_and_at_its_head(tmp_path: Path) -> None:
    holder, head, behind = file_pools(tmp_path, 1, 3)
    held = holder.acquire()
    assert held is not None
    log: list[str] = []
    first = Waiter(head, "head", log, max_wait_ns=SECOND // 5)
    second = Waiter(behind, "behind", log, max_wait_ns=SECOND // 10)
    began = time.monotonic()
    first.start()
    eventually(lambda: tickets(tmp_path) == 2)
    second.start()
    second.join(timeout=10)  # gives up while the head still waits
    first.join(timeout=10)
    assert sorted(log) == ["behind: none", "head: none"]
    assert time.monotonic() - began < 5
    holder.release(held)
    # Both left the line: the next waiter is served at once.
    assert FileSlotPool(tmp_path, 1).acquire(SECOND) is not None


def test_file_pool_polls_where_no_bell_can_be_bound(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)  # longer than a Unix socket address allows
    deep.mkdir()
    holder, waiter_pool = file_pools(deep, 1, 2)
    held = holder.acquire()
    assert held is not None
    log: list[str] = []
    waiter = Waiter(waiter_pool, "waiter", log)
    waiter.start()
    eventually(lambda: tickets(deep) == 2)
    time.sleep(0.05)
    holder.release(held)
    waiter.join(timeout=10)
    assert log == ["waiter"]


def test_file_pool_deadline_on_a_fake_clock(tmp_path: Path, clock: FakeClock) -> None:
    # Without a bell the head polls on the pool's clock: on a fake one, exactly until the
    # deadline, in steps of POLL_SECONDS, then gives up.
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    holder_pool = FileSlotPool(deep, 1)
    held = holder_pool.acquire()
    assert held is not None
    pool = FileSlotPool(deep, 1, clock=clock)
    began = clock.now
    assert pool.acquire(SECOND // 10) is None
    assert clock.now - began == SECOND // 10
    assert len(clock.sleeps) == round(0.1 / FILE_POLL_SECONDS)
    assert max(clock.sleeps) <= FILE_POLL_SECONDS
    holder_pool.release(held)
    assert pool.acquire(SECOND // 10) is not None
    assert clock.now - began == SECOND // 10  # no wait for a free slot


# Real processes: each holds a slot of a file pool, or waits in line for one.
HOLDER = """
import os, sys, time
from pathlib import Path
from pytest_ratebatch.stores.files import FileSlotPool

directory, capacity, rounds, hold, timeline = sys.argv[1:]
pool = FileSlotPool(Path(directory), int(capacity))
for _ in range(int(rounds)):
    slot = pool.acquire()
    with open(timeline, "a") as out:
        out.write(f"start {time.monotonic_ns()}\\n")
    print("held", flush=True)
    time.sleep(float(hold))
    with open(timeline, "a") as out:
        out.write(f"end {time.monotonic_ns()}\\n")
    pool.release(slot)
"""


def holder(directory: Path, capacity: int, rounds: int, hold: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory), str(capacity), str(rounds), str(hold),
         str(directory / "timeline")],
        stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )  # fmt: skip


def most_in_flight(timeline: Path) -> int:
    events = []
    for line in timeline.read_text().splitlines():
        kind, stamp = line.split()
        events.append((int(stamp), 0 if kind == "end" else 1))  # an end first at a tie
    in_flight = most = 0
    for _, starts in sorted(events):
        in_flight += 1 if starts else -1
        most = max(most, in_flight)
    return most


def test_processes_never_hold_more_than_the_cap(tmp_path: Path) -> None:
    processes = [holder(tmp_path, 2, 5, 0.03) for _ in range(4)]
    for process in processes:
        process.communicate(timeout=60)
        assert process.returncode == 0
    assert most_in_flight(tmp_path / "timeline") == 2
    assert (tmp_path / "timeline").read_text().count("start") == 20


def test_a_dead_holder_gives_its_slot_back(tmp_path: Path) -> None:
    process = holder(tmp_path, 1, 1, 600)
    assert process.stdout is not None
    assert process.stdout.readline() == "held\n"
    pool = FileSlotPool(tmp_path, 1)
    assert pool.acquire(0) is None
    log: list[str] = []
    waiter = Waiter(pool, "waiter", log, max_wait_ns=30 * SECOND)
    waiter.start()
    eventually(lambda: tickets(tmp_path) == 3)
    killed = time.monotonic()
    process.send_signal(signal.SIGKILL)  # no release, no bell: the kernel drops its lock
    process.wait(timeout=10)
    waiter.join(timeout=30)
    assert log == ["waiter"]
    assert waiter.got_at is not None
    assert waiter.got_at - killed < 5  # found by the head's rescan (every 0.1 s)


def test_a_waiter_that_dies_in_line_does_not_block_it(tmp_path: Path) -> None:
    pool = FileSlotPool(tmp_path, 1)
    held = pool.acquire()
    assert held is not None
    dead = holder(tmp_path, 1, 1, 600)  # waits in line behind the slot held here
    eventually(lambda: tickets(tmp_path) == 2)
    log: list[str] = []
    waiter = Waiter(FileSlotPool(tmp_path, 1), "waiter", log)
    waiter.start()
    eventually(lambda: tickets(tmp_path) == 3)
    dead.send_signal(signal.SIGKILL)
    dead.wait(timeout=10)
    pool.release(held)
    waiter.join(timeout=10)
    assert log == ["waiter"]


# A process that waits in line for a slot until it is interrupted.
WAITS = """
import sys
from pathlib import Path

kind, where, key = sys.argv[1:]
if kind == "file":
    from pytest_ratebatch.stores.files import FileSlotPool
    pool = FileSlotPool(Path(where), 1)
else:
    from pytest_ratebatch.stores.redis import RedisSlotPool
    pool = RedisSlotPool(where, key, 1)
print("waiting", flush=True)
pool.acquire()
print("got a slot", flush=True)
"""


def waits(kind: str, where: str, key: str = "") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WAITS, kind, where, key],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )  # fmt: skip


def interrupt(process: subprocess.Popen[str]) -> None:
    """Ctrl-C: the wait ends at once, with Python's KeyboardInterrupt."""
    interrupted = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, errors = process.communicate(timeout=30)
    assert time.monotonic() - interrupted < 5
    assert "KeyboardInterrupt" in errors


def test_ctrl_c_ends_a_wait_in_a_file_pool_and_leaves_the_line(tmp_path: Path) -> None:
    pool = FileSlotPool(tmp_path, 1)
    held = pool.acquire()
    assert held is not None
    head = waits("file", str(tmp_path))  # waits for the bell
    eventually(lambda: tickets(tmp_path) == 2)
    behind = waits("file", str(tmp_path))  # blocks on the head's lock
    eventually(lambda: tickets(tmp_path) == 3)
    time.sleep(0.1)
    for process in (behind, head):
        interrupt(process)
    pool.release(held)
    assert FileSlotPool(tmp_path, 1).acquire(5 * SECOND) is not None


# --- the Redis pool --------------------------------------------------------------------


@pytest.fixture
def redis_key(request: pytest.FixtureRequest) -> str:
    return f"slots-{os.getpid()}-{request.node.name}".replace("[", "-").replace("]", "")


@pytest.fixture
def redis_pools(redis_server: RedisServer, redis_key: str) -> Iterator[list[RedisSlotPool]]:
    """Pools of separate sessions on one key; their polls are slow, so that a quick hand-over
    shows a wake-up."""
    pools: list[RedisSlotPool] = []
    yield pools
    for pool in pools:
        pool.close()


def redis_pool(
    pools: list[RedisSlotPool],
    server: RedisServer,
    key: str,
    capacity: int,
    lease_seconds: float = LEASE_SECONDS,
    poll_seconds: float = POLL_SECONDS,
) -> RedisSlotPool:
    pool = RedisSlotPool(
        server.url, key, capacity, lease_seconds=lease_seconds, poll_seconds=poll_seconds
    )
    pools.append(pool)
    return pool


def test_redis_pools_share_the_cap_and_hand_over_at_once(
    redis_server: RedisServer, redis_key: str, redis_pools: list[RedisSlotPool]
) -> None:
    ours, theirs = (
        redis_pool(redis_pools, redis_server, redis_key, 2, poll_seconds=5) for _ in range(2)
    )
    first, second = ours.acquire(0), theirs.acquire(0)
    assert first is not None
    assert second is not None
    assert first.token != second.token
    assert ours.acquire(0) is None
    assert theirs.in_use() == 2
    log: list[str] = []
    waiters = []
    client = redis_server.client()
    for index in range(2):
        waiter = Waiter(redis_pool(redis_pools, redis_server, redis_key, 2), f"w{index}", log)
        waiter.start()
        eventually(lambda n: client.zcard(ours.keys[1]) == n, index + 1)
        waiters.append(waiter)
    assert theirs.acquire(0) is None  # a newcomer does not jump the line
    released = time.monotonic()
    theirs.release(second)
    waiters[0].join(timeout=10)
    assert waiters[0].got_at is not None
    assert waiters[0].got_at - released < 2  # woken by the release, not by a 5 s poll
    assert log == ["w0"]
    ours.release(first)
    waiters[1].join(timeout=10)
    assert log == ["w0", "w1"]
    assert client.zcard(ours.keys[1]) == 0  # nobody left in line


def test_redis_leases_are_renewed_while_held_and_expire_without_a_holder(
    redis_server: RedisServer, redis_key: str, redis_pools: list[RedisSlotPool]
) -> None:
    ours = redis_pool(redis_pools, redis_server, redis_key, 1, lease_seconds=0.3)
    theirs = redis_pool(redis_pools, redis_server, redis_key, 1, poll_seconds=0.05)
    held = ours.acquire()
    assert held is not None
    time.sleep(1.0)  # three leases long: renewed meanwhile
    assert theirs.acquire(0) is None
    assert ours.lost == 0
    # The holder vanishes (its renewals stop, it never releases): the lease runs out.
    ours._closing.set()
    assert ours._renewer is not None
    ours._renewer.join(timeout=5)
    began = time.monotonic()
    got = theirs.acquire(10 * SECOND)
    assert got is not None
    assert 0.05 < time.monotonic() - began < 5


HOLDS_A_LEASE = """
import sys, time
from pytest_ratebatch.stores.redis import LEASE_SECONDS, POLL_SECONDS, RedisSlotPool

pool = RedisSlotPool(sys.argv[1], sys.argv[2], 1, lease_seconds=float(sys.argv[3]))
slot = pool.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_killed_session_gives_its_slot_back_when_the_lease_expires(
    redis_server: RedisServer, redis_key: str, redis_pools: list[RedisSlotPool]
) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDS_A_LEASE, redis_server.url, redis_key, "0.6"],
        stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    assert process.stdout is not None
    assert process.stdout.readline() == "held\n"
    pool = redis_pool(redis_pools, redis_server, redis_key, 1, poll_seconds=0.05)
    assert pool.acquire(0) is None
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    began = time.monotonic()
    assert pool.acquire(10 * SECOND) is not None
    # Not before the lease (renewed at most 0.2 s before the kill) ran out; soon after it.
    assert 0.2 < time.monotonic() - began < 5


def test_a_silent_redis_waiter_leaves_the_line(
    redis_server: RedisServer, redis_key: str, redis_pools: list[RedisSlotPool]
) -> None:
    client = redis_server.client()
    holder_pool = redis_pool(redis_pools, redis_server, redis_key, 1)
    held = holder_pool.acquire()
    assert held is not None
    silent = redis_pool(redis_pools, redis_server, redis_key, 1, poll_seconds=0.05)
    # A waiter of a session killed while it waited: in line, never asking again.
    assert silent._call(silent._acquire, "gone", silent._lease_us, silent._alive_us, 1)[0] == 0
    log: list[str] = []
    waiter = Waiter(redis_pool(redis_pools, redis_server, redis_key, 1), "waiter", log)
    waiter.start()
    eventually(lambda: client.zcard(silent.keys[1]) == 2)
    holder_pool.release(held)
    waiter.join(timeout=10)  # served once the silent one dropped out (8 polls of 0.05 s)
    assert log == ["waiter"]


def test_a_redis_waiter_gives_up_after_the_max_wait(
    redis_server: RedisServer, redis_key: str, redis_pools: list[RedisSlotPool]
) -> None:
    pool = redis_pool(redis_pools, redis_server, redis_key, 1)
    held = pool.acquire()
    assert held is not None
    began = time.monotonic()
    assert pool.acquire(SECOND // 5) is None
    assert 0.15 < time.monotonic() - began < 5
    assert redis_server.client().zcard(pool.keys[1]) == 0  # it left the line
    pool.release(held)
    assert pool.in_use() == 0


def test_ctrl_c_ends_a_wait_in_a_redis_pool_and_leaves_the_line(
    redis_server: RedisServer, redis_key: str, redis_pools: list[RedisSlotPool]
) -> None:
    pool = redis_pool(redis_pools, redis_server, redis_key, 1)
    held = pool.acquire()
    assert held is not None
    waiter = waits("redis", redis_server.url, redis_key)
    client = redis_server.client()
    eventually(lambda: client.zcard(pool.keys[1]) == 1)
    interrupt(waiter)
    assert client.zcard(pool.keys[1]) == 0  # it left the line on its way out
    assert pool.in_use() == 1


def test_an_unreachable_redis_pool_is_a_store_error() -> None:
    pool = RedisSlotPool(f"redis://127.0.0.1:{free_port()}/0", "x", 1)
    with pytest.raises(StoreError, match=r"redis redis://127\.0\.0\.1"):
        pool.acquire()
    with pytest.raises(StoreError, match="bad Redis URL"):
        RedisSlotPool("redis://127.0.0.1:notaport/0", "x", 1)
    pool.release(Slot(-1, "never-held"))  # never raises: a lease expires by itself
    pool.close()


# --- the scheduler: a slot first, then the tokens --------------------------------------------


class FakePool:
    """A pool that notes what the scheduler does and, on the fake clock, takes ``wait`` s."""

    capacity = 1

    def __init__(
        self, clock: FakeClock, events: list[str], wait: float = 0.0, grant: bool = True
    ) -> None:
        self.clock = clock
        self.events = events
        self.wait = wait
        self.grant = grant
        self.max_waits: list[int | None] = []
        self.on_acquire: Callable[[], None] | None = None

    def acquire(self, max_wait_ns: int | None = None) -> Slot | None:
        self.events.append("slot")
        self.max_waits.append(max_wait_ns)
        if self.on_acquire is not None:
            self.on_acquire()
        if not self.grant:
            self.clock.advance((max_wait_ns or 0) / SECOND)
            return None
        self.clock.advance(self.wait)
        return Slot(0)

    def release(self, slot: Slot) -> None:
        self.events.append("release")

    def describe(self) -> str:
        return "fake"

    def close(self) -> None:
        pass


class NotingStore(MemoryBucketStore):
    def __init__(self, clock: FakeClock, events: list[str]) -> None:
        super().__init__(clock)
        self.events = events

    def take(
        self, cost: int, interval_ns: int, burst: int, max_wait_ns: int | None, admit: bool
    ) -> tuple[int, int, int]:
        self.events.append("tokens" if admit else "batch tokens")
        return super().take(cost, interval_ns, burst, max_wait_ns, admit)

    def commit(
        self, cost: int, interval_ns: int, burst: int, slot_ns: int | None = None
    ) -> tuple[int, int, int]:
        self.events.append("tokens")
        return super().commit(cost, interval_ns, burst, slot_ns)


def capped(clock: FakeClock, events: list[str], pool: FakePool, **policy: object) -> TaskScheduler:
    rate = RateLimit(60, 2)
    return TaskScheduler(
        ExecutionPolicy(rate_limit=rate, max_concurrency=1, **policy),  # type: ignore[arg-type]
        limiter=RateLimiter(rate, NotingStore(clock, events), clock=clock),
        clock=clock,
        slots=pool,
    )


def test_an_unbatched_test_takes_its_slot_then_its_tokens(clock: FakeClock) -> None:
    events: list[str] = []
    pool = FakePool(clock, events, wait=2.0)
    scheduler = capped(clock, events, pool)
    ticket = scheduler.admit()
    assert isinstance(ticket, SlotTicket)
    assert not ticket.cancelled
    assert ticket.slot is not None
    assert (ticket.slot_wait_ns, ticket.waited_ns) == (2 * SECOND, 2 * SECOND)
    assert scheduler.waited_by_limit == {"concurrency": 2.0}
    assert pool.max_waits == [None]  # no total timeout: no bound
    scheduler.finish(ticket, failed=False)
    assert ticket.slot is None
    scheduler.finish(ticket, failed=False)  # a second finish gives nothing back twice
    assert events == ["slot", "tokens", "release"]


def test_an_exempt_test_takes_no_slot(clock: FakeClock) -> None:
    events: list[str] = []
    scheduler = capped(clock, events, FakePool(clock, events))
    ticket = scheduler.admit(cost=0)
    assert type(ticket) is Ticket
    scheduler.finish(ticket, failed=False)
    assert events == []


def test_a_batched_test_takes_its_slot_once_its_batch_is_released(clock: FakeClock) -> None:
    events: list[str] = []
    pool = FakePool(clock, events)
    scheduler = capped(clock, events, pool, batch_size=2)
    released: list[bool] = []
    pool.on_acquire = lambda: released.append(scheduler.ledger.snapshot().released)
    tickets = [scheduler.admit() for _ in range(2)]
    assert released == [True, True]  # never while the batch still opens
    # The opener reserves the batch's tokens, then each member: slot, then its own tokens.
    assert events == ["batch tokens", "slot", "tokens", "slot", "tokens"]
    for ticket in tickets:
        scheduler.finish(ticket, failed=False)
    assert events.count("release") == 2


def test_a_stop_while_waiting_for_a_slot_cancels_and_gives_it_back(clock: FakeClock) -> None:
    events: list[str] = []
    pool = FakePool(clock, events)
    for policy in ({}, {"batch_size": 2}):
        events.clear()
        ledger = MemoryLedger()
        scheduler = TaskScheduler(
            ExecutionPolicy(max_concurrency=1, max_failures=1, **policy),  # type: ignore[arg-type]
            ledger=ledger,
            clock=clock,
            slots=pool,
        )
        pool.on_acquire = lambda ledger=ledger: ledger.finish(0, True, clock.now)  # a failure
        ticket = scheduler.admit()
        assert ticket.cancelled == "max failures (1) reached"
        assert ticket.slot is None
        assert events == ["slot", "release"]


def test_a_slot_wait_ends_at_the_total_timeout(clock: FakeClock) -> None:
    events: list[str] = []
    pool = FakePool(clock, events, grant=False)
    scheduler = capped(clock, events, pool, total_timeout=5.0)
    clock.advance(1)
    ticket = scheduler.admit()
    assert pool.max_waits == [4 * SECOND]  # what is left of the total timeout
    assert ticket.cancelled == "total timeout (5s) passed"
    assert ticket.slot_wait_ns == 4 * SECOND
    assert scheduler.stop_reason == "total timeout (5s) passed"
    assert events == ["slot"]  # no tokens taken for a test that does not start
    assert scheduler.admit().cancelled == "total timeout (5s) passed"
    assert events == ["slot"]  # later tests do not wait at all


def test_an_error_while_taking_tokens_gives_the_slot_back(clock: FakeClock) -> None:
    events: list[str] = []
    pool = FakePool(clock, events)
    scheduler = capped(clock, events, pool)

    def broken(*args: object) -> tuple[int, int, int]:
        raise KeyboardInterrupt

    assert scheduler.limiter is not None
    scheduler.limiter.store.take = broken  # type: ignore[method-assign, assignment]
    with pytest.raises(KeyboardInterrupt):
        scheduler.admit()
    assert events == ["slot", "release"]


def test_a_cap_alone_uses_a_pool_of_this_process() -> None:
    scheduler = TaskScheduler(ExecutionPolicy(max_concurrency=2))
    assert isinstance(scheduler.slots, MemorySlotPool)
    assert scheduler.slots.capacity == 2
    assert TaskScheduler(ExecutionPolicy(batch_size=2)).slots is None
    tickets = [scheduler.admit() for _ in range(2)]
    assert scheduler.slots.in_use() == 2
    for ticket in tickets:
        scheduler.finish(ticket, failed=False)
    assert scheduler.slots.in_use() == 0


def test_threads_sharing_a_scheduler_keep_the_cap() -> None:
    scheduler = TaskScheduler(ExecutionPolicy(max_concurrency=2))
    lock = threading.Lock()
    in_flight = [0, 0]  # now, most

    def run_tests() -> None:
        for _ in range(10):
            ticket = scheduler.admit()
            with lock:
                in_flight[0] += 1
                in_flight[1] = max(in_flight[1], in_flight[0])
            time.sleep(0.002)
            with lock:
                in_flight[0] -= 1
            scheduler.finish(ticket, failed=False)

    threads = [threading.Thread(target=run_tests) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert in_flight == [0, 2]
