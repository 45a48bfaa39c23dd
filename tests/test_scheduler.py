from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_ratebatch.engine.limiter import UNLIMITED, RateLimiter
from pytest_ratebatch.engine.scheduler import TaskScheduler, Ticket
from pytest_ratebatch.limits.batches import StopRule
from pytest_ratebatch.limits.policy import ExecutionPolicy, RateLimit
from pytest_ratebatch.stores.files import FileBucketStore, FileLedger
from pytest_ratebatch.stores.memory import MemoryLedger
from pytest_ratebatch.views.report import worst_excess
from tests.fakes import FakeClock

SECOND = 1_000_000_000


def run(
    scheduler: TaskScheduler,
    clock: FakeClock,
    outcomes: list[bool],
    duration: float = 0.0,
) -> list[Ticket]:
    """Run tests one after another, like a single pytest process; ``True`` means failed."""
    tickets = []
    for failed in outcomes:
        ticket = scheduler.admit()
        tickets.append(ticket)
        if not ticket.cancelled:
            clock.advance(duration)
            scheduler.finish(ticket, failed)
    return tickets


def make(clock: FakeClock, **policy: object) -> TaskScheduler:
    waits: list[tuple[str, float]] = []
    scheduler = TaskScheduler(
        ExecutionPolicy(**policy),  # type: ignore[arg-type]
        clock=clock,
        on_wait=lambda what, seconds: waits.append((what, seconds)),
    )
    scheduler.waits = waits  # type: ignore[attr-defined]
    return scheduler


def test_no_policy_admits_everything_at_once(clock: FakeClock) -> None:
    tickets = run(make(clock), clock, [False] * 5)
    assert [ticket.cancelled for ticket in tickets] == [""] * 5
    assert {ticket.start_ns for ticket in tickets} == {clock.now}
    assert clock.sleeps == []


def test_unbatched_starts_follow_the_rate(clock: FakeClock) -> None:
    scheduler = make(clock, rate_limit=RateLimit(60, 2))
    tickets = run(scheduler, clock, [False] * 6)
    offsets = [(ticket.start_ns - tickets[0].start_ns) / SECOND for ticket in tickets]
    assert offsets == [0, 0, 1, 2, 3, 4]
    assert [ticket.batch for ticket in tickets] == [0] * 6
    assert scheduler.waits == [("rate tokens", 1.0)] * 4  # type: ignore[attr-defined]


def test_batches_release_k_tests_after_the_previous_batch_and_backoff(clock: FakeClock) -> None:
    scheduler = make(clock, rate_limit=RateLimit(60, 3), batch_size=3, batch_backoff=2.0)
    tickets = run(scheduler, clock, [False] * 7, duration=0.5)
    assert [ticket.batch for ticket in tickets] == [1, 1, 1, 2, 2, 2, 3]
    starts = [(ticket.start_ns - tickets[0].start_ns) / SECOND for ticket in tickets]
    # Batch 1 runs 0 .. 1.5 s; batch 2 waits for the backoff until 3.5 s (its three tokens
    # refilled meanwhile) and runs until 5.0 s; batch 3 starts after the backoff, at 7.0 s.
    assert starts == [0, 0.5, 1.0, 3.5, 4.0, 4.5, 7.0]
    assert scheduler.waits == [("batch backoff", 2.0)] * 2  # type: ignore[attr-defined]


def test_a_batch_takes_its_tokens_before_it_starts(clock: FakeClock) -> None:
    scheduler = make(clock, rate_limit=RateLimit(60, 4), batch_size=4)
    tickets = run(scheduler, clock, [False] * 8)
    first_of_second_batch = tickets[4]
    # Batch 2 waits four seconds up front (all four tokens), then its members start at once.
    assert (first_of_second_batch.start_ns - tickets[0].start_ns) == 4 * SECOND
    assert {ticket.start_ns for ticket in tickets[4:]} == {first_of_second_batch.start_ns}
    assert worst_excess([(t.start_ns, t.tokens) for t in tickets], SECOND, 4) <= 0


def test_slow_tests_inside_a_batch_still_count_at_their_own_start(clock: FakeClock) -> None:
    # Tests of a batch start one after another in one process; the next batch must not crowd
    # the last test of the previous one (each test commits its token when it really starts).
    scheduler = make(clock, rate_limit=RateLimit(600, 2), batch_size=2)
    tickets = run(scheduler, clock, [False] * 6, duration=1.0)
    starts = [(ticket.start_ns, ticket.tokens) for ticket in tickets]
    assert worst_excess(starts, RateLimit(600, 2).interval_ns, 2) <= 0


