"""The calls to limited hosts: each call's record, each host's totals, and what the summary
and the JSON report say of them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..limits.policy import NANOS_PER_SECOND, format_duration, format_rate

if TYPE_CHECKING:
    from ..limits.calls import CallLimit
    from ..stores.base import Slot

__all__ = ["Call", "CallsSummary", "HostStats"]


class Call:
    """One request to a limited host: when it was admitted (ns since the session's start),
    how long it waited, its status, how often it was sent again after a throttle."""

    __slots__ = ("attempts", "host", "nodeid", "resent", "slot", "start_ns", "status", "wait_ns")

    def __init__(self, host: str, nodeid: str) -> None:
        self.host = host
        self.nodeid = nodeid
        self.start_ns = 0
        self.wait_ns = 0
        self.status = 0
        self.resent = 0
        self.attempts = 0
        self.slot: Slot | None = None

    def to_list(self) -> list[Any]:
        """What travels from an xdist worker: ``[nodeid, host, start, wait, status, resent]``."""
        return [self.nodeid, self.host, self.start_ns, self.wait_ns, self.status, self.resent]


def call_json(values: list[Any]) -> dict[str, Any]:
    """One call of ``Call.to_list`` as the JSON report lists it under its test."""
    _, host, start_ns, wait_ns, status, resent = values
    return {
        "host": host,
        "start": start_ns / NANOS_PER_SECOND,
        "wait": wait_ns / NANOS_PER_SECOND,
        "status": status,
        "resent": resent,
    }


class HostStats:
    """One limit's totals in this process (merged across xdist workers by the controller)."""

    FIELDS = (
        "calls",
        "throttled",
        "resent",
        "passed_on",
        "waited_ns",
        "waits",
        "first_ns",
        "last_ns",
    )
    __slots__ = ("bound", *FIELDS)

    def __init__(self) -> None:
        self.calls = 0  # requests admitted, re-sends included
        self.throttled = 0  # 429s (and 503s with Retry-After) received
        self.resent = 0  # of those, sent again by the pacer
        self.passed_on = 0  # of those, handed to the test (retries exhausted, a stream body)
        self.waited_ns = 0
        self.waits = 0  # admissions that waited
        self.first_ns = -1  # the first and last admission, ns since the session's start
        self.last_ns = -1
        #: How long each limit held calls back: its name (a window's ``describe``,
        #: ``pauses`` for a throttle's pause, ``auto`` for an auto limit's learnt rate, its
        #: pauses and published budget, ``concurrency``) -> ns.
        self.bound: dict[str, int] = {}

    def to_list(self) -> list[Any]:
        return [*(getattr(self, name) for name in self.FIELDS), dict(self.bound)]

    def merge(self, values: list[Any]) -> None:
        for name, value in zip(self.FIELDS, values, strict=False):
            if name == "first_ns":
                if value >= 0 and (self.first_ns < 0 or value < self.first_ns):
                    self.first_ns = value
            elif name == "last_ns":
                self.last_ns = max(self.last_ns, value)
            else:
                setattr(self, name, getattr(self, name) + value)
        for name, waited in values[len(self.FIELDS)].items():
            self.bound[name] = self.bound.get(name, 0) + waited

    def achieved_per_minute(self) -> float | None:
        """Calls per minute from the first admission to the last (``None``: under two)."""
        span = self.last_ns - self.first_ns
        if self.calls < 2 or span <= 0:
            return None
        return (self.calls - 1) * 60 * NANOS_PER_SECOND / span


class CallsSummary:
    """Every call limit's totals and, for a JSON report, each test's calls."""

    def __init__(self, limits: tuple[CallLimit, ...], keep_calls: bool) -> None:
        self.limits = limits
        self.hosts: dict[str, HostStats] = {}
        self.calls: list[list[Any]] | None = [] if keep_calls else None
        #: Each test's calls per limit (node id -> pattern -> count), re-sends not counted.
        self.counts: dict[str, dict[str, int]] = {}

    def add(
        self,
        hosts: dict[str, list[Any]],
        calls: list[list[Any]],
        counts: dict[str, dict[str, int]] | None = None,
    ) -> None:
        """One process's totals (``HostStats.to_list`` by pattern), calls and counts."""
        for pattern, values in hosts.items():
            self.hosts.setdefault(pattern, HostStats()).merge(values)
        if self.calls is not None:
            self.calls.extend(calls)
        for nodeid, made in (counts or {}).items():
            mine = self.counts.setdefault(nodeid, {})
            for pattern, count in made.items():
                mine[pattern] = mine.get(pattern, 0) + count

    def by_test(self) -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = {}
        for values in sorted(self.calls or (), key=lambda values: values[2]):
            found.setdefault(values[0], []).append(call_json(values))
        return found

    def lines(self) -> list[str]:
        """One summary line per limit, ``calls to HOST (LIMITS): ...``."""
        lines = []
        for limit in self.limits:
            stats = self.hosts.get(limit.pattern)
            head = f"calls to {limit.text.replace('=', ' (', 1)})"
            if stats is None or not stats.calls:
                lines.append(f"{head}: none")
                continue
            parts = [_count(stats.calls, "call")]
            achieved = stats.achieved_per_minute()
            if achieved is not None:
                span = (stats.last_ns - stats.first_ns) / NANOS_PER_SECOND
                parts[0] += f" in {format_duration(round(span, 2))} ({format_rate(achieved)})"
            if stats.waits:
                waited = format_duration(round(stats.waited_ns / NANOS_PER_SECOND, 2))
                bound = max(stats.bound, key=lambda name: stats.bound[name], default="")
                by = f", mostly for {bound}" if bound else ""
                parts.append(f"{stats.waits} waited {waited} in all{by}")
            if stats.throttled:
                text = f"{_count(stats.throttled, 'throttle')}: {stats.resent} re-sent"
                if stats.passed_on:
                    text += f", {stats.passed_on} passed to the test"
                parts.append(text)
            else:
                parts.append("0 throttled")
            lines.append(f"{head}: {', '.join(parts)}")
        return lines

    def attention(self) -> str:
        """Throttles handed to tests, for ``-qq``'s one line (empty: none)."""
        passed = sum(stats.passed_on for stats in self.hosts.values())
        return f"{passed} throttled calls passed to tests" if passed else ""

    def to_json(self) -> dict[str, Any]:
        hosts = {}
        for limit in self.limits:
            stats = self.hosts.get(limit.pattern) or HostStats()
            hosts[limit.pattern] = {
                "limit": limit.text,
                "calls": stats.calls,
                "throttled": stats.throttled,
                "resent": stats.resent,
                "passed_on": stats.passed_on,
                "waits": stats.waits,
                "waited": stats.waited_ns / NANOS_PER_SECOND,
                "first": stats.first_ns / NANOS_PER_SECOND if stats.first_ns >= 0 else None,
                "last": stats.last_ns / NANOS_PER_SECOND if stats.last_ns >= 0 else None,
                "achieved_per_minute": stats.achieved_per_minute(),
                "bound": {name: waited / NANOS_PER_SECOND for name, waited in stats.bound.items()},
            }
        return hosts


def _count(number: int, word: str) -> str:
    return f"{number} {word}" if number == 1 else f"{number} {word}s"
