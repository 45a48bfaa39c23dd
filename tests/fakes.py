"""Test doubles: a clock whose sleeps advance time instantly."""

from __future__ import annotations


class FakeClock:
    """A monotonic clock in nanoseconds; ``sleep`` advances it and records the request."""

    def __init__(self, start_ns: int = 1_000_000_000_000) -> None:
        self.now = start_ns
        self.sleeps: list[float] = []

    def now_ns(self) -> int:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += round(seconds * 1_000_000_000)

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * 1_000_000_000)