def test_batches_without_a_rate_only_keep_the_barrier(clock: FakeClock) -> None:
    scheduler = make(clock, batch_size=2)
    tickets = run(scheduler, clock, [False] * 5, duration=1.0)
    assert [ticket.batch for ticket in tickets] == [1, 1, 2, 2, 3]
    assert clock.sleeps == []


def test_max_failures_cancels_every_later_test(clock: FakeClock) -> None:
    scheduler = make(clock, max_failures=2)
    tickets = run(scheduler, clock, [True, False, True, False, False])
    assert [ticket.cancelled for ticket in tickets] == [""] * 3 + ["max failures (2) reached"] * 2
    assert scheduler.stop_reason == "max failures (2) reached"


def test_max_failures_stops_inside_a_batch_too(clock: FakeClock) -> None:
    scheduler = make(clock, batch_size=3, max_failures=1)
    tickets = run(scheduler, clock, [True, False, False, False])
    assert [bool(ticket.cancelled) for ticket in tickets] == [False, True, True, True]


def test_total_timeout_counts_from_session_start(clock: FakeClock) -> None:
    scheduler = make(clock, total_timeout=2.5)
    tickets = run(scheduler, clock, [False] * 5, duration=1.0)
    assert [ticket.cancelled for ticket in tickets] == [""] * 3 + [
        "total timeout (2.5s) passed"
    ] * 2


def test_no_wait_for_a_slot_the_total_timeout_would_never_reach(clock: FakeClock) -> None:
    scheduler = make(clock, rate_limit=RateLimit(6, 1), total_timeout=15.0)  # a token per 10 s
    tickets = run(scheduler, clock, [False] * 4)
    reason = "total timeout (15s) would pass before the next start"
    assert [ticket.cancelled for ticket in tickets] == ["", "", reason, reason]
    assert clock.sleeps == [10.0]  # the second test waited; nobody waited in vain


def test_backoff_beyond_the_total_timeout_cancels_at_once(clock: FakeClock) -> None:
    scheduler = make(clock, batch_size=1, batch_backoff=60.0, total_timeout=30.0)
    tickets = run(scheduler, clock, [False] * 3)
    assert tickets[0].cancelled == ""
    assert tickets[1].cancelled == "total timeout (30s) would pass before the next start"
    assert clock.sleeps == []


def test_finishing_a_cancelled_ticket_changes_nothing(clock: FakeClock) -> None:
    scheduler = make(clock, max_failures=1)
    first = scheduler.admit()
    scheduler.finish(first, failed=True)
    cancelled = scheduler.admit()
    assert cancelled.cancelled
    scheduler.finish(cancelled, failed=True)
    assert scheduler.ledger.snapshot().failures == 1


def test_threads_keep_the_barrier_between_batches() -> None:
    """Concurrent tests (threads on the real clock): no batch starts before the last ended."""
    scheduler = TaskScheduler(ExecutionPolicy(batch_size=3), ledger=MemoryLedger())
    spans: list[tuple[int, float, float]] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(6):
            ticket = scheduler.admit()
            started = time.monotonic()
            time.sleep(0.002)
            finished = time.monotonic()
            scheduler.finish(ticket, failed=False)
            with lock:
                spans.append((ticket.batch, started, finished))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(spans) == 24
    batches = sorted({batch for batch, _, _ in spans})
    assert batches == list(range(1, 9))
    for batch in batches[1:]:
        previous_end = max(end for b, _, end in spans if b == batch - 1)
        this_start = min(start for b, start, _ in spans if b == batch)
        assert this_start >= previous_end
        assert sum(b == batch for b, _, _ in spans) == 3


@pytest.mark.parametrize("batch_size", [None, 2])
def test_a_stop_during_opening_releases_waiting_members(batch_size: int | None) -> None:
    clock = FakeClock()
    scheduler = make(clock, batch_size=batch_size, max_failures=1)
    first = scheduler.admit()
    scheduler.finish(first, failed=True)
    assert scheduler.admit().cancelled == "max failures (1) reached"
    snapshot = scheduler.ledger.snapshot()
    assert snapshot.running == 0


@pytest.mark.timeout(60)
def test_a_member_takes_over_a_batch_whose_opener_died(tmp_path: Path) -> None:
    policy = ExecutionPolicy(batch_size=2)
    opener = FileLedger(tmp_path)
    entry = opener.enter(time.monotonic_ns(), StopRule(None, None, ""), 2)
    assert (entry.action, entry.batch, entry.reason) == ("open", 1, "")
    # The opener's process dies before releasing the batch: the kernel closes its files,
    # which drops its locks but leaves the gate file and the ledger saying "not released".
    for fd in [*opener._gates.values(), *opener._members.values()]:
        os.close(fd)
    assert not opener.snapshot().released
    member = TaskScheduler(policy, ledger=FileLedger(tmp_path))
    ticket = member.admit()
    assert (ticket.batch, ticket.cancelled) == (1, "")
    assert member.ledger.snapshot().released


