"""The options' bounds, held by every store: values at the edges work, past them are refused.

Each store keeps time in integers (nanoseconds in memory and files, microseconds held in Lua
doubles in Redis); what the bounds allow must stay exact in each, sleep where the OS can,
and cost memory and files in proportion to what is used, not to the number written.
"""

from __future__ import annotations

import os
import random
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_ratebatch.engine.limiter import UNLIMITED, RateLimiter
from pytest_ratebatch.limits import gcra, windows
from pytest_ratebatch.limits.bucket import MAX_REFILL_NS, BucketState, throttle
from pytest_ratebatch.limits.policy import (
    MAX_COUNT,
    MAX_RATE_PER_MINUTE,
    MAX_SECONDS,
    MIN_RATE_PER_MINUTE,
    RateLimit,
    WindowLimit,
    parse_cost,
)
from pytest_ratebatch.stores.base import BucketStore
from pytest_ratebatch.stores.files import FileBucketStore, FileSlotPool
from pytest_ratebatch.stores.memory import MemoryBucketStore, MemorySlotPool
from pytest_ratebatch.stores.redis import LOG_SLACK, RedisBucketStore, RedisSlotPool
from tests.fakes import FakeClock
from tests.redis_server import RedisServer

pytest_plugins = ["pytester"]

SECOND = 1_000_000_000
YEAR = int(MAX_SECONDS) * SECOND
#: The slowest interval, and the largest burst it refills within 365 days.
SLOWEST = RateLimit(MIN_RATE_PER_MINUTE, 525)
#: The fastest rate, with the largest burst.
FASTEST = RateLimit(MAX_RATE_PER_MINUTE, MAX_COUNT)


@pytest.fixture(params=["memory", "file", "redis"])
def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> Iterator[BucketStore]:
    if request.param == "memory":
        yield MemoryBucketStore(clock)
    elif request.param == "file":
        files = FileBucketStore(tmp_path, clock)
        yield files
        files.close()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        redis = RedisBucketStore(server.url, f"bounds-{os.getpid()}-{request.node.name}")
        yield redis
        redis.close()


def moved(store: BucketStore, clock: FakeClock, started: float) -> int:
    """How far the store's clock may have moved since ``started`` (Redis reads the server's
    real clock; the others, the fake one), plus a microsecond of Redis's rounding."""
    if isinstance(store, RedisBucketStore):
        return int((time.monotonic() - started) * SECOND) + 2000
    return 0


def test_the_slowest_rate_with_its_largest_burst(store: BucketStore, clock: FakeClock) -> None:
    interval, burst = SLOWEST.interval_ns, SLOWEST.burst
    assert interval == 60_000 * SECOND
    started = time.monotonic()
    status, _, _ = store.take(burst, interval, burst, None, True)
    assert status == gcra.ADMITTED
    status, _, wait = store.take(1, interval, burst, None, True)
    assert status == gcra.RESERVED
    assert interval - moved(store, clock, started) <= wait <= interval
    # The whole burst again, behind that one: the refill and one more interval.
    status, _, wait = store.take(burst, interval, burst, None, True)
    assert status == gcra.RESERVED
    expected = (burst + 1) * interval
    assert expected - moved(store, clock, started) <= wait <= expected < 2 * YEAR


def test_the_longest_throttle_with_the_slowest_rate(store: BucketStore, clock: FakeClock) -> None:
    interval, burst = SLOWEST.interval_ns, SLOWEST.burst
    started = time.monotonic()
    store.take(1, interval, burst, None, True)
    at, before, after, until = store.throttle(YEAR, interval, burst, True)
    assert until - at == YEAR
    assert before == interval
    assert interval <= after <= MAX_REFILL_NS // burst  # not doubled past a year's refill
    # Redis keeps the adapted interval in whole microseconds: up to one less per token.
    grain = 1000 * burst if isinstance(store, RedisBucketStore) else 0
    status, now, wait = store.take(1, interval, burst, None, True)
    assert status == gcra.RESERVED
    assert until - now - moved(store, clock, started) <= wait <= until - now + grain
    # The bucket is empty at the pause's end: the whole burst takes a year's refill more.
    status, now, wait = store.take(burst, interval, burst, None, True)
    assert status == gcra.RESERVED
    expected = until + burst * after - now
    assert expected - moved(store, clock, started) - grain <= wait <= expected + grain
    assert wait < 3 * YEAR


