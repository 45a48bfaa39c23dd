"""The shared bucket's pause and rate adaptation (``limits.bucket``), on a fake clock."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_ratebatch.engine.limiter import RateLimiter
from pytest_ratebatch.limits import gcra
from pytest_ratebatch.limits.bucket import (
    RECOVERY_PERIOD_NS,
    UNSET,
    BucketState,
    current_interval,
    throttle,
)
from pytest_ratebatch.limits.policy import RateLimit
from pytest_ratebatch.stores.base import BucketStore
from pytest_ratebatch.stores.files import FileBucketStore
from pytest_ratebatch.stores.memory import MemoryBucketStore
from tests.fakes import FakeClock

SECOND = 1_000_000_000


def test_the_configured_interval_applies_until_a_throttle() -> None:
    state = BucketState()
    assert current_interval(state, 5 * SECOND, 100) == 100
    assert state.interval == UNSET


def test_a_throttle_pauses_and_empties_the_bucket() -> None:
    state = BucketState(reserved=10, admitted=10)
    before, after, until = throttle(state, 100, wait_ns=SECOND, configured=50, burst=4, adapt=False)
    assert (before, after, until) == (50, 50, 100 + SECOND)
    # Nothing is admitted before the pause ends, and then one at a time (no burst).
    assert state.reserved == state.admitted == until + 3 * 50
    _, _, status, wait = gcra.take(state.reserved, state.admitted, until - 1, 1, 50, 4)
    assert status == gcra.RESERVED
    assert wait == 1
    assert state.interval == UNSET  # adapt=False: the rate stays


def test_the_first_throttle_of_an_unlimited_bucket_spreads_what_was_accepted() -> None:
    state = BucketState(count=5)  # 4 accepted, the 5th refused
    throttle(state, 100, wait_ns=2 * SECOND, configured=0, burst=1, adapt=True)
    assert state.interval == 2 * SECOND // 4
    assert (state.mark_ns, state.mark_count) == (100, 5)


def test_the_first_throttle_of_a_configured_rate_halves_it() -> None:
    state = BucketState(count=9)
    before, after, _ = throttle(state, 100, wait_ns=SECOND, configured=200, burst=1, adapt=True)
    assert (before, after) == (200, 400)


def test_between_two_throttles_the_server_sustained_what_it_accepted() -> None:
    state = BucketState(count=5)
    throttle(state, 0, wait_ns=SECOND, configured=0, burst=1, adapt=True)
    state.count += 21  # 20 accepted, then one refused, 5 s after the first throttle
    _, after, _ = throttle(state, 5 * SECOND, wait_ns=SECOND, configured=0, burst=1, adapt=True)
    assert after == 5 * SECOND // 20


def test_a_second_test_refused_in_the_same_moment_teaches_nothing() -> None:
    state = BucketState(count=5)
    throttle(state, 0, wait_ns=SECOND, configured=0, burst=1, adapt=True)
    interval = state.interval
    state.count += 1  # another test was in flight: admitted before the pause, then refused
    throttle(state, 1000, wait_ns=2 * SECOND, configured=0, burst=1, adapt=True)
    assert state.interval == interval
    assert state.admitted >= 1000 + 2 * SECOND  # but the pause grows to the longer wait
    assert state.throttles == 2


def test_the_interval_recovers_toward_the_configured_one() -> None:
    state = BucketState(count=3)
    throttle(state, 0, wait_ns=SECOND, configured=100_000_000, burst=1, adapt=True)
    adapted = state.interval
    assert adapted == 200_000_000
    assert current_interval(state, SECOND, 100_000_000) == adapted  # still pausing
    first_step = SECOND + RECOVERY_PERIOD_NS
    assert current_interval(state, first_step, 100_000_000) == adapted - adapted // 16
    # Long after, it is back to the configured interval, and no longer adapted.
    assert current_interval(state, 1000 * SECOND, 100_000_000) == 100_000_000
    assert state.interval == UNSET


@pytest.fixture(params=["memory", "file"])
def store(request: pytest.FixtureRequest, clock: FakeClock, tmp_path: Path) -> BucketStore:
    if request.param == "memory":
        return MemoryBucketStore(clock)
    return FileBucketStore(tmp_path, clock)


def test_stores_pause_everyone(store: BucketStore, clock: FakeClock) -> None:
    limiter = RateLimiter(RateLimit(600, 2), store, clock)  # 0.1 s per token
    assert limiter.acquire()
    at, before, after, until = limiter.throttle(1.5, adapt=False)
    assert (before, after) == (SECOND // 10, SECOND // 10)
    assert until - at == 1_500_000_000
    assert not limiter.try_acquire()
    limiter.acquire()
    assert clock.now >= until  # the sleep went past the pause
    assert limiter.available_tokens == 0


def test_stores_keep_the_adapted_rate_for_everyone(store: BucketStore, clock: FakeClock) -> None:
    ours = RateLimiter(RateLimit(6000, 1), store, clock)  # 10 ms per token
    theirs = RateLimiter(RateLimit(6000, 1), store, clock)  # another process, same bucket
    for _ in range(4):
        ours.acquire()
    _, before, after, _ = ours.throttle(0.5, adapt=True)
    assert (before, after) == (10_000_000, 20_000_000)
    start = clock.now
    theirs.acquire()
    theirs.acquire()
    assert clock.now - start >= 500_000_000 + 20_000_000


def test_a_waiter_is_judged_overtaken_by_the_adapted_interval(
    store: BucketStore, clock: FakeClock
) -> None:
    # "auto": no interval configured (0); after a throttle, 250 ms is in force. A waiter
    # refused a few milliseconds past its slot (a second throttle moved the pause) keeps
    # its place; one refused a whole adapted interval late was overtaken.
    for _ in range(5):
        store.take(1, 0, 1, None, True)
    store.throttle(SECOND, 0, 1, True)
    status, now, wait = store.take(1, 0, 1, None, True)
    assert status == gcra.RESERVED
    slot = now + wait
    clock.advance(0.001)
    store.throttle(SECOND, 0, 1, True)  # in flight at the same moment: the pause grows 1 ms
    clock.now = slot
    assert store.commit(1, 0, 1, slot)[0] == gcra.WAIT
    clock.now = slot + 250_000_000
    store.take(1, 0, 1, None, True)  # someone else, admitted meanwhile
    assert store.commit(1, 0, 1, slot)[0] == gcra.OVERTAKEN
    assert store.commit(1, 0, 1)[0] == gcra.WAIT  # without a slot: no judgement


class ClockWithInterlude(FakeClock):
    """A fake clock that runs ``interlude`` when its first sleep begins."""

    def __init__(self) -> None:
        super().__init__()
        self.interlude: list[Callable[[], object]] = []

    def sleep(self, seconds: float) -> None:
        while self.interlude:
            self.interlude.pop(0)()
        super().sleep(seconds)


def test_a_waiter_keeps_its_slot_when_the_pause_grows() -> None:
    clock = ClockWithInterlude()
    store = MemoryBucketStore(clock)
    limiter = RateLimiter(RateLimit(math.inf, 1), store, clock)  # auto
    for _ in range(5):
        limiter.acquire()
    _, _, adapted, until = limiter.throttle(1.0, adapt=True)  # 4 accepted in 1 s
    assert adapted == 250_000_000
    # While the waiter sleeps toward its slot (the pause's end), a test refused in the same
    # moment asks for 2 ms more, and another waiter queues behind.
    clock.interlude.append(lambda: limiter.throttle(1.002, adapt=True))
    clock.interlude.append(lambda: store.take(1, 0, 1, None, True))
    admission = limiter.admit()
    assert admission is not None
    # Admitted 2 ms late, still first: not sent to the back of the line (until + 500 ms).
    assert admission.at_ns == until + 2_000_000


class TokenBucketServer:
    """A server's token bucket on the fake clock: ``rate`` per second, ``capacity``."""

    def __init__(self, clock: FakeClock, rate: float, capacity: float) -> None:
        self.clock = clock
        self.rate = rate
        self.tokens = capacity
        self.capacity = capacity
        self.at = clock.now
        self.accepted: list[int] = []
        self.refused = 0

    def request(self) -> bool:
        now = self.clock.now
        self.tokens = min(self.capacity, self.tokens + (now - self.at) / SECOND * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.accepted.append(now)
            return True
        self.refused += 1
        return False


@pytest.mark.parametrize(
    ("configured", "retry_after"),
    [(None, None), (None, 1.0), (900.0, 1.0), (900.0, None)],
)
def test_learning_an_unknown_rate_costs_few_throttles(
    clock: FakeClock, configured: float | None, retry_after: float | None
) -> None:
    # 60 calls, 4 ms each, against a server allowing 5 per second with a bucket of 4.
    server = TokenBucketServer(clock, rate=5, capacity=4)
    rate = RateLimit(configured if configured is not None else float("inf"), 1)
    limiter = RateLimiter(rate, MemoryBucketStore(clock), clock)
    backoff = 1.0
    for _ in range(60):
        while True:
            limiter.acquire()
            accepted = server.request()
            clock.advance(0.004)
            if accepted:
                break
            limiter.throttle(retry_after if retry_after is not None else backoff, adapt=True)
    ideal = (60 - 4) / 5 * SECOND
    span = server.accepted[-1] - server.accepted[0]
    assert server.refused <= 4
    assert span <= 1.25 * ideal


def test_a_bucket_states_values_follow_its_fields() -> None:
    state = BucketState(*range(1, len(BucketState.FIELDS) + 1))
    assert state.values() == tuple(getattr(state, name) for name in BucketState.FIELDS)