class StoppingClock(FakeClock):
    """A fake clock on which another process stops the session during the first sleep."""

    def __init__(self) -> None:
        super().__init__()
        self.stop: Callable[[], object] | None = None

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        stop, self.stop = self.stop, None  # once
        if stop is not None:
            stop()


@pytest.mark.parametrize(
    "policy",
    [
        {"rate_limit": RateLimit(60, 1)},  # an unbatched test's tokens
        {"rate_limit": RateLimit(60, 1), "batch_size": 1},  # a batch's tokens
        {"batch_size": 1, "batch_backoff": 5.0},  # a batch's backoff
        {"rate_limit": RateLimit(60, 1), "max_concurrency": 2},  # tokens after a slot
    ],
    ids=["tokens", "batch tokens", "backoff", "capped"],
)
def test_a_stop_while_a_test_waits_cancels_it(policy: dict[str, object]) -> None:
    clock = StoppingClock()
    scheduler = make(clock, **policy)
    first = scheduler.admit()
    scheduler.finish(first, failed=False)
    clock.stop = lambda: scheduler.ledger.stop("max failures (1) reached")  # elsewhere
    ticket = scheduler.admit()
    assert ticket.cancelled == "max failures (1) reached"  # checked when it woke
    assert len(clock.sleeps) == 1
    assert scheduler.ledger.snapshot().running == 0
    if scheduler.slots is not None:
        assert scheduler.slots.in_use() == 0  # type: ignore[attr-defined]


def test_a_failure_that_reaches_max_failures_records_the_stop_at_once(clock: FakeClock) -> None:
    scheduler = make(clock, max_failures=1)
    scheduler.finish(scheduler.admit(), failed=True)
    # Recorded now, not at the next start: the ledger wakes the tests waiting elsewhere.
    assert scheduler.ledger.snapshot().stop_reason == "max failures (1) reached"


@pytest.mark.timeout(60)
def test_a_stop_in_another_process_wakes_a_test_waiting_for_tokens(tmp_path: Path) -> None:
    # Two processes of one xdist session share a directory; each opens its own ledger.
    policy = ExecutionPolicy(rate_limit=RateLimit(1, 1))  # a token per minute
    limiter = RateLimiter(policy.rate_limit or UNLIMITED, FileBucketStore(tmp_path))
    waiting = TaskScheduler(policy, limiter=limiter, ledger=FileLedger(tmp_path))
    assert not waiting.admit().cancelled  # the burst's token: the next waits a minute
    tickets: list[Ticket] = []
    thread = threading.Thread(target=lambda: tickets.append(waiting.admit()))
    thread.start()
    time.sleep(0.3)
    assert tickets == []  # still waiting
    stopped = time.monotonic()
    FileLedger(tmp_path).stop("store unavailable: elsewhere")
    thread.join(timeout=30)
    assert time.monotonic() - stopped < 1  # at once, not when its minute is over
    (ticket,) = tickets
    assert ticket.cancelled == "store unavailable: elsewhere"


@pytest.mark.timeout(60)
def test_processes_keep_the_barrier_between_batches(tmp_path: Path) -> None:
    # Two ledgers on one directory are two processes (flock tells their open files apart).
    # A test of the first runs in batch 1; the next test, on the second, opens batch 2 and
    # waits at the barrier until that test finished, however long it runs: no rate spaces
    # the batches here, only the barrier.
    policy = ExecutionPolicy(batch_size=1)
    first = TaskScheduler(policy, ledger=FileLedger(tmp_path))
    second = TaskScheduler(policy, ledger=FileLedger(tmp_path))
    running = first.admit()
    assert (running.batch, running.cancelled) == (1, "")
    finishing = threading.Event()
    admitted: list[tuple[Ticket, bool]] = []

    def next_test() -> None:
        ticket = second.admit()
        admitted.append((ticket, finishing.is_set()))

    thread = threading.Thread(target=next_test, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while first.ledger.snapshot().batch != 2:  # batch 2 opened: its opener is at the barrier
        assert time.monotonic() < deadline, "the next test never arrived"
        time.sleep(0.005)
    # A second there: past the barrier, what is left of an admission takes milliseconds.
    thread.join(timeout=1)
    assert not admitted, "batch 2 started while batch 1 still ran"
    finishing.set()
    first.finish(running, failed=False)
    thread.join(timeout=10)
    assert len(admitted) == 1
    ticket, after_the_finish = admitted[0]
    assert (ticket.batch, ticket.cancelled, after_the_finish) == (2, "", True)
    assert ticket.start_ns >= first.ledger.snapshot().drained_ns > 0