def test_the_fastest_rate_with_the_largest_burst(store: BucketStore, clock: FakeClock) -> None:
    interval, burst = FASTEST.interval_ns, FASTEST.burst
    assert interval == 1000  # one per microsecond: Redis's grain
    status, _, _ = store.take(burst, interval, burst, None, True)
    assert status == gcra.ADMITTED
    status, _, wait = store.take(1, interval, burst, None, True)
    assert (status, wait) == (gcra.RESERVED, interval) or isinstance(store, RedisBucketStore)
    assert 0 <= wait <= interval


def test_the_largest_window_at_its_longest(store: BucketStore, clock: FakeClock) -> None:
    # Starts that fill the whole window: a million entries. In memory and files one start
    # of that cost; in Redis ten of 100,000 (a script pushes them in chunks, unpack() taking
    # a few thousand values at most; one script of a million blocks the server for about
    # half a second, which a loaded machine stretches past the 2 s socket timeout).
    limits = ((MAX_COUNT, YEAR),)
    starts = 10 if isinstance(store, RedisBucketStore) else 1
    started = time.monotonic()
    for _ in range(starts):
        status, _, _, _ = store.take_windowed(MAX_COUNT // starts, 0, 2**31, None, True, limits)
        assert status == gcra.ADMITTED
    status, _, wait, bound = store.take_windowed(1, 0, 2**31, None, True, limits)
    assert (status, bound) == (gcra.RESERVED, 1)
    assert YEAR - moved(store, clock, started) <= wait <= YEAR


@pytest.mark.parametrize("windowed", [False, True])
def test_a_pause_without_a_rate_holds_in_every_store(
    store: BucketStore, clock: FakeClock, windowed: bool
) -> None:
    # No rate (only window limits, or throttles to handle): interval 0, a burst of 2**31.
    interval, burst = UNLIMITED.interval_ns, UNLIMITED.burst
    limits = ((1000, SECOND),)

    def take() -> tuple[int, int, int]:
        if windowed:
            status, now, wait, _ = store.take_windowed(1, interval, burst, None, True, limits)
            return status, now, wait
        return store.take(1, interval, burst, None, True)

    started = time.monotonic()
    assert take()[0] == gcra.ADMITTED
    _, _, _, until = store.throttle(5 * SECOND, interval, burst, False)
    status, now, wait = take()
    assert status == gcra.RESERVED
    assert until - now - moved(store, clock, started) <= wait <= until - now


def test_a_start_costing_more_than_a_script_can_unpack(redis_server: RedisServer) -> None:
    store = RedisBucketStore(redis_server.url, f"bounds-{os.getpid()}-unpack")
    limits = ((10_000, 60 * SECOND),)
    assert store.take_windowed(9000, 0, 2**31, None, True, limits)[0] == gcra.ADMITTED
    status, _, wait, bound = store.take_windowed(1001, 0, 2**31, None, True, limits)
    assert (status, bound) == (gcra.RESERVED, 1)
    assert 59 * SECOND < wait <= 60 * SECOND
    client = redis_server.client()
    name = f"{store.key}:window:10000/60000000us"
    assert client.llen(f"{name}:admitted") == 9000
    assert client.llen(f"{name}:reserved") == 10_001  # within LOG_SLACK of N: kept
    assert store.take_windowed(LOG_SLACK, 0, 2**31, None, True, limits)[0] == gcra.RESERVED
    assert client.llen(f"{name}:reserved") == 10_000  # past it: trimmed to N
    store.close()


def test_however_slow_the_server_seemed_a_burst_refills_within_365_days() -> None:
    # A second throttle a day after the first, one start accepted in between: the server
    # seemed to sustain one a day. A million of those would put the bucket's times 2700
    # years ahead, past what the stores keep (64-bit nanoseconds, 2**53 microseconds).
    state = BucketState(count=5)
    burst = MAX_COUNT
    throttle(state, 0, wait_ns=SECOND, configured=1000, burst=burst, adapt=True)
    state.count += 2
    day = 86_400 * SECOND
    _, after, until = throttle(state, day, SECOND, configured=1000, burst=burst, adapt=True)
    assert after == MAX_REFILL_NS // burst
    assert state.reserved - until <= MAX_REFILL_NS
    assert state.reserved < 2**63


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_a_store_keeps_a_slow_servers_rate_in_64_bits(
    kind: str, tmp_path: Path, clock: FakeClock
) -> None:
    store = MemoryBucketStore(clock) if kind == "memory" else FileBucketStore(tmp_path, clock)
    limiter = RateLimiter(FASTEST, store, clock)
    limiter.acquire()
    limiter.throttle(1.0, adapt=True)
    limiter.acquire()
    limiter.acquire()
    clock.advance(3 * 86_400)
    _, _, after, _ = limiter.throttle(1.0, adapt=True)  # a file store packs 64-bit integers
    assert after == MAX_REFILL_NS // FASTEST.burst
    assert limiter.admit(1, timeout=0) is None


# --- state that grows with use, not with the number written ------------------------------


class FullRing:
    """The ring as it was: ``count`` entries allocated at once (the model ``Ring`` keeps)."""

    def __init__(self, count: int) -> None:
        self.entries = [windows.EMPTY] * count
        self.head = 0

    def oldest(self, rank: int) -> int:
        return self.entries[(self.head + rank - 1) % len(self.entries)]

    def newest(self) -> int:
        return self.entries[self.head - 1]

    def push(self, at: int, cost: int) -> None:
        for _ in range(min(cost, len(self.entries))):
            self.entries[self.head] = at
            self.head = (self.head + 1) % len(self.entries)


@pytest.mark.parametrize("seed", range(20))
def test_a_growing_ring_answers_as_a_full_one(seed: int) -> None:
    rng = random.Random(seed)
    count = rng.randint(1, 12)
    ring, model = windows.Ring(count), FullRing(count)
    at = 0
    for _ in range(60):
        at += rng.randint(0, 3)
        cost = rng.randint(1, count + 2)
        ring.push(at, cost)
        model.push(at, cost)
        assert ring.newest() == model.newest()
        assert [ring.oldest(rank) for rank in range(1, count + 1)] == [
            model.oldest(rank) for rank in range(1, count + 1)
        ]
        assert len(ring.entries) <= count


def test_a_window_holds_the_starts_it_saw_not_its_n(clock: FakeClock) -> None:
    day = 86_400 * SECOND
    store = MemoryBucketStore(clock)
    limiter = RateLimiter(
        UNLIMITED, store, clock, windows=(WindowLimit(10**12, day),), window_margin_ns=0
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(3):
        limiter.acquire()
        clock.advance(1)
    (log,) = store._logs(limiter._windows)
    assert len(log.reserved.entries) == len(log.admitted.entries) == 3
    assert log.free(clock.now) == 10**12 - 3
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 10_000  # KiB


def test_a_large_cap_costs_nothing(tmp_path: Path) -> None:
    memory = MemorySlotPool(10**12)
    first, second, third = (memory.acquire() for _ in range(3))
    assert first is not None
    assert second is not None
    assert third is not None
    assert [first.index, second.index, third.index] == [0, 1, 2]
    assert memory.in_use() == 3
    memory.release(second)
    again = memory.acquire()
    assert again is not None
    assert again.index == 1  # the slot given back first
    assert memory.in_use() == 3
    files = FileSlotPool(tmp_path, 10**12)
    held = [files.acquire(), files.acquire()]
    assert sorted(path.name for path in tmp_path.glob("slot-*")) == ["slot-0", "slot-1"]
    assert files.in_use() == 2
    slot = held[0]
    assert slot is not None
    files.release(slot)
    assert files.in_use() == 1
    assert files.acquire() is not None
    assert len(list(tmp_path.glob("slot-*"))) == 2  # slot 0 again: no new file
    files.close()


def test_a_redis_pool_at_the_largest_cap(redis_server: RedisServer) -> None:
    pool = RedisSlotPool(redis_server.url, f"bounds-{os.getpid()}-cap", MAX_COUNT)
    slots = [pool.acquire(0) for _ in range(3)]
    assert all(slot is not None for slot in slots)
    assert pool.in_use() == 3
    for slot in slots:
        assert slot is not None
        pool.release(slot)
    assert pool.in_use() == 0
    pool.close()


# --- whole sessions at and past the bounds ------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate-per-minute", "1e-300"], "--rate-per-minute='1e-300' (command line): must be*"),
        (["--rate-per-minute", "1e-9"], "--rate-per-minute='1e-9' (command line): must be from*"),
        (["--max-concurrency", "9" * 20], "--max-concurrency='99*' (command line): must be a *"),
        (["--rate-limit", "1000000000000/s"], "*the number of starts must be from 1 to 1000000"),
        (["--rate-limit", "9" * 23 + "/s"], "*the number of starts must be from 1 to 1000000"),
        (["--rate-limit", "100000000/day"], "*the number of starts must be from 1 to 1000000"),
        (["--total-timeout", "1e400s"], "--total-timeout='1e400s' (command line): not a dur*"),
        (["--ratebatch-report", "~no-such-user-here/r.json"], "--ratebatch-report=*home*"),
    ],
)
def test_values_past_the_bounds_end_the_run_before_any_test(
    pytester: pytest.Pytester, args: list[str], message: str
) -> None:
    pytester.makepyfile(test_never="def test_never(): raise AssertionError('ran')")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: ratebatch: {message}"])
    output = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in output
    assert "INTERNALERROR" not in output


