"""``RateLimiter``: a token bucket that reserves a slot atomically, then sleeps until it."""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

from ..limits.clock import MONOTONIC, Clock
from ..limits.gcra import ADMITTED, OVERTAKEN, REFUSED, Outcome
from ..limits.policy import NANOS_PER_SECOND, RateLimit, WindowLimit
from ..limits.values import Value
from ..stores.base import BucketStore
from ..stores.memory import MemoryBucketStore

if TYPE_CHECKING:
    from ..limits.windows import Windows

__all__ = ["UNLIMITED", "WINDOW_MARGIN_NS", "Admission", "RateLimiter"]

OnWait = Callable[[float], None]


#: How much longer than stated each window is kept: a request reaches the server a little
#: after its test was admitted, and by a varying delay (set-up, connecting; a process's first
#: request was measured up to 22 ms later than others on a loaded machine). Without it, two
#: requests admitted a window apart could arrive closer together than that.
WINDOW_MARGIN_NS = 50_000_000

#: The bucket of a session without a rate: no rate of its own, there to carry a throttle's
#: pause to everyone and to order the starts that window limits hold (any burst: without a
#: rate it only bounds a single request).
UNLIMITED = RateLimit(math.inf, 2**31)


class Admission(Value):
    """Tokens taken: when on the store's clock (the slot, if reserve-only), and the time
    spent sleeping for them on the limiter's clock."""

    __slots__ = ("at_ns", "tokens", "waited_ns")
    tokens: int
    at_ns: int
    waited_ns: int

    def __init__(self, tokens: int, at_ns: int, waited_ns: int) -> None:
        self._set(tokens=tokens, at_ns=at_ns, waited_ns=waited_ns)


