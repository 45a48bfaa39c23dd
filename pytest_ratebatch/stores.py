"""Where the bucket lives. A store makes each operation on one ``BucketState`` atomic.

The limiter never knows which store it has: the in-memory store serves one process, the
file store the workers of one pytest-xdist session, the Redis store several sessions.
Each store reads its own clock, so a shared store can use a clock all its clients share.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol

from . import gcra
from .clock import MONOTONIC, Clock
from .gcra import ADMITTED, Outcome
from .throttle.adapt import UNSET, BucketState, current_interval, throttle

if TYPE_CHECKING:  # loaded with the first window limit: a session without one never needs it
    from .windows import WindowedOutcome, WindowLog, Windows

__all__ = ["BucketStore", "MemoryBucketStore", "StoreError"]


class StoreError(RuntimeError):
    """The store cannot be reached or used; the message says which store and why."""


class BucketStore(Protocol):
    """Atomic operations on one token bucket (see ``gcra`` for their meaning).

    Operations may raise ``StoreError`` when the store cannot be used.
    """

    #: Whether the times in outcomes are this machine's monotonic clock (else the store's own).
    local_clock: bool

    def take(
        self, cost: int, interval_ns: int, burst: int, max_wait_ns: int | None, admit: bool
    ) -> Outcome: ...

    def commit(
        self, cost: int, interval_ns: int, burst: int, slot_ns: int | None = None
    ) -> Outcome:
        """Admit reserved tokens. Given the waiter's ``slot_ns`` (its admission time as
        reserved), a refusal is ``OVERTAKEN`` if a later waiter took that admission (judged
        with the interval in force, which only the store knows once it has adapted)."""
        ...

    def take_windowed(
        self,
        cost: int,
        interval_ns: int,
        burst: int,
        max_wait_ns: int | None,
        admit: bool,
        windows: Windows,
    ) -> WindowedOutcome:
        """``take`` under window limits too (``windows``): the outcome says which limit set
        the wait (``windows.RATE`` for the bucket, else the window's index + 1)."""
        ...

    def commit_windowed(
        self, cost: int, interval_ns: int, burst: int, slot_ns: int | None, windows: Windows
    ) -> WindowedOutcome:
        """``commit`` under window limits too."""
        ...

    def level(self, interval_ns: int, burst: int, windows: Windows = ()) -> float: ...

    def throttle(
        self, wait_ns: int, interval_ns: int, burst: int, adapt: bool
    ) -> tuple[int, int, int, int]:
        """A throttle: pause the bucket for ``wait_ns`` and, with ``adapt``, adapt its rate
        (``throttle.adapt``). Returns the store's clock, the interval before and after, and
        the pause's end."""
        ...

    def describe(self) -> str:
        """A name safe to print (no credentials)."""
        ...


class MemoryBucketStore:
    """A bucket in this process, safe to share between threads."""

    local_clock = True

    def __init__(self, clock: Clock = MONOTONIC) -> None:
        self._now = clock.now_ns
        self._lock = threading.Lock()
        self._state = BucketState()
        self._windows: dict[Windows, list[WindowLog]] = {}

    def take(
        self, cost: int, interval_ns: int, burst: int, max_wait_ns: int | None, admit: bool
    ) -> Outcome:
        with self._lock:
            now = self._now()
            state = self._state
            if state.interval != UNSET:
                interval_ns = current_interval(state, now, interval_ns)
            state.reserved, state.admitted, status, wait = gcra.take(
                state.reserved, state.admitted, now, cost, interval_ns, burst, max_wait_ns, admit
            )
            if status == ADMITTED:
                state.count += cost
        return status, now, wait

    def commit(
        self, cost: int, interval_ns: int, burst: int, slot_ns: int | None = None
    ) -> Outcome:
        with self._lock:
            now = self._now()
            state = self._state
            if state.interval != UNSET:
                interval_ns = current_interval(state, now, interval_ns)
            state.reserved, state.admitted, status, wait = gcra.commit(
                state.reserved, state.admitted, now, cost, interval_ns, burst, slot_ns
            )
            if status == ADMITTED:
                state.count += cost
        return status, now, wait

    def _logs(self, windows: Windows) -> list[WindowLog]:
        logs = self._windows.get(windows)
        if logs is None:
            from .windows import WindowLog

            logs = self._windows[windows] = [WindowLog(*window) for window in windows]
        return logs

    def take_windowed(
        self,
        cost: int,
        interval_ns: int,
        burst: int,
        max_wait_ns: int | None,
        admit: bool,
        windows: Windows,
    ) -> WindowedOutcome:
        from .windows import take_state

        with self._lock:
            return take_state(
                self._state, self._logs(windows), self._now(), cost, interval_ns, burst,
                max_wait_ns, admit,
            )  # fmt: skip

    def commit_windowed(
        self, cost: int, interval_ns: int, burst: int, slot_ns: int | None, windows: Windows
    ) -> WindowedOutcome:
        from .windows import commit_state

        with self._lock:
            return commit_state(
                self._state, self._logs(windows), self._now(), cost, interval_ns, burst, slot_ns
            )

    def level(self, interval_ns: int, burst: int, windows: Windows = ()) -> float:
        with self._lock:
            state = self._state
            now = self._now()
            interval_ns = current_interval(state, now, interval_ns)
            tokens = gcra.level(state.reserved, state.admitted, now, interval_ns, burst)
            for log in self._logs(windows) if windows else ():
                tokens = min(tokens, log.free(now))
            return tokens

    def throttle(
        self, wait_ns: int, interval_ns: int, burst: int, adapt: bool
    ) -> tuple[int, int, int, int]:
        with self._lock:
            now = self._now()
            return (now, *throttle(self._state, now, wait_ns, interval_ns, burst, adapt))

    def describe(self) -> str:
        return "memory"