@pytest.mark.parametrize(
    "args",
    [
        ["--rate-per-minute=0.001", "--burst=525", "--total-timeout=365d"],
        ["--rate-per-minute=60000000", "--burst=1000000", "--batch-size=1000000"],
        ["--rate-limit=1000000/365d", "--max-concurrency=1000000", "--max-failures=1000000"],
        ["--throttle-retries=1000000", "--throttle-max-wait=365d", "--throttle-adapt=off"],
    ],
)
def test_values_at_the_bounds_run(pytester: pytest.Pytester, args: list[str]) -> None:
    pytester.makepyfile("def test_one(): pass\ndef test_two(): pass\ndef test_three(): pass\n")
    # A slow policy: the first test starts at once, the others would wait past the timeout.
    timeout = [] if any("total-timeout" in arg for arg in args) else ["--total-timeout=30s"]
    result = pytester.runpytest(*args, *timeout, "--ratebatch-report=r.json")
    output = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in output
    assert "INTERNALERROR" not in output
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) + outcomes.get("skipped", 0) == 3
    assert outcomes.get("passed", 0) >= 1


def test_a_large_cap_under_xdist_opens_a_file_per_test_in_flight(
    pytester: pytest.Pytester,
) -> None:
    # Each worker used to open a file for every slot of the cap, past any descriptor limit.
    pytester.makeconftest(
        """
        import resource

        def pytest_configure(config):
            # The workers inherit it: a limit far below the cap.
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("n", range(6))
        def test_one(n):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "xdist", "-n", "2", "--max-concurrency=100000")
    output = result.stdout.str() + result.stderr.str()
    assert "Too many open files" not in output
    assert "INTERNALERROR" not in output
    result.assert_outcomes(passed=6)


def test_a_marker_cost_past_the_bounds_is_refused_without_any_limit(
    pytester: pytest.Pytester,
) -> None:
    # Without a rate or a window nothing bounded a cost, and 10**30 reached the bucket.
    with pytest.raises(ValueError, match="cost must be at most 1000000, not 1000001"):
        parse_cost((), {"cost": MAX_COUNT + 1}, None)
    assert parse_cost((MAX_COUNT,), {}, None) == MAX_COUNT
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.ratebatch(cost=10**30)
        def test_costly():
            pass
        """
    )
    result = pytester.runpytest("--max-failures=1", "-rE")
    output = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in output
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*cost must be at most 1000000, not *"])
