"""The least time a policy imposes on a run: a greedy schedule with test durations of 0.

Every test starts as early as the token bucket, every sliding window and the batch barrier
allow, in run order; a test's run takes no time. The last start is then the least time the
policy alone imposes (the tests' own durations only add to it); the start times also tell
how many tests a total timeout would cancel, and how far along a run should be.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from ..limits.policy import NANOS_PER_SECOND, ExecutionPolicy, format_duration
from ..limits.values import Value

__all__ = [
    "Forecast",
    "describe_forecast",
    "forecast_json",
    "forecast_policy",
    "format_span",
    "policy_windows",
    "simulate",
]


class Forecast(Value):
    """The greedy schedule of a run.

    ``start_ns(i)``: the ``i``-th test's earliest start, in run order, in nanoseconds from
    the session's start (the bucket full); ``span_ns``: the last of them; ``cancelled``: the
    tests the total timeout would cancel (0 without one); ``costs``: each test's cost.
    ``schedule`` holds every start, or is empty when ``even`` says how they fall: unit costs
    on the bucket alone start ``burst`` at once, then one per ``interval``
    (``(burst, interval_ns)``), which needs no list at all.
    """

    __slots__ = ("cancelled", "costs", "even", "schedule", "span_ns")
    schedule: tuple[int, ...]
    even: tuple[int, int] | None
    costs: tuple[int, ...]
    span_ns: int
    cancelled: int

    def __init__(
        self,
        schedule: tuple[int, ...],
        costs: tuple[int, ...],
        cancelled: int = 0,
        even: tuple[int, int] | None = None,
    ) -> None:
        if even is not None:
            span = self._even_start(len(costs) - 1, even) if costs else 0
        else:
            span = max(schedule) if schedule else 0
        self._set(schedule=schedule, even=even, costs=costs, span_ns=span, cancelled=cancelled)

    @staticmethod
    def _even_start(index: int, even: tuple[int, int]) -> int:
        burst, interval = even
        return max(0, index + 1 - burst) * interval

    def start_ns(self, index: int) -> int:
        if self.even is not None:
            return self._even_start(index, self.even)
        return self.schedule[index]

    @property
    def starts_ns(self) -> tuple[int, ...]:
        """Every start, in run order."""
        if self.even is not None:
            return tuple(self.start_ns(index) for index in range(len(self.costs)))
        return self.schedule

    @property
    def tests(self) -> int:
        return len(self.costs)

    @property
    def cost(self) -> int:
        return sum(self.costs)

    @property
    def exempt(self) -> int:
        return self.costs.count(0)

    def left_after(self, started: int) -> int:
        """Nanoseconds the schedule needs after its ``started``-th start, to its last one."""
        if started <= 0:
            return self.span_ns
        if started >= len(self.costs):
            return 0
        return max(0, self.span_ns - self.start_ns(started - 1))


class _Window:
    """At most ``count`` cost starts in every sliding window of ``window_ns``."""

    __slots__ = ("count", "starts", "total", "window_ns")

    def __init__(self, count: int, window_ns: int) -> None:
        if count < 1 or window_ns < 1:
            raise ValueError(f"a window needs a count and a length >= 1, not {count}/{window_ns}")
        self.count = count
        self.window_ns = window_ns
        self.starts: deque[tuple[int, int]] = deque()  # (start, cost) still in a window
        self.total = 0

    def earliest(self, at: int, cost: int) -> int:
        """The earliest time >= ``at`` when ``cost`` more fits in the window ending then."""
        starts = self.starts
        while starts and starts[0][0] + self.window_ns <= at:
            self.total -= starts.popleft()[1]
        while starts and self.total + cost > self.count:
            start, old = starts.popleft()
            self.total -= old
            at = max(at, start + self.window_ns)
        return at

    def take(self, at: int, cost: int) -> None:
        self.starts.append((at, cost))
        self.total += cost


def simulate(
    costs: Sequence[int],
    *,
    interval_ns: int | None,
    burst: int,
    windows: Sequence[tuple[int, int]] = (),
    batch_size: int | None = None,
    backoff_ns: int = 0,
    deadline_ns: int | None = None,
) -> Forecast:
    """Schedule ``costs`` (in run order; 0: exempt) as early as the limits allow.

    ``interval_ns``: nanoseconds per token (``None``: no rate); ``burst``: the bucket's
    capacity; ``windows``: ``(count, window_ns)`` pairs, all held at once with the bucket;
    ``batch_size``/``backoff_ns``: batches of that many paced tests, each opening once the
    previous one finished (at its last start: durations are 0) and the backoff passed, and
    once the bucket holds the batch's cost (at most the burst); ``deadline_ns``: the total
    timeout, from which on nothing starts.
    """
    interval = interval_ns or 0
    unit_costs = interval and not windows and costs.count(1) == len(costs)
    if unit_costs and batch_size is None:
        # Unit costs on the bucket alone: the burst at once, then one per interval.
        count = len(costs)
        cancelled = 0
        if deadline_ns is not None:
            # The first start at or past the deadline, and every one after it.
            first_late = 0 if deadline_ns <= 0 else burst - 1 + -(-deadline_ns // interval)
            cancelled = max(0, count - first_late)
        return Forecast((), tuple(costs), cancelled, even=(burst, interval))
    if unit_costs and batch_size is not None and batch_size <= burst:
        starts = _batch_starts(len(costs), interval, burst, batch_size, backoff_ns)
    else:
        starts = _greedy(costs, interval, burst, windows, batch_size, backoff_ns)
    cancelled = 0
    if deadline_ns is not None:
        for position, start in enumerate(starts):
            if start >= deadline_ns:
                cancelled = len(starts) - position  # the session stops: nothing after starts
                break
    return Forecast(tuple(starts), tuple(costs), cancelled)


def _batch_starts(
    count: int, interval: int, burst: int, batch_size: int, backoff_ns: int
) -> list[int]:
    """``_greedy`` for unit costs in batches on the bucket alone, a batch at a time.

    A batch opens once the previous one started (its tests take no time) and the backoff
    passed, and once the bucket holds the batch's cost; a batch is never larger than the
    burst, so its other tests then find their tokens at once and start with it.
    """
    starts: list[int] = []
    tat = 0
    at = 0
    for first in range(0, count, batch_size):
        size = min(batch_size, count - first)
        opens = at + backoff_ns if first else 0
        ready = tat - (burst - size) * interval
        at = opens if opens > ready else ready
        tat = (tat if tat > at else at) + size * interval
        starts += [at] * size
    return starts


def _greedy(
    costs: Sequence[int],
    interval: int,
    burst: int,
    windows: Sequence[tuple[int, int]],
    batch_size: int | None,
    backoff_ns: int,
) -> list[int]:
    """Each test's earliest start in run order, one test at a time."""
    limits = [_Window(count, window_ns) for count, window_ns in windows]
    tat = 0  # GCRA's theoretical arrival time: the bucket is full at 0
    now = 0  # one process: a test starts no earlier than the one before it
    starts: list[int] = []
    paced = [index for index, cost in enumerate(costs) if cost]
    batch_of: dict[int, int] = {}  # the index of each batch's first test: the batch
    batch_cost: list[int] = []
    if batch_size is not None:
        for first in range(0, len(paced), batch_size):
            members = paced[first : first + batch_size]
            batch_of[members[0]] = len(batch_cost)
            batch_cost.append(sum([costs[index] for index in members]))
    # Comparisons rather than max() and min() in this loop: it runs once per test.
    for index, cost in enumerate(costs):
        if not cost:
            starts.append(now)
            continue
        at = now
        opens = batch_of.get(index) if batch_of else None
        if opens is not None:
            # The barrier (the previous batch's last start), the backoff, the batch's tokens.
            if opens:
                at += backoff_ns
            if interval:
                reserve = min(batch_cost[opens], burst)
                at = max(at, tat - (burst - reserve) * interval)
        if interval:
            earliest = tat - (burst - (cost if cost < burst else burst)) * interval
            if earliest > at:  # noqa: PLR1730
                at = earliest
        for limit in limits:
            at = limit.earliest(at, cost)
        if interval:
            tat = (tat if tat > at else at) + cost * interval
        for limit in limits:
            limit.take(at, cost)
        starts.append(at)
        now = at
    return starts


