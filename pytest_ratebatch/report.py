"""What happened to each test, the session's totals, the JSON report, and the G1 check.

Pure data and arithmetic: the plugin fills ``TestRecord``s from pytest's reports.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .policy import NANOS_PER_SECOND, ExecutionPolicy, format_duration

__all__ = [
    "CANCELLED_PREFIX",
    "Summary",
    "TestRecord",
    "describe_summary",
    "merge_outcome",
    "summarize",
    "worst_excess",
    "write_report",
]

CANCELLED_PREFIX = "ratebatch: cancelled"
REPORT_FORMAT = 1

# How bad an outcome is, to merge the reports of a test's phases into one outcome.
_SEVERITY = {
    "": 0,
    "passed": 1,
    "xpassed": 2,
    "skipped": 3,
    "xfailed": 3,
    "cancelled": 4,
    "error": 5,
    "failed": 6,
}


def merge_outcome(current: str, when: str, outcome: str, xfail: bool) -> str:
    """Fold one phase's report (``when``, pytest ``outcome``) into the test's outcome."""
    if xfail:
        phase = "xfailed" if outcome == "skipped" else "xpassed" if outcome == "passed" else outcome
    elif outcome == "failed" and when in ("setup", "teardown"):
        phase = "error"
    else:
        phase = outcome
    return phase if _SEVERITY.get(phase, 1) > _SEVERITY.get(current, 1) else current


@dataclass
class TestRecord:
    """One test. Times are nanoseconds since the session started, on the monotonic clock."""

    __test__ = False  # not a test class, whatever pytest's collection rules say

    nodeid: str
    outcome: str = ""  # passed, failed, error, skipped, xfailed, xpassed, cancelled, not run
    batch: int = 0
    tokens: int = 0
    waited_ns: int = 0
    start_ns: int | None = None
    finish_ns: int | None = None
    reason: str = ""  # for a cancelled test: why
    worker: str = ""
    store_ns: int | None = None  # the admission on a shared store's own clock (Redis)
    #: Tokens taken while running (the ``ratebatch`` fixture): ``[start_ns, tokens, store_ns]``.
    acquired: list[list[int | None]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.outcome in ("failed", "error")

    def to_json(self, session_wall: float) -> dict[str, Any]:
        data = asdict(self)
        for key in ("start", "finish"):
            offset = data[f"{key}_ns"]
            data[f"{key}ed_at" if key == "start" else "finished_at"] = (
                None if offset is None else _iso(session_wall + offset / NANOS_PER_SECOND)
            )
        data["waited"] = self.waited_ns / NANOS_PER_SECOND
        return data


def _burst(policy: ExecutionPolicy) -> int:
    return policy.rate_limit.burst if policy.rate_limit is not None else 0


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Summary:
    run: int
    cancelled: int
    not_run: int
    batches: int
    waited_ns: int
    longest_wait_ns: int
    first_start_ns: int | None
    last_start_ns: int | None
    started_cost: int

    def sustained_per_minute(self, burst: int) -> float | None:
        """``(cost started - burst) / span of starts``, per minute; ``None`` if undefined.

        G1 bounds the cost started in the span by ``burst + rate * span``, so this figure
        never exceeds the configured rate: it is the rate the session kept up after its burst.
        """
        if self.first_start_ns is None or self.last_start_ns is None:
            return None
        span = self.last_start_ns - self.first_start_ns
        if span <= 0 or self.started_cost <= burst:
            return None
        return (self.started_cost - burst) * 60 * NANOS_PER_SECOND / span


def summarize(records: Iterable[TestRecord]) -> Summary:
    run = cancelled = not_run = waited = longest = 0
    batches: set[int] = set()
    cost = 0
    cost_by_start: dict[int, int] = {}
    for record in records:
        waited += record.waited_ns
        longest = max(longest, record.waited_ns)
        if record.outcome == "cancelled":
            cancelled += 1
        elif record.start_ns is None:
            not_run += 1
        else:
            run += 1
            cost += record.tokens
            cost_by_start[record.start_ns] = cost_by_start.get(record.start_ns, 0) + record.tokens
            if record.batch:
                batches.add(record.batch)
    first = min(cost_by_start, default=None)
    last = max(cost_by_start, default=None)
    return Summary(run, cancelled, not_run, len(batches), waited, longest, first, last, cost)


def worst_excess(starts: Sequence[tuple[int, int]], interval_ns: int, burst: int) -> float:
    """The worst excess, in tokens, of G1's bound over every window of the given starts.

    ``starts`` holds ``(start_ns, cost)``. For every window ``[t_i, t_j]`` between two starts,
    the cost started in it may be at most ``burst + (t_j - t_i) / interval``; the result is
    ``max(cost - bound)``, so a value <= 0 means the bound held everywhere. The arithmetic
    is exact (integers, scaled by the interval) until the final division.
    """
    by_time: dict[int, int] = {}
    for start, cost in starts:
        by_time[start] = by_time.get(start, 0) + cost
    if not by_time:
        return float(-burst)
    # With P(t) the cost started up to and including t, a window [t_i, t_j] has
    #   excess * interval = (P(t_j) * interval - t_j) + (t_i - P(<t_i) * interval) - burst*interval
    # so one pass keeps the best opening term for every closing time.
    worst: int | None = None
    started = 0
    best_opening: int | None = None
    for time in sorted(by_time):
        opening = time - started * interval_ns
        best_opening = opening if best_opening is None else max(best_opening, opening)
        started += by_time[time]
        excess = started * interval_ns - time + best_opening - burst * interval_ns
        worst = excess if worst is None else max(worst, excess)
    assert worst is not None
    return worst / interval_ns


def write_report(
    path: Path,
    policy: ExecutionPolicy,
    records: Sequence[TestRecord],
    *,
    stop_reason: str,
    store: str,
    session_wall: float,
    duration_ns: int,
) -> None:
    """Write the JSON report atomically (a reader never sees half a file)."""
    summary = summarize(records)
    data = {
        "format": REPORT_FORMAT,
        "policy": policy.to_json(),
        "store": store,
        "session": {
            "started_at": _iso(session_wall),
            "duration": duration_ns / NANOS_PER_SECOND,
            "stop_reason": stop_reason,
        },
        "summary": {
            "run": summary.run,
            "cancelled": summary.cancelled,
            "not_run": summary.not_run,
            "batches": summary.batches,
            "waited": summary.waited_ns / NANOS_PER_SECOND,
            "longest_wait": summary.longest_wait_ns / NANOS_PER_SECOND,
            "sustained_per_minute": summary.sustained_per_minute(_burst(policy)),
        },
        "tests": [record.to_json(session_wall) for record in records],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", delete=False, encoding="utf-8"
    ) as handle:
        json.dump(data, handle, indent=1)
        handle.write("\n")
    os.replace(handle.name, path)


def describe_summary(policy: ExecutionPolicy, summary: Summary, stop_reason: str) -> list[str]:
    """The lines of the terminal summary section."""
    lines = [f"policy: {policy.describe()}"]
    tests = f"tests: {summary.run} run, {summary.cancelled} cancelled"
    if summary.not_run:
        tests += f", {summary.not_run} not run"
    if policy.batch_size is not None:
        tests += f", in {summary.batches} batches"
    lines.append(tests)
    lines.append(
        f"waited: {format_duration(round(summary.waited_ns / NANOS_PER_SECOND, 3))} in total, "
        f"longest {format_duration(round(summary.longest_wait_ns / NANOS_PER_SECOND, 3))}"
    )
    sustained = summary.sustained_per_minute(_burst(policy))
    if sustained is not None:
        lines.append(
            f"sustained rate: {sustained:.1f}/min (cost started beyond the burst, "
            "over the span of starts)"
        )
    lines.append(f"stop: {stop_reason or 'none, every test was started'}")
    return lines
