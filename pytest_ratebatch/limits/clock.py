"""Time sources: the scheduler and the local stores read one monotonic clock and sleep on it."""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["MONOTONIC", "Clock", "MonotonicClock"]


class Clock(Protocol):
    """A monotonic clock in integer nanoseconds, and a sleep on the same time line."""

    def now_ns(self) -> int: ...

    def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    """``time.monotonic_ns``: system-wide on Linux, macOS and Windows, so processes agree."""

    now_ns = staticmethod(time.monotonic_ns)
    sleep = staticmethod(time.sleep)


MONOTONIC: Clock = MonotonicClock()
