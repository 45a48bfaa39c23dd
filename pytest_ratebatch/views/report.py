"""What happened to each test, the session's totals, the JSON report, and the G1 check.

Pure data and arithmetic: the plugin fills ``TestRecord``s from pytest's reports.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..limits.policy import NANOS_PER_SECOND, ExecutionPolicy, format_duration, format_rate

__all__ = [
    "CANCELLED_PREFIX",
    "REPORT_FORMAT",
    "Tally",
    "TestRecord",
    "build_report",
    "describe_limits",
    "describe_pace",
    "describe_report",
    "describe_summary",
    "describe_throttling",
    "describe_waits",
    "json_limit_names",
    "limit_names",
    "merge_outcome",
    "policy_json",
    "summary_json",
    "throttling_summary",
    "worst_excess",
    "write_json",
    "write_report",
]

CANCELLED_PREFIX = "ratebatch: cancelled"
REPORT_FORMAT = 2

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


class TestRecord:
    """One test. Times are nanoseconds since the session started, on the monotonic clock."""

    __test__ = False  # not a test class, whatever pytest's collection rules say

    #: The fields, in the order the JSON report lists them.
    FIELDS = (
        "nodeid",
        "outcome",
        "batch",
        "tokens",
        "waited_ns",
        "start_ns",
        "finish_ns",
        "reason",
        "worker",
        "store_ns",
        "acquired",
        "retries",
        "limit",
        "priority",
        "resources",
    )
    __slots__ = FIELDS

    def __init__(self, nodeid: str, outcome: str = "") -> None:
        self.nodeid = nodeid
        #: passed, failed, error, skipped, xfailed, xpassed, cancelled, not run
        self.outcome = outcome
        self.batch = 0
        self.tokens = 0
        self.waited_ns = 0
        self.start_ns: int | None = None
        self.finish_ns: int | None = None
        self.reason = ""  # for a cancelled test: why
        self.worker = ""
        self.store_ns: int | None = None  # the admission on a shared store's own clock (Redis)
        #: Tokens taken while running (the ``ratebatch`` fixture): ``[start_ns, tokens, store_ns]``.
        self.acquired: list[list[int | None]] = []
        #: The admissions of retries after throttles, in the same form.
        self.retries: list[list[int | None]] = []
        #: The limit it waited for longest before it started (``rate``, ``10/2s``, ...), if any.
        self.limit = ""
        #: ``@pytest.mark.ratebatch(priority=N)``: higher starts first.
        self.priority = 0
        #: ``@pytest.mark.ratebatch(resources={...})``: what it held while it ran (with
        #: ``--resources``).
        self.resources: dict[str, float] = {}

    @property
    def failed(self) -> bool:
        return self.outcome in ("failed", "error")

    def to_json(self, session_wall: float) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.FIELDS}
        for key, offset in (("started_at", self.start_ns), ("finished_at", self.finish_ns)):
            data[key] = None if offset is None else _iso(session_wall + offset / NANOS_PER_SECOND)
        data["waited"] = self.waited_ns / NANOS_PER_SECOND
        return data


def _burst(policy: ExecutionPolicy) -> int:
    return policy.rate_limit.burst if policy.rate_limit is not None else 0


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="microseconds")


class Tally:
    """The session's totals, kept as tests start: a few numbers, whatever the suite size."""

    __slots__ = (
        "batches",
        "cancelled",
        "collected",
        "first_start_ns",
        "last_start_ns",
        "longest_wait_ns",
        "retried",
        "retried_failed",
        "retries",
        "run",
        "started_cost",
        "waited_by_limit",
        "waited_ns",
    )

    def __init__(self) -> None:
        self.collected = 0
        self.run = 0  # admitted
        self.cancelled = 0
        self.batches = 0  # the newest batch seen (batches are numbered 1, 2, ... per session)
        self.waited_ns = 0
        self.longest_wait_ns = 0
        self.first_start_ns: int | None = None
        self.last_start_ns: int | None = None
        self.started_cost = 0
        self.retries = 0  # admissions of throttled tests run again
        self.retried = 0  # tests run again after a throttle
        self.retried_failed = 0  # of those, the ones that failed in the end
        #: Seconds slept for each limit, by its name (``rate``, ``10/2s``, ``concurrency``).
        self.waited_by_limit: dict[str, float] = {}

    def admitted(
        self, batch: int, tokens: int, start_ns: int, waited_ns: int, retry: bool = False
    ) -> None:
        if retry:
            self.retries += 1
        else:
            self.run += 1
        self.started_cost += tokens
        self.waited_ns += waited_ns
        # Comparisons, not max(): this runs for every test, and a builtin call costs more.
        if waited_ns > self.longest_wait_ns:  # noqa: PLR1730
            self.longest_wait_ns = waited_ns
        if batch > self.batches:  # noqa: PLR1730
            self.batches = batch
        if self.first_start_ns is None or start_ns < self.first_start_ns:
            self.first_start_ns = start_ns
        if self.last_start_ns is None or start_ns > self.last_start_ns:
            self.last_start_ns = start_ns

    def cancel(self, waited_ns: int) -> None:
        self.cancelled += 1
        self.waited_ns += waited_ns
        self.longest_wait_ns = max(self.longest_wait_ns, waited_ns)

    def recount(self, records: Iterable[TestRecord]) -> None:
        """Count again from the tests' records, which then are the test list the report
        shows: where a process's totals were lost (an xdist worker that crashed or was
        interrupted before it sent them), each test's record, sent with its reports, still
        says whether and when it started. The seconds by limit stay as counted (records do
        not split a wait by limit), and so do retries' waits."""
        counted = Tally()
        for record in records:
            counted.collected += 1
            if record.start_ns is not None:
                counted.admitted(record.batch, record.tokens, record.start_ns, record.waited_ns)
                if record.reason:  # started, then cancelled by the session's stop
                    counted.run -= 1
                    counted.cancelled += 1
            elif record.reason:
                counted.cancel(record.waited_ns)
            for start, tokens, _store_ns in record.retries:
                assert start is not None
                assert tokens is not None
                counted.admitted(0, tokens, start, 0, retry=True)
            if record.retries:
                counted.retried += 1
                counted.retried_failed += int(record.failed)
        counted.waited_by_limit = self.waited_by_limit
        for name in Tally.__slots__:
            setattr(self, name, getattr(counted, name))

    def to_list(self) -> list[Any]:
        """The counts a pytest-xdist worker sends its controller at the end."""
        return [
            self.run,
            self.cancelled,
            self.batches,
            self.waited_ns,
            self.longest_wait_ns,
            self.first_start_ns,
            self.last_start_ns,
            self.started_cost,
            self.retries,
            self.retried,
            self.retried_failed,
            self.waited_by_limit,
        ]

    def merge(self, counts: list[Any]) -> None:
        """Add a worker's counts (``to_list``) to these."""
        run, cancelled, batches, waited, longest, first, last, cost, *rest = counts
        self.retries += rest[0]
        self.retried += rest[1]
        self.retried_failed += rest[2]
        for limit, seconds in rest[3].items():
            self.waited_by_limit[limit] = self.waited_by_limit.get(limit, 0.0) + seconds
        self.run += run
        self.cancelled += cancelled
        self.started_cost += cost
        self.batches = max(self.batches, batches)
        self.waited_ns += waited
        self.longest_wait_ns = max(self.longest_wait_ns, longest)
        if first is not None and (self.first_start_ns is None or first < self.first_start_ns):
            self.first_start_ns = first
        if last is not None and (self.last_start_ns is None or last > self.last_start_ns):
            self.last_start_ns = last

    @property
    def not_run(self) -> int:
        """Collected tests never admitted nor cancelled (pytest stopped first: -x, a crash)."""
        return max(0, self.collected - self.run - self.cancelled)

    def achieved_per_minute(self, burst: int) -> float | None:
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