class RateLimiter:
    """GCRA token bucket over a ``BucketStore``, on an injectable clock.

    ``acquire`` reserves its slot in one atomic store operation, so waiters are served in
    the order they arrived, then sleeps outside any lock exactly until the slot (a waiter
    woken so late that it was overtaken queues again, see ``gcra.overtaken``). Asking for
    more tokens than the burst raises ``ValueError``: no wait could ever admit such a request
    within the bound, and spinning forever would hide the mistake.
    """

    def __init__(
        self,
        rate_limit: RateLimit,
        store: BucketStore | None = None,
        clock: Clock = MONOTONIC,
        windows: tuple[WindowLimit, ...] = (),
        window_margin_ns: int = WINDOW_MARGIN_NS,
    ) -> None:
        self.rate_limit = rate_limit
        self.store: BucketStore = store if store is not None else MemoryBucketStore(clock)
        self._clock = clock
        #: How a waiter sleeps until its reserved moment: the clock's sleep, or one that ends
        #: early by raising when the wait is called off (``TaskScheduler``: the session stopped).
        self.sleep: Callable[[float], None] = clock.sleep
        self._interval = rate_limit.interval_ns
        self._burst = rate_limit.burst
        self.windows = windows
        self._windows: Windows = tuple(
            (window.count, window.window_ns + window_margin_ns) for window in windows
        )
        #: The most one request may take: the burst, or the smallest window.
        self.largest = min([rate_limit.burst] + [window.count for window in windows])
        #: Each limit's name: the bucket's (``windows.RATE``), then each window's.
        # Without a rate of its own the bucket only carries the pauses after throttles.
        bucket = "pauses" if rate_limit is UNLIMITED else "rate"
        self.limit_names = (bucket, *(window.describe() for window in windows))
        #: The limit that set the latest sleep (an index into ``limit_names``).
        self.last_bound = 0  # windows.RATE
        if windows:  # the stores' windowed operations; without windows the lean ones
            self._store_take = self._take_windowed
            self._store_commit = self._commit_windowed
        else:
            self._store_take = self._take_plain
            self._store_commit = self._commit_plain

    def _take_plain(self, tokens: int, max_wait: int | None, admit: bool) -> Outcome:
        return self.store.take(tokens, self._interval, self._burst, max_wait, admit)

    def _commit_plain(self, tokens: int, slot: int | None) -> Outcome:
        return self.store.commit(tokens, self._interval, self._burst, slot)

    def _take_windowed(self, tokens: int, max_wait: int | None, admit: bool) -> Outcome:
        status, now, wait, self.last_bound = self.store.take_windowed(
            tokens, self._interval, self._burst, max_wait, admit, self._windows
        )
        return status, now, wait

    def _commit_windowed(self, tokens: int, slot: int | None) -> Outcome:
        status, now, wait, self.last_bound = self.store.commit_windowed(
            tokens, self._interval, self._burst, slot, self._windows
        )
        return status, now, wait

    def admit(
        self,
        tokens: int = 1,
        *,
        timeout: float | None = None,
        reserve_only: bool = False,
        on_wait: OnWait | None = None,
    ) -> Admission | None:
        """Take ``tokens``, sleeping as long as needed; ``None`` if that exceeds ``timeout``.

        ``on_wait(seconds)`` is called before each sleep. With ``reserve_only`` the tokens
        hold a place in line but are not admitted: the caller ``commit``s them later.
        """
        if type(tokens) is not int or not 0 < tokens <= self.largest:
            self._check(tokens)
            return Admission(0, self._clock.now_ns(), 0)
        max_wait = None if timeout is None else max(0, int(timeout * NANOS_PER_SECOND))
        status, now, wait = self._store_take(tokens, max_wait, not reserve_only)
        if status == ADMITTED:
            return Admission(tokens, now, 0)
        if status == REFUSED:
            return None
        return self._wait_for_slot(tokens, now, wait, reserve_only, on_wait, max_wait)

    def take(
        self, tokens: int, max_wait_ns: int | None = None, on_wait: OnWait | None = None
    ) -> int | None:
        """Take ``tokens`` (1 to the burst), sleeping as needed; the admission time on the
        store's clock, or ``None`` (taking nothing) if that would take more than ``max_wait_ns``.

        ``admit`` without the ``Admission`` record: the scheduler's path for every test, whose
        cost was checked once, when its marker was read.
        """
        if not 0 < tokens <= self.largest:
            self._check(tokens)
            raise ValueError(f"tokens must be at least 1, not {tokens!r}")
        if self._windows:
            status, now, wait = self._take_windowed(tokens, max_wait_ns, True)
        else:  # the hot path of every test: the store directly
            status, now, wait = self.store.take(
                tokens, self._interval, self._burst, max_wait_ns, True
            )
        if status == ADMITTED:
            return now
        if status == REFUSED:
            return None
        admission = self._wait_for_slot(tokens, now, wait, False, on_wait, max_wait_ns)
        return None if admission is None else admission.at_ns

    def take_within(
        self, tokens: int, within_ns: int, on_wait: OnWait | None = None
    ) -> tuple[int | None, int]:
        """``take`` only if the tokens are due within ``within_ns`` (sleeping until they are):
        ``(admission time, 0)``; else, taking nothing, ``(None, how long until they are)``."""
        if not 0 < tokens <= self.largest:
            self._check(tokens)
            raise ValueError(f"tokens must be at least 1, not {tokens!r}")
        status, now, wait = self._store_take(tokens, within_ns, True)
        if status == ADMITTED:
            return now, 0
        if status == REFUSED:
            return None, wait
        admission = self._wait_for_slot(tokens, now, wait, False, on_wait, within_ns)
        if admission is None:  # woken late and overtaken: nothing taken, ask again
            return self.take_within(tokens, within_ns, on_wait)
        return admission.at_ns, 0

    def _wait_for_slot(
        self,
        tokens: int,
        now: int,
        wait: int,
        reserve_only: bool,
        on_wait: OnWait | None,
        max_wait: int | None = None,
    ) -> Admission | None:
        started = self._clock.now_ns()
        if reserve_only:
            self._sleep(wait, on_wait)
            return Admission(tokens, now + wait, self._clock.now_ns() - started)
        waits = self._slot_waits(tokens, now + wait, wait, max_wait)
        try:
            while True:
                self._sleep(next(waits), on_wait)
        except StopIteration as done:
            at_ns: int | None = done.value
        return None if at_ns is None else Admission(tokens, at_ns, self._clock.now_ns() - started)

    def _slot_waits(
        self, tokens: int, slot: int, wait: int, max_wait: int | None
    ) -> Generator[int, None, int | None]:
        """The sleeps (ns) until reserved tokens are admitted at ``slot``, for a sync or an
        async waiter alike; returns the admission time, or ``None`` past ``max_wait``."""
        started = self._clock.now_ns()
        yield wait
        while True:
            status, now, wait = self._store_commit(tokens, slot)
            if status == ADMITTED:
                return now
            left = None if max_wait is None else max(0, max_wait - (self._clock.now_ns() - started))
            if status == OVERTAKEN:
                # Woken too late: a later waiter took this admission. Queue again.
                status, now, wait = self._store_take(tokens, left, True)
                if status == ADMITTED:
                    return now
                if status == REFUSED:
                    return None
                slot = now + wait
            elif left is not None and wait > left:
                return None  # the retry would end after the timeout
            yield wait

    def _reserve(self, tokens: int, max_wait: int | None) -> tuple[int, int, int, int]:
        """``take`` in the store, with the limit that set the wait (``windows.RATE`` or a
        window's index + 1) from the store's own answer: ``last_bound`` is this limiter's,
        and another thread or task may set it first."""
        if self._windows:
            return self.store.take_windowed(
                tokens, self._interval, self._burst, max_wait, True, self._windows
            )
        status, now, wait = self.store.take(tokens, self._interval, self._burst, max_wait, True)
        return status, now, wait, 0

    def take_bound(self, tokens: int = 1) -> int:
        """Take ``tokens`` (1 to the largest), sleeping as needed; the limit that made it
        wait (an index into ``limit_names``), or -1 if it did not."""
        if type(tokens) is not int or not 0 < tokens <= self.largest:
            self._check(tokens)
            raise ValueError(f"tokens must be at least 1, not {tokens!r}")
        status, now, wait, bound = self._reserve(tokens, None)
        if status == ADMITTED:
            return -1
        self._wait_for_slot(tokens, now, wait, False, None)
        return bound

    async def acquire_async(
        self, tokens: int = 1, on_wait: OnWait | None = None, max_wait_ns: int | None = None
    ) -> int | None:
        """``take`` for a coroutine: waits with ``await asyncio.sleep``, so the event loop
        keeps running. The admission time on the store's clock, or ``None`` (taking nothing)
        if that would take more than ``max_wait_ns``."""
        at_ns, _ = await self.take_bound_async(tokens, on_wait, max_wait_ns)
        return at_ns

    async def take_bound_async(
        self, tokens: int = 1, on_wait: OnWait | None = None, max_wait_ns: int | None = None
    ) -> tuple[int | None, int]:
        """``acquire_async``, and the limit that made it wait (as ``take_bound``)."""
        import asyncio

        if type(tokens) is not int or not 0 < tokens <= self.largest:
            self._check(tokens)
            raise ValueError(f"tokens must be at least 1, not {tokens!r}")
        status, now, wait, bound = self._reserve(tokens, max_wait_ns)
        if status == ADMITTED:
            return now, -1
        if status == REFUSED:
            return None, bound
        waits = self._slot_waits(tokens, now + wait, wait, max_wait_ns)
        try:
            while True:
                wait = next(waits)
                if wait > 0:
                    seconds = wait / NANOS_PER_SECOND
                    if on_wait is not None:
                        on_wait(seconds)
                    await asyncio.sleep(seconds)
        except StopIteration as done:
            at_ns: int | None = done.value
        return at_ns, bound

    def _check(self, tokens: object) -> None:
        """Raise for anything but a whole number of tokens within the burst (0 is allowed)."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens must be a whole number >= 0, not {tokens!r}")
        if tokens > self.largest:
            bound = "the burst" if self.largest == self._burst else "the smallest window"
            raise ValueError(
                f"{tokens} tokens exceed {bound} ({self.largest}): a request that large "
                "could never start within the limits"
            )

    def commit(self, tokens: int, *, on_wait: OnWait | None = None) -> int:
        """Admit tokens reserved with ``reserve_only``; returns the admission time."""
        if type(tokens) is not int or not 0 < tokens <= self.largest:
            self._check(tokens)
            return self._clock.now_ns()
        windowed = bool(self._windows)
        while True:
            if windowed:
                status, now, wait = self._commit_windowed(tokens, None)
            else:  # every batch member's path: the store directly
                status, now, wait = self.store.commit(tokens, self._interval, self._burst)
            if status == ADMITTED:
                return now
            self._sleep(wait, on_wait)

    def _sleep(self, wait_ns: int, on_wait: OnWait | None) -> None:
        if wait_ns <= 0:
            return
        seconds = wait_ns / NANOS_PER_SECOND
        if on_wait is not None:
            on_wait(seconds)
        self.sleep(seconds)

    def acquire(self, tokens: int = 1, timeout: float | None = None) -> bool:
        """Block until ``tokens`` are taken; ``False``, taking nothing, if that would exceed
        ``timeout`` seconds."""
        if timeout is None and type(tokens) is int and 0 < tokens <= self.largest:
            # The common case, kept lean: one store call, no allocation when admitted.
            status, now, wait = self._store_take(tokens, None, True)
            if status != ADMITTED:
                self._wait_for_slot(tokens, now, wait, False, None)
            return True
        return self.admit(tokens, timeout=timeout) is not None

    def try_acquire(self, tokens: int = 1) -> bool:
        """Take ``tokens`` only if no wait is needed."""
        return self.admit(tokens, timeout=0) is not None

    def throttle(self, wait: float, adapt: bool) -> tuple[int, int, int, int]:
        """The server throttled a test: pause everyone sharing the bucket for ``wait`` seconds
        and, with ``adapt``, lower the rate (``limits.bucket``). Returns the store's clock,
        the interval before and after, and the pause's end (on the store's clock)."""
        wait_ns = max(0, int(wait * NANOS_PER_SECOND))
        return self.store.throttle(wait_ns, self._interval, self._burst, adapt)

    @property
    def available_tokens(self) -> float:
        """Tokens that could be taken right now without waiting."""
        return self.store.level(self._interval, self._burst, self._windows)
