"""Where a run stands while it waits for the limiter, and how long it has left.

Pure arithmetic on counts and nanoseconds: the plugin feeds in the tests started so far and
the clock; the forecast's schedule, corrected by how far behind it the run is, gives the
time left.
"""

from __future__ import annotations

from ..limits.policy import NANOS_PER_SECOND, format_rate
from .forecast import Forecast, format_span

__all__ = ["LinePace", "Progress", "with_time_left"]


class Progress:
    """A run's progress: ``describe`` says ``40/300 started, 59.8/min, 4m20s left``.

    Time left is the forecast's time from the current start to its last one, stretched by
    how much slower than its schedule the run went so far (slow tests, a lowered rate);
    pauses already over are not held against the rest. Without a forecast it is the tests
    left at the rate achieved so far.
    """

    def __init__(
        self, total: int, forecast: Forecast | None, start_ns: int, burst: int = 0
    ) -> None:
        self.total = total
        self.forecast = forecast
        self.start_ns = start_ns
        self.burst = burst  # started at once: not part of the rate achieved

    def left_ns(self, started: int, now_ns: int, paused_ns: int = 0) -> int | None:
        """Nanoseconds left by the forecast corrected with what happened; ``None``: unknown."""
        if started >= self.total:
            return 0
        elapsed = max(0, now_ns - self.start_ns - paused_ns)
        forecast = self.forecast
        if forecast is not None and forecast.tests == self.total:
            ahead = forecast.left_after(started)
            planned = forecast.start_ns(started - 1) if started > 0 else 0
            if planned > 0 and elapsed > planned:
                return round(ahead * elapsed / planned)
            return ahead
        if started <= 0 or elapsed <= 0:
            return None
        return round((self.total - started) * elapsed / started)

    def per_minute(self, started: int, now_ns: int) -> float | None:
        """Tests started per minute beyond the first burst (``None`` within it)."""
        elapsed = now_ns - self.start_ns
        beyond = started - self.burst
        if beyond <= 0 or elapsed <= 0:
            return None
        return beyond * 60 * NANOS_PER_SECOND / elapsed

    def describe(self, started: int, now_ns: int, paused_ns: int = 0) -> str:
        text, left = self.describe_parts(started, now_ns, paused_ns)
        return with_time_left(text, left)

    def describe_parts(
        self, started: int, now_ns: int, paused_ns: int = 0
    ) -> tuple[str, int | None]:
        """``40/300 started, 59.8/min`` and the nanoseconds left (``None``: unknown)."""
        parts = [f"{started}/{self.total} started"]
        rate = self.per_minute(started, now_ns)
        if rate is not None:
            parts.append(format_rate(rate))
        return ", ".join(parts), self.left_ns(started, now_ns, paused_ns)


def with_time_left(text: str, left_ns: int | None) -> str:
    """``text`` and the time left, if known: ``40/300 started, 60/min, 4m20s left``."""
    if left_ns is None:
        return text
    return f"{text}, {format_span(max(0, left_ns) / NANOS_PER_SECOND)} left"


class LinePace:
    """At most one line per ``every_ns``: for logs, where lines cannot be updated in place."""

    def __init__(self, every_ns: int) -> None:
        self.every_ns = every_ns
        self._last: int | None = None

    def due(self, now_ns: int) -> bool:
        """Whether a line may be written now (and if so, it counts as written)."""
        if self._last is not None and now_ns - self._last < self.every_ns:
            return False
        self._last = now_ns
        return True