def policy_json(policy: ExecutionPolicy) -> dict[str, Any]:
    """The policy as the report states it: its settings and its header line."""
    data = policy.to_json()
    data["description"] = policy.describe()
    return data


def summary_json(tally: Tally, burst: int) -> dict[str, Any]:
    """The session's totals as the report states them (and the summary section reads them)."""
    return {
        "run": tally.run,
        "cancelled": tally.cancelled,
        "not_run": tally.not_run,
        "batches": tally.batches,
        "waited": tally.waited_ns / NANOS_PER_SECOND,
        "longest_wait": tally.longest_wait_ns / NANOS_PER_SECOND,
        "cost": tally.started_cost,
        "achieved_per_minute": tally.achieved_per_minute(burst),
        "waited_by_limit": dict(tally.waited_by_limit),
    }


def build_report(
    policy: ExecutionPolicy,
    records: Sequence[TestRecord],
    tally: Tally,
    *,
    events: Sequence[dict[str, Any]] = (),
    stop_reason: str,
    store: str,
    session_wall: float,
    duration_ns: int,
    forecast: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON report's content (format ``REPORT_FORMAT``, described in the README)."""
    return {
        "format": REPORT_FORMAT,
        "policy": policy_json(policy),
        "store": store,
        "session": {
            "started_at": _iso(session_wall),
            "duration": duration_ns / NANOS_PER_SECOND,
            "stop_reason": stop_reason,
            "forecast": forecast,
        },
        "summary": summary_json(tally, _burst(policy)),
        "throttling": throttling_summary(events, tally),
        "events": sorted(events, key=lambda event: event.get("store_ns") or 0),
        "tests": [record.to_json(session_wall) for record in records],
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON atomically (a reader never sees half a file); ``OutputError``
    (``views.output``) naming the path if it cannot be written, leaving nothing behind."""
    from .output import write_atomically  # at the session's end only

    write_atomically(path, json.dumps(data, indent=1) + "\n")


def write_report(
    path: Path, policy: ExecutionPolicy, records: Sequence[TestRecord], tally: Tally, **fields: Any
) -> None:
    """Build the JSON report and write it atomically."""
    write_json(path, build_report(policy, records, tally, **fields))


def throttling_summary(events: Sequence[dict[str, Any]], tally: Tally) -> dict[str, Any]:
    """The throttles, pauses, rate changes and retries of a session, in numbers."""
    throttles = [event for event in events if event.get("event") == "throttle"]
    statuses: dict[str, int] = {}
    for event in throttles:
        key = str(event.get("status") or "other")
        statuses[key] = statuses.get(key, 0) + 1
    pauses = sorted(
        (event["store_ns"], event["paused_until_store_ns"])
        for event in events
        if event.get("paused_until_store_ns") is not None
    )
    paused = 0
    reach = None
    for start, end in pauses:  # the union of the pauses: overlapping ones count once
        if reach is None or start > reach:
            paused += end - start
            reach = end
        elif end > reach:
            paused += end - reach
            reach = end
    rated = [event for event in throttles if "rate_after" in event]
    rated.sort(key=lambda event: event["store_ns"])
    return {
        "throttles": len(throttles),
        "statuses": statuses,
        "budget_pauses": sum(event.get("event") == "budget" for event in events),
        "paused": paused / NANOS_PER_SECOND,
        "rate_before": rated[0]["rate_before"] if rated else None,
        "rate_after": rated[-1]["rate_after"] if rated else None,
        "retried_tests": tally.retried,
        "retried_failed": tally.retried_failed,
        "retries": tally.retries,
    }


def _rate_text(per_minute: float | None) -> str:
    return "no rate" if per_minute is None else format_rate(per_minute)


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


def describe_throttling(summary: dict[str, Any]) -> list[str]:
    """The summary lines about throttling; none if the server never pushed back."""
    if not summary["throttles"] and not summary["budget_pauses"]:
        return []
    statuses = ", ".join(
        f"{'HTTP ' + status if status.isdigit() else status} x{count}"
        for status, count in sorted(summary["statuses"].items())
    )
    throttled = f"throttled: {summary['throttles']}" + (f" ({statuses})" if statuses else "")
    if summary["budget_pauses"]:
        throttled += f"; paused {summary['budget_pauses']} times for a published budget"
    lines = [f"{throttled}, paused {format_duration(round(summary['paused'], 3))} in all"]
    if summary["rate_before"] is not None or summary["rate_after"] is not None:
        lines.append(
            f"rate: {_rate_text(summary['rate_before'])} before the first throttle, "
            f"{_rate_text(summary['rate_after'])} after the last"
        )
    retried = summary["retried_tests"]
    if retried:
        failed = summary["retried_failed"]
        lines.append(
            f"retried: {_count(retried, 'test', 'tests')} "
            f"({_count(summary['retries'], 'retry', 'retries')}): "
            f"{retried - failed} then passed, {failed} failed"
        )
    return lines


def limit_names(policy: ExecutionPolicy) -> list[str]:
    """The limits in force, by the names waits are accounted under."""
    names = ["rate"] if policy.rate_limit is not None else []
    names += [window.describe() for window in policy.windows]
    if policy.max_concurrency is not None:
        names.append("concurrency")
    return names


def json_limit_names(policy: dict[str, Any]) -> list[str]:
    """``limit_names`` from the policy as the report states it."""
    names = ["rate"] if policy.get("rate_per_minute") is not None else []
    names += [window["text"] for window in policy.get("rate_limit") or ()]
    if policy.get("max_concurrency") is not None:
        names.append("concurrency")
    return names


def describe_limits(policy: ExecutionPolicy, waited: dict[str, float]) -> str:
    """Which limit bound the run: ``waited on 25/10s for 38s, on 10/2s for 4s, ...``."""
    return describe_waits(limit_names(policy), waited)


def describe_waits(names: list[str], waited: dict[str, float]) -> str:
    """``waited on 25/10s for 38s, on 10/2s for 4s, ...``: the limits, longest wait first."""
    names = list(names)
    names += [name for name in waited if name not in names]  # a pause without a rate
    names.sort(key=lambda name: -waited.get(name, 0.0))
    return "waited on " + ", on ".join(
        f"{name} for {format_duration(round(waited.get(name, 0.0), 1))}" for name in names
    )


def describe_summary(
    policy: ExecutionPolicy,
    summary: Tally,
    stop_reason: str,
    events: Sequence[dict[str, Any]] = (),
    count_not_run: bool = True,
) -> list[str]:
    """The lines of the terminal summary section; without ``count_not_run`` (some tests'
    totals are missing) no test is said not to have run."""
    totals = summary_json(summary, _burst(policy))
    if not count_not_run:
        totals["not_run"] = 0
    return describe_report(
        policy_json(policy), totals, throttling_summary(events, summary), stop_reason
    )


#: From this share of the configured rate on, the limit (not the tests) set the pace.
LIMIT_SET_THE_PACE = 0.9


def describe_pace(
    policy: dict[str, Any], summary: dict[str, Any], throttling: dict[str, Any] | None = None
) -> str | None:
    """Whether the rate limit or the tests themselves set the pace; ``None`` without a rate
    or without enough starts to tell. After throttles, the server set it."""
    rate = policy.get("rate_per_minute")
    achieved = summary.get("achieved_per_minute")
    if achieved is None or not (isinstance(rate, (int, float)) or rate == "auto"):
        return None
    limit = f"limit {format_rate(rate)}" if isinstance(rate, (int, float)) else "rate auto"
    lowered = (throttling or {}).get("rate_after")
    if lowered is not None:
        limit += f", {format_rate(lowered)} after throttles"
    limits = [value for value in (rate, lowered) if isinstance(value, (int, float))]
    if not limits:
        return None  # auto, never throttled: no limit known
    allowed = min(limits)
    text = f"pace: {format_rate(achieved)} after the first burst ({limit})"
    if lowered is not None:
        return f"{text}: the server's throttles set the pace"
    if achieved >= LIMIT_SET_THE_PACE * allowed:
        return f"{text}: the limit set the pace"
    return f"{text}: the tests set the pace, not the limit"


def describe_report(
    policy: dict[str, Any],
    summary: dict[str, Any],
    throttling: dict[str, Any],
    stop_reason: str,
) -> list[str]:
    """The summary lines, from the report's own fields (``python -m pytest_ratebatch summary``
    reads them back from the file)."""
    lines = [f"policy: {policy['description']}"]
    tests = f"tests: {summary['run']} run, {summary['cancelled']} cancelled"
    if summary["not_run"]:
        tests += f", {summary['not_run']} not run"
    if policy.get("batch_size") is not None:
        tests += f", in {summary['batches']} batches"
    lines.append(tests)
    lines.append(
        f"waited: {format_duration(round(summary['waited'], 3))} in total, "
        f"longest {format_duration(round(summary['longest_wait'], 3))}"
    )
    if policy.get("rate_limit") or policy.get("max_concurrency") is not None:
        lines.append(describe_waits(json_limit_names(policy), summary.get("waited_by_limit", {})))
    pace = describe_pace(policy, summary, throttling)
    if pace is not None:
        lines.append(pace)
    lines += describe_throttling(throttling)
    lines.append(f"stop: {stop_reason or 'none, every test was started'}")
    return lines