def policy_windows(policy: ExecutionPolicy) -> tuple[tuple[int, int], ...]:
    """The policy's sliding-window limits as ``(count, window_ns)`` pairs."""
    return tuple((window.count, window.window_ns) for window in policy.windows)


def forecast_policy(policy: ExecutionPolicy, costs: Sequence[int]) -> Forecast | None:
    """The forecast of ``costs`` (run order) under ``policy``; ``None`` without a rate (or
    with ``auto``) and without windows: nothing then bounds the run's pace."""
    rate = policy.rate_limit
    interval = rate.interval_ns if rate is not None and not rate.learned else None
    windows = policy_windows(policy)
    if not interval and not windows:
        return None
    timeout = policy.total_timeout
    return simulate(
        costs,
        interval_ns=interval,
        burst=rate.burst if rate is not None else 1,
        windows=windows,
        batch_size=policy.batch_size,
        backoff_ns=round(policy.batch_backoff * NANOS_PER_SECOND),
        deadline_ns=None if timeout is None else round(timeout * NANOS_PER_SECOND),
    )


def forecast_json(forecast: Forecast) -> dict[str, Any]:
    """The forecast as the JSON report states it."""
    return {
        "least": forecast.span_ns / NANOS_PER_SECOND,
        "tests": forecast.tests,
        "cost": forecast.cost,
        "cancelled": forecast.cancelled,
    }


