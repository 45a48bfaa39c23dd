from __future__ import annotations

import heapq
import random
import threading
from collections.abc import Callable

import pytest

from pytest_ratebatch.engine.limiter import RateLimiter
from pytest_ratebatch.limits import gcra
from pytest_ratebatch.limits.policy import RateLimit
from pytest_ratebatch.stores.memory import MemoryBucketStore
from pytest_ratebatch.views.report import worst_excess
from tests.fakes import FakeClock

SECOND = 1_000_000_000


def limiter(clock: FakeClock, per_minute: float = 60, burst: int = 1) -> RateLimiter:
    return RateLimiter(RateLimit(per_minute, burst), clock=clock)


def test_bucket_starts_full_then_refills_at_the_rate(clock: FakeClock) -> None:
    bucket = limiter(clock, per_minute=60, burst=3)
    for _ in range(3):
        assert bucket.acquire()
    assert clock.sleeps == []
    assert bucket.acquire()
    assert clock.sleeps == [1.0]  # one token refills in exactly one second, computed, not polled
    clock.advance(10)
    assert bucket.available_tokens == 3


def test_available_tokens_counts_the_refill(clock: FakeClock) -> None:
    bucket = limiter(clock, per_minute=60, burst=4)
    assert bucket.available_tokens == 4
    assert bucket.acquire(3)
    assert bucket.available_tokens == 1
    clock.advance(1.5)
    assert bucket.available_tokens == pytest.approx(2.5)


def test_span_of_n_starts_is_exactly_ideal(clock: FakeClock) -> None:
    bucket = limiter(clock, per_minute=600, burst=5)
    starts = []
    for _ in range(105):
        admission = bucket.admit()
        assert admission is not None
        starts.append(admission.at_ns)
    assert starts[-1] - starts[0] == 100 * SECOND // 10  # (N - burst) / rate
    assert worst_excess([(start, 1) for start in starts], bucket.rate_limit.interval_ns, 5) == 0


def test_timeout_refuses_without_taking_anything(clock: FakeClock) -> None:
    bucket = limiter(clock, per_minute=60, burst=1)
    assert bucket.acquire()
    assert not bucket.acquire(timeout=0.5)
    assert not bucket.try_acquire()
    assert clock.sleeps == []
    assert bucket.acquire(timeout=1.0)  # exactly one second: still accepted
    assert clock.sleeps == [1.0]


def test_try_acquire_takes_only_what_is_there(clock: FakeClock) -> None:
    bucket = limiter(clock, per_minute=60, burst=2)
    assert bucket.try_acquire(2)
    assert not bucket.try_acquire(1)
    clock.advance(1)
    assert bucket.try_acquire(1)
    assert clock.sleeps == []


def test_zero_tokens_never_wait(clock: FakeClock) -> None:
    bucket = limiter(clock)
    assert bucket.acquire()
    assert bucket.acquire(0)
    assert bucket.try_acquire(0)
    assert clock.sleeps == []


@pytest.mark.parametrize("tokens", [-1, 1.5, True, "1"])
def test_tokens_must_be_whole_and_not_negative(clock: FakeClock, tokens: object) -> None:
    with pytest.raises(ValueError, match="whole number"):
        limiter(clock).acquire(tokens)  # type: ignore[arg-type]


def test_more_than_the_burst_is_an_error_not_a_hang(clock: FakeClock) -> None:
    bucket = limiter(clock, burst=3)
    with pytest.raises(ValueError, match=r"4 tokens exceed the burst \(3\)"):
        bucket.acquire(4)
    with pytest.raises(ValueError, match="exceed the burst"):
        bucket.try_acquire(4)
    assert bucket.available_tokens == 3


def test_waiters_are_served_in_arrival_order(clock: FakeClock) -> None:
    store = MemoryBucketStore(clock)
    interval = RateLimit(60).interval_ns
    slots = []
    for _ in range(5):
        _status, now, wait = store.take(1, interval, 1, None, True)
        slots.append(now + wait)
    assert slots == [clock.now + k * SECOND for k in range(5)]


