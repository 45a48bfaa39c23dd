"""The start line: where other processes take tokens from the same bucket, the starts that
must wait take them in the order of their ranks (priority, then arrival) when they come due,
in one xdist session and across sessions on one Redis key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from pytest_ratebatch.engine.limiter import RateLimiter
from pytest_ratebatch.engine.scheduler import (
    START_TURN,
    TURN_LEAD_NS,
    TaskScheduler,
    line_rank,
)
from pytest_ratebatch.limits.policy import MAX_PRIORITY, ExecutionPolicy, RateLimit
from pytest_ratebatch.stores.base import ResourcePool, Slot
from pytest_ratebatch.stores.files import FileResourcePool
from pytest_ratebatch.stores.memory import MemoryBucketStore, MemoryResourcePool
from pytest_ratebatch.stores.redis import RedisResourcePool
from tests.fakes import FakeClock
from tests.redis_server import RedisServer

SECOND = 1_000_000_000


def test_a_rank_orders_priorities_then_arrivals() -> None:
    now = time.time_ns()
    assert line_rank(1, now + 3600 * SECOND) > line_rank(0, now)  # a priority outranks time
    assert line_rank(0, now) > line_rank(0, now + SECOND // 10)  # earlier first in a tier
    assert line_rank(0, now) > line_rank(-1, now - 3600 * SECOND)


@pytest.mark.parametrize("priority", [MAX_PRIORITY, -MAX_PRIORITY, 0])
def test_a_rank_is_exact_as_a_double(priority: int) -> None:
    # Redis keeps a rank as a sorted set's score, a double.
    for arrival in (0, time.time_ns(), 2**62):
        rank = line_rank(priority, arrival)
        assert float(rank) == rank
        assert int(float(rank) + 1) == rank + 1  # its neighbours stay apart


def test_take_within_takes_only_what_is_due_soon(clock: FakeClock) -> None:
    limiter = RateLimiter(RateLimit(60, 1), MemoryBucketStore(clock), clock=clock)
    assert limiter.take_within(1, 0) == (clock.now, 0)  # the burst's token, now
    started = clock.now
    assert limiter.take_within(1, SECOND // 2) == (None, SECOND)  # due in 1 s: nothing taken
    assert limiter.take_within(1, SECOND) == (started + SECOND, 0)  # within: it sleeps for it
    assert clock.now == started + SECOND


class ScriptedLine:
    """A start line of one process, granting each turn at once; ``ahead`` is the rank the
    line reports waiting at each look, and ``on_turn`` runs as a turn is handed over (what
    other processes do meanwhile)."""

    def __init__(self, ahead: list[int | None], on_turn: list[Any]) -> None:
        self.capacity = dict(START_TURN)
        self.ahead = ahead
        self.on_turn = on_turn
        self.turns: list[int] = []
        self.released = 0

    def acquire(
        self, amounts: Mapping[str, float], max_wait_ns: int | None = None, priority: int = 0
    ) -> Slot | None:
        assert dict(amounts) == START_TURN
        self.turns.append(priority)
        if self.on_turn:
            self.on_turn.pop(0)()
        return Slot(-1, str(len(self.turns)))

    def release(self, slot: Slot) -> None:
        self.released += 1

    def first_waiting(self) -> int | None:
        return self.ahead.pop(0) if self.ahead else None

    def in_use(self) -> dict[str, float]:
        return {}

    def describe(self) -> str:
        return "scripted"

    def close(self) -> None:
        pass


def ranked_scheduler(
    clock: FakeClock, line: ResourcePool, total_timeout: float | None = None
) -> tuple[TaskScheduler, RateLimiter]:
    policy = ExecutionPolicy(rate_limit=RateLimit(60, 1), total_timeout=total_timeout)
    limiter = RateLimiter(RateLimit(60, 1), MemoryBucketStore(clock), clock=clock)
    scheduler = TaskScheduler(policy, limiter=limiter, clock=clock)
    scheduler.open_start_line = lambda: line
    return scheduler, limiter


def test_a_start_that_need_not_wait_never_opens_the_line(clock: FakeClock) -> None:
    scheduler, _ = ranked_scheduler(clock, ScriptedLine([], []))
    opened: list[int] = []
    scheduler.open_start_line = lambda: opened.append(1)  # type: ignore[assignment]
    ticket = scheduler.admit()
    assert not ticket.cancelled
    assert opened == []


def test_a_start_lets_a_higher_rank_go_first_then_takes_the_next_tokens(
    clock: FakeClock,
) -> None:
    # A higher rank waits when this start's token comes due: it yields its turn, the other
    # process takes that token, and this start takes the next one, a second later.
    limiter_of_other: list[RateLimiter] = []
    line = ScriptedLine(
        ahead=[line_rank(9, time.time_ns())],
        on_turn=[lambda: None, lambda: limiter_of_other[0].take(1)],
    )
    scheduler, limiter = ranked_scheduler(clock, line)
    limiter_of_other.append(limiter)  # one bucket: the other process's starts take from it
    first = scheduler.admit()
    scheduler.priority = 0
    second = scheduler.admit()
    assert not second.cancelled
    assert second.start_ns - first.start_ns == 2 * SECOND
    assert len(line.turns) == 2
    assert len(set(line.turns)) == 1
    assert line.released == 2
    # It slept out of the bucket until shortly before each token came due.
    assert clock.sleeps[0] == pytest.approx((SECOND - TURN_LEAD_NS) / SECOND)
    assert scheduler.waited_by_limit["rate"] == pytest.approx(2.0, abs=0.1)


def test_a_lower_rank_waiting_does_not_make_the_holder_yield(clock: FakeClock) -> None:
    line = ScriptedLine(ahead=[line_rank(-5, time.time_ns())], on_turn=[])
    scheduler, _ = ranked_scheduler(clock, line)
    first = scheduler.admit()
    scheduler.priority = 0
    second = scheduler.admit()
    assert second.start_ns - first.start_ns == SECOND
    assert len(line.turns) == 1
    assert line.released == 1


def test_a_start_past_the_total_timeout_is_cancelled_and_gives_its_turn_back(
    clock: FakeClock,
) -> None:
    line = ScriptedLine(ahead=[], on_turn=[])
    scheduler, _ = ranked_scheduler(clock, line, total_timeout=0.5)
    assert not scheduler.admit().cancelled
    ticket = scheduler.admit()
    assert "total timeout (0.5s)" in ticket.cancelled
    assert line.released == len(line.turns)


def test_a_stop_while_holding_the_turn_cancels_the_start_and_gives_it_back(
    clock: FakeClock,
) -> None:
    line = ScriptedLine(ahead=[], on_turn=[])
    scheduler, _ = ranked_scheduler(clock, line)
    assert not scheduler.admit().cancelled
    real_sleep = clock.sleep

    def sleep_then_stop(seconds: float) -> None:
        real_sleep(seconds)
        scheduler.ledger.stop("max failures (1) reached")

    clock.sleep = sleep_then_stop  # type: ignore[method-assign]
    ticket = scheduler.admit()
    assert ticket.cancelled == "max failures (1) reached"
    assert line.turns
    assert line.released == len(line.turns)


@pytest.mark.timeout(60)
def test_a_stop_ends_the_wait_for_a_turn_another_process_holds() -> None:
    line = MemoryResourcePool(START_TURN)
    held = line.acquire(START_TURN)  # another process's start holds the turn, for long
    assert held is not None
    scheduler = TaskScheduler(ExecutionPolicy(rate_limit=RateLimit(60, 1)))  # the real clock
    scheduler.open_start_line = lambda: line
    assert not scheduler.admit().cancelled  # the burst's token: the next waits, in line
    stopper = threading.Timer(0.3, scheduler.ledger.stop, ("max failures (1) reached",))
    stopper.start()
    began = time.monotonic()
    ticket = scheduler.admit()
    stopper.join()
    assert ticket.cancelled == "max failures (1) reached"
    assert time.monotonic() - began < 5  # a slice of the wait, not the holder's leisure
    assert line.first_waiting() is None  # it left the line
    line.release(held)


def waiting_priority(pool: ResourcePool, priority: int) -> int | None:
    """``first_waiting`` while another thread waits in line with ``priority``, behind a
    holder; ``None`` before and after."""
    holder = pool.acquire(START_TURN)
    assert holder is not None
    assert pool.first_waiting() is None

    def wait_in_line() -> None:
        turn = pool.acquire(START_TURN, None, priority)
        assert turn is not None
        pool.release(turn)

    waiter = threading.Thread(target=wait_in_line)
    waiter.start()
    seen = None
    deadline = time.monotonic() + 10
    while seen is None and time.monotonic() < deadline:
        time.sleep(0.01)
        seen = pool.first_waiting()
    pool.release(holder)
    waiter.join(timeout=10)
    assert pool.first_waiting() is None
    return seen


def test_first_waiting_in_memory() -> None:
    assert waiting_priority(MemoryResourcePool(START_TURN), 7) == 7


def test_first_waiting_in_the_session_directory(tmp_path: Path) -> None:
    pool = FileResourcePool(tmp_path, START_TURN)
    try:
        rank = line_rank(3, time.time_ns())
        assert waiting_priority(pool, rank) == rank
        assert waiting_priority(pool, -4) == -4
    finally:
        pool.close()


def test_first_waiting_in_redis(redis_server: RedisServer, request: pytest.FixtureRequest) -> None:
    key = f"start-line-{os.getpid()}-{request.node.name}"
    pool = RedisResourcePool(redis_server.url, key, START_TURN, name="start-line")
    try:
        rank = line_rank(MAX_PRIORITY, time.time_ns())
        assert waiting_priority(pool, rank) == rank  # exact, through a double
    finally:
        pool.close()


LOW_AND_HIGH = {
    "test_low": """
        import pytest

        @pytest.mark.parametrize("i", range({count}))
        def test_low(i): pass
        """,
    "test_high": """
        import pytest

        pytestmark = pytest.mark.ratebatch(priority=5)

        @pytest.mark.parametrize("i", range({count}))
        def test_high(i): pass
        """,
}


def start_order(*reports: Path) -> list[str]:
    """The tests of the JSON reports, by their start (the wall clock: one machine)."""
    tests: list[dict[str, Any]] = []
    for report in reports:
        tests += json.loads(report.read_text())["tests"]
    started = sorted((test for test in tests if test["started_at"]), key=lambda t: t["started_at"])
    return [test["nodeid"].split("::")[-1].split("[")[0] for test in started]


def lows_among_highs(order: list[str]) -> int:
    """How many low-priority starts came between the first high one and the last."""
    first = order.index("test_high")
    last = len(order) - 1 - order[::-1].index("test_high")
    return order[first:last].count("test_low")


def test_under_xdist_the_waiting_starts_go_by_priority(pytester: pytest.Pytester) -> None:
    # Each file on its own worker: both wait for every token; a second apart, the high
    # priority's worker takes each one, whatever the other worker's start waited.
    for name, source in LOW_AND_HIGH.items():
        pytester.makepyfile(**{name: source.format(count=4)})
    result = pytester.runpytest_subprocess(
        "-n", "2", "--dist=loadfile", "--rate-per-minute=60", "--ratebatch-report=r.json",
        "-p", "no:cacheprovider", timeout=120,
    )  # fmt: skip
    result.assert_outcomes(passed=8)
    order = start_order(pytester.path / "r.json")
    assert order.count("test_high") == 4
    assert lows_among_highs(order) == 0, order  # the first start is either's
    assert order[-3:] == ["test_low"] * 3, order


def test_a_session_without_priorities_on_the_redis_key_lets_the_ranked_one_first(
    pytester: pytest.Pytester, redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    # One session states no priorities; the other, started with it, only high ones. The
    # waiting starts of both stand in the key's line: the high ones take the tokens.
    key = f"start-line-{os.getpid()}-{request.node.name}"
    store = [f"--ratebatch-store={redis_server.url}", f"--ratebatch-key={key}"]
    sessions = []
    for name, count in (("test_low", 8), ("test_high", 4)):
        directory = pytester.mkdir(name)
        (directory / f"{name}.py").write_text(
            LOW_AND_HIGH[name].format(count=count).replace("\n        ", "\n")
        )
        command = [
            sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rate-per-minute=120",
            "--ratebatch-report=r.json", *store,
        ]  # fmt: skip
        sessions.append(subprocess.Popen(command, cwd=directory, stdout=subprocess.PIPE, text=True))
    for session in sessions:
        output, _ = session.communicate(timeout=120)
        assert session.returncode == 0, output
    order = start_order(pytester.path / "test_low/r.json", pytester.path / "test_high/r.json")
    assert order.count("test_high") == 4
    assert order[-1] == "test_low", order  # the low session had more to run than its share
    assert lows_among_highs(order) == 0, order