def format_span(seconds: float) -> str:
    """A duration as the options spell it, rounded to what matters: ``4m55s``, ``2.5s``,
    ``0.004s``."""
    if seconds >= 10:
        return format_duration(float(round(seconds)))
    return format_duration(round(seconds, 1 if seconds >= 1 else 3))


def describe_forecast(
    forecast: Forecast,
    total_timeout: float | None = None,
    costs_known: bool = True,
    priorities: Sequence[int] | None = None,
) -> str:
    """The forecast line (without the ``ratebatch: forecast:`` prefix).

    ``300 tests take at least 4m55s by the policy (test durations add to it)``, plus what a
    shorter total timeout would cancel, and whether costs other than 1 were counted.
    """
    tests = forecast.tests
    noun = "test" if tests == 1 else "tests"
    text = f"{tests} {noun}"
    if forecast.exempt:
        text += f" ({forecast.exempt} exempt)"
    if forecast.cost != tests - forecast.exempt:
        text += f", cost {forecast.cost},"
    verb = "takes" if tests == 1 else "take"
    text += f" {verb} at least {format_span(forecast.span_ns / NANOS_PER_SECOND)} by the policy"
    text += " (test durations add to it)"
    if not costs_known:
        text += "; costs counted as 1 each (markers unknown here)"
    if total_timeout is not None and forecast.cancelled:
        text += (
            f"; the total timeout ({format_duration(total_timeout)}) passes first: "
            f"about {forecast.cancelled} {'test' if forecast.cancelled == 1 else 'tests'} "
            "will be cancelled"
        )
        if priorities:
            text += describe_cancelled_priorities(priorities[-forecast.cancelled :])
    return text


def describe_cancelled_priorities(priorities: Sequence[int]) -> str:
    """Which priorities the tests cancelled last in run order have: ``, all of priority 0``
    or ``: 150 of priority 0, 26 of priority 1`` (lowest first)."""
    counts: dict[int, int] = {}
    for priority in priorities:
        counts[priority] = counts.get(priority, 0) + 1
    if len(counts) == 1:
        return f", all of priority {next(iter(counts))}"
    return ": " + ", ".join(f"{counts[p]} of priority {p}" for p in sorted(counts))