def test_reserve_only_holds_a_place_that_commit_admits(clock: FakeClock) -> None:
    bucket = limiter(clock, per_minute=60, burst=3)
    held = bucket.admit(3, reserve_only=True)
    assert held is not None
    # Someone else arriving now queues behind the held place.
    status, _now, wait = bucket.store.take(1, bucket.rate_limit.interval_ns, 3, None, True)
    assert status == gcra.RESERVED
    assert wait == SECOND
    for _ in range(3):
        assert bucket.commit(1) == clock.now  # the held tokens start without waiting
    assert clock.sleeps == []


class OversleepingClock(FakeClock):
    """A fake clock whose first sleep lets ``meanwhile`` act and then wakes ``late_ns`` late."""

    def __init__(self, late_ns: int) -> None:
        super().__init__()
        self.late_ns = late_ns
        self.meanwhile: list[Callable[[], object]] = []

    def sleep(self, seconds: float) -> None:
        due = self.now + round(seconds * SECOND)
        super().sleep(seconds)
        if self.late_ns:
            for step in self.meanwhile:
                step()
            self.now = due + self.late_ns
            self.late_ns = 0


def test_a_waiter_overtaken_while_asleep_queues_again() -> None:
    rate = RateLimit(60, 1)
    interval = rate.interval_ns
    clock = OversleepingClock(late_ns=interval + 1)
    store = MemoryBucketStore(clock)
    t0 = clock.now
    store.take(1, interval, 1, None, True)  # admitted at t0: the next slot is t0 + 1 s
    late_waiter = RateLimiter(rate, store, clock=clock)
    others: dict[str, int] = {}

    def punctual_waiters() -> None:
        # Two others queue behind the late waiter (slots t0 + 2 s and t0 + 3 s); the first
        # is admitted on time, at t0 + 2 s, while the late waiter still sleeps.
        for name in ("second", "third"):
            _status, now, wait = store.take(1, interval, 1, None, True)
            others[name] = now + wait
        clock.now = others["second"]
        assert store.commit(1, interval, 1)[0] == gcra.ADMITTED

    clock.meanwhile.append(punctual_waiters)
    admission = late_waiter.admit()
    assert admission is not None
    assert others == {"second": t0 + 2 * interval, "third": t0 + 3 * interval}
    # Not the third waiter's slot, which it lost by oversleeping: a new one behind it.
    assert admission.at_ns == t0 + 4 * interval
    starts = [(t0, 1), (others["second"], 1), (others["third"], 1), (admission.at_ns, 1)]
    assert worst_excess(starts, interval, 1) <= 0


def test_a_retry_that_would_end_after_the_timeout_gives_up() -> None:
    rate = RateLimit(60, 1)
    interval = rate.interval_ns
    clock = OversleepingClock(late_ns=1)
    store = MemoryBucketStore(clock)
    store.take(1, interval, 1, None, True)  # admitted now: the next slot is in 1 s
    # While the waiter sleeps, a batch member commits the admission at its slot.
    clock.meanwhile.append(lambda: store.commit(1, interval, 1))
    waiter = RateLimiter(rate, store, clock=clock)
    assert waiter.admit(timeout=1.5) is None  # admission in 2 s, past the 1.5 s timeout


def simulate(
    per_minute: float,
    burst: int,
    processes: int,
    tests: int,
    lateness: float,
    seed: int,
    requeue: bool = True,
    busy: int = 2,
) -> list[tuple[int, int, int]]:
    """Processes that reserve, sleep (waking up to ``lateness`` seconds late) and commit.

    An event simulation on a fake clock of what ``RateLimiter.admit`` does in each process
    (``requeue=False``: without queueing again once overtaken), each admitted process running
    up to ``busy`` intervals before it asks again; returns the admissions
    ``(time, cost, process)`` a real run would record, with wake-up jitter that makes some
    waiters late and others on time.
    """
    rng = random.Random(seed)
    clock = FakeClock()
    store = MemoryBucketStore(clock)
    rate = RateLimit(per_minute, burst)
    interval = rate.interval_ns
    events: list[tuple[int, int, str, int, int, int]] = []  # time, order, action, cost, who, slot
    order = 0
    for process in range(processes):
        heapq.heappush(events, (clock.now, order, "take", rng.randint(1, burst), process, 0))
        order += 1
    admitted: list[tuple[int, int, int]] = []
    while events and len(admitted) < tests:
        clock.now, _, action, cost, process, slot = heapq.heappop(events)
        if action == "take":
            status, now, wait = store.take(cost, interval, burst, None, True)
            slot = now + wait
        else:
            status, now, wait = store.commit(cost, interval, burst)
            if status != gcra.ADMITTED and requeue and gcra.overtaken(slot, now, interval):
                status, now, wait = store.take(cost, interval, burst, None, True)
                slot = now + wait
        if status == gcra.ADMITTED:
            admitted.append((now, cost, process))
            run_time = rng.randint(0, interval * busy)
            next_action, delay = "take", run_time
        else:
            next_action, delay = "commit", wait + rng.randint(0, int(lateness * SECOND))
        heapq.heappush(events, (clock.now + delay, order, next_action, cost, process, slot))
        order += 1
    return admitted


def longest_overtaking(admitted: list[tuple[int, int, int]]) -> int:
    """The most admissions of other processes between two admissions of one process."""
    last_seen: dict[int, int] = {}
    worst = 0
    for position, (_, _, process) in enumerate(sorted(admitted)):
        if process in last_seen:
            worst = max(worst, position - last_seen[process] - 1)
        last_seen[process] = position
    return worst


def test_overtaken_waiters_queue_again_rather_than_lose_every_race() -> None:
    # Waiters that wake up to a fifth of an interval late; each asks again at once. Without
    # queueing again, a waiter that was overtaken races every punctual one for its slot.
    def longest(requeue: bool, seed: int) -> int:
        admitted = simulate(600, 1, 4, 400, lateness=0.02, seed=seed, requeue=requeue, busy=0)
        return longest_overtaking(admitted)

    queued_again = [longest(True, seed) for seed in range(10)]
    racing = [longest(False, seed) for seed in range(10)]
    assert max(queued_again) < min(racing)


@pytest.mark.parametrize("seed", range(40))
def test_late_wakers_never_break_the_bound(seed: int) -> None:
    per_minute, burst = [(600, 1), (600, 3), (60, 5), (6000, 2)][seed % 4]
    admitted = simulate(per_minute, burst, processes=4, tests=300, lateness=0.2, seed=seed)
    assert len(admitted) == 300
    starts = [(time, cost) for time, cost, _ in admitted]
    assert worst_excess(starts, RateLimit(per_minute, burst).interval_ns, burst) <= 0


def test_without_lateness_contended_pacing_is_ideal() -> None:
    admitted = simulate(600, 1, processes=4, tests=200, lateness=0.0, seed=1)
    starts = sorted(time for time, _, _ in admitted)
    interval = RateLimit(600, 1).interval_ns
    cost = sum(cost for _, cost, _ in admitted)
    assert starts[-1] - starts[0] == (cost - 1) * interval


def test_threads_sharing_a_limiter_keep_the_bound() -> None:
    bucket = RateLimiter(RateLimit(60_000, 2))  # real clock: 1 ms per token
    admissions: list[tuple[int, int]] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(25):
            admission = bucket.admit()
            assert admission is not None
            with lock:
                admissions.append((admission.at_ns, admission.tokens))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admissions) == 100
    assert worst_excess(admissions, bucket.rate_limit.interval_ns, 2) <= 0
