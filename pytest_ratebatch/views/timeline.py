"""The timeline picture of one or more JSON reports, as plain SVG written by hand.

One lane per process (an xdist worker, or the session itself), each test a bar from its
start to its finish coloured by outcome, its wait for the limiter before it, a tick at each
of its calls to a limited host (a call re-sent after a throttle in its own colour), batch
boundaries, pauses and throttles; below, on the same time axis, the cumulative cost started
against the policy's bound (``burst + rate x t``, and each window's). Reports of sessions
that shared a Redis key are merged on the server's clock (``store_ns``); others are lined
up by their wall-clock start.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

from ..limits.policy import NANOS_PER_SECOND
from .forecast import format_span

__all__ = ["COLOURS", "Bar", "CallTick", "Timeline", "render_timeline", "write_timeline"]

#: Each outcome's colour (and the other marks'), chosen to read on white and in grey.
COLOURS = {
    "passed": "#3c9a4c",
    "failed": "#d62728",
    "error": "#e8710a",
    "xfailed": "#b8a11f",
    "xpassed": "#b8a11f",
    "skipped": "#9e9e9e",
    "rerun": "#9467bd",
    "": "#607d8b",  # started, never finished (a crash)
    "wait": "#c9d3dd",
    "pause": "#ff9800",
    "throttle": "#d62728",
    "cost": "#1f5fa8",
    "bound": "#d62728",
    "window": "#8e44ad",
    "batch": "#90a4ae",
    "call": "#263238",
    "resent": "#e91e63",
}

WIDTH = 1100
LEFT = 110  # room for the lane labels and the cost axis
RIGHT = 30
TOP = 58  # the title and the legend
LANE = 18
LANE_GAP = 4
CHART = 220
AXIS = 34


class Bar:
    """One test's admission on a lane: start, finish (ns on the timeline's clock), wait."""

    __slots__ = ("finish", "lane", "nodeid", "outcome", "start", "tokens", "waited")

    def __init__(
        self,
        lane: str,
        nodeid: str,
        outcome: str,
        start: int,
        finish: int | None,
        waited: int,
        tokens: int,
    ) -> None:
        self.lane = lane
        self.nodeid = nodeid
        self.outcome = outcome
        self.start = start
        self.finish = finish
        self.waited = waited
        self.tokens = tokens


class CallTick:
    """One call to a limited host, on its test's lane: when it was admitted, and what it
    says in its tooltip."""

    __slots__ = ("at", "lane", "resent", "title")

    def __init__(self, lane: str, at: int, resent: bool, title: str) -> None:
        self.lane = lane
        self.at = at
        self.resent = resent
        self.title = title


def _call_tick(lane: str, nodeid: str, at: int, call: dict[str, Any]) -> CallTick:
    """A call of the report (``host``, ``start``, ``wait``, ``status``, ``resent``) at
    ``at`` on the timeline's clock."""
    resent = int(call.get("resent") or 0)
    status = call.get("status")
    parts = [
        f"{nodeid}: call to {call.get('host', '')}",
        f"waited {format_span(float(call.get('wait') or 0))}",
        f"HTTP {status}" if status else "no response",
        {0: "not re-sent", 1: "re-sent once"}.get(resent, f"re-sent {resent} times"),
    ]
    return CallTick(lane, at, bool(resent), ", ".join(parts))


class Timeline:
    """What the picture shows, on one clock: bars, starts (for the cost), batches, events."""

    def __init__(self) -> None:
        self.lanes: list[str] = []
        self.bars: list[Bar] = []
        self.starts: list[tuple[int, int]] = []  # (time, cost), every admission and in-test take
        self.batches: dict[tuple[int, int], int] = {}  # (report, batch) -> its first start
        self.pauses: list[tuple[int, int, str]] = []  # (from, until, what)
        self.throttles: list[tuple[int, str]] = []  # (when, what)
        self.calls: list[CallTick] = []  # each test's calls to limited hosts
        self.cancelled = 0
        self.clock = "session"

    @classmethod
    def from_reports(cls, reports: Sequence[tuple[str, dict[str, Any]]]) -> Timeline:
        """Merge ``(name, report)`` pairs onto one clock."""
        timeline = cls()
        on_store = len(reports) > 1 and all(_has_store_clock(report) for _, report in reports)
        timeline.clock = "store" if on_store else "session"
        walls = [_wall_start(report) for _, report in reports]
        first_wall = min(walls) if walls else 0.0
        for index, (name, report) in enumerate(reports):
            offset = round((walls[index] - first_wall) * NANOS_PER_SECOND)
            prefix = f"{name}: " if len(reports) > 1 else ""
            timeline._add(index, prefix, report, on_store, offset)
        return timeline

    def _add(
        self, index: int, prefix: str, report: dict[str, Any], on_store: bool, offset: int
    ) -> None:
        def when(session_ns: int, store_ns: int | None) -> int:
            if on_store and store_ns is not None:
                return store_ns
            return offset + session_ns

        for test in report["tests"]:
            start = test.get("start_ns")
            if start is None:
                self.cancelled += test.get("outcome") == "cancelled"
                continue
            lane = prefix + (test.get("worker") or "session")
            if lane not in self.lanes:
                self.lanes.append(lane)
            at = when(start, test.get("store_ns"))
            finish = test.get("finish_ns")
            tokens = int(test.get("tokens") or 0)
            self.bars.append(
                Bar(
                    lane,
                    str(test.get("nodeid", "")),
                    str(test.get("outcome", "")),
                    at,
                    None if finish is None else at + finish - start,
                    int(test.get("waited_ns") or 0),
                    tokens,
                )
            )
            if tokens:
                self.starts.append((at, tokens))
            for call in test.get("calls") or ():
                # A call's start is on the session's clock: placed from its test's start.
                call_ns = round(float(call.get("start") or 0) * NANOS_PER_SECOND)
                self.calls.append(
                    _call_tick(lane, self.bars[-1].nodeid, at + call_ns - start, call)
                )
            for taken_at, taken, store_ns in [*test.get("acquired", []), *test.get("retries", [])]:
                if taken:
                    self.starts.append((when(taken_at, store_ns), int(taken)))
            batch = int(test.get("batch") or 0)
            if batch:
                key = (index, batch)
                self.batches[key] = min(self.batches.get(key, at), at)
        for event in report["events"]:
            at = when(event.get("at_ns") or 0, event.get("store_ns"))
            until = event.get("paused_until_ns")
            if until is not None:
                end = when(until, event.get("paused_until_store_ns"))
                self.pauses.append((at, end, _describe_event(event)))
            if event.get("event") == "throttle":
                self.throttles.append((at, _describe_event(event)))
        self.lanes.sort(key=_lane_order)

    def span(self) -> tuple[int, int]:
        """The first and last instant shown."""
        times = [bar.start - bar.waited for bar in self.bars]
        times += [bar.finish if bar.finish is not None else bar.start for bar in self.bars]
        times += [time for pause in self.pauses for time in pause[:2]]
        times += [time for time, _ in self.throttles]
        times += [call.at for call in self.calls]
        if not times:
            return 0, NANOS_PER_SECOND
        first, last = min(times), max(times)
        return first, max(last, first + 1)


def _lane_order(lane: str) -> tuple[str, int, str]:
    head, _, worker = lane.rpartition(": ")
    digits = "".join(character for character in worker if character.isdigit())
    return head, int(digits) if digits else -1, worker


def _has_store_clock(report: dict[str, Any]) -> bool:
    tests = [test for test in report["tests"] if test.get("start_ns") is not None]
    return bool(tests) and all(test.get("store_ns") is not None for test in tests)


def _wall_start(report: dict[str, Any]) -> float:
    try:
        return datetime.fromisoformat(report["session"]["started_at"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return 0.0


def _describe_event(event: dict[str, Any]) -> str:
    kind = event.get("event", "event")
    wait = event.get("wait")
    text = f"{kind}: {event.get('test', '')}"
    if event.get("status"):
        text += f" (HTTP {event['status']})"
    if wait is not None:
        text += f", paused {format_span(float(wait))}"
    return text


def _nice_step(span: float, ticks: int) -> float:
    """A step of 1, 2 or 5 times a power of ten giving about ``ticks`` ticks over ``span``."""
    raw = max(span / ticks, 1e-9)
    power: float = 10.0 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power


def _n(value: float) -> str:
    """A coordinate, short: two decimals at most."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


class _Canvas:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def rect(
        self,
        x: float,
        y: float,
        width: float,
        height: float,
        cls: str,
        title: str = "",
        **attrs: str,
    ) -> None:
        extra = "".join(
            f' {name.replace("_", "-")}="{escape(value)}"' for name, value in attrs.items()
        )
        shape = (
            f'<rect class="{cls}" x="{_n(x)}" y="{_n(y)}" width="{_n(max(width, 0.8))}" '
            f'height="{_n(height)}"{extra}'
        )
        self.add(f"{shape}><title>{escape(title)}</title></rect>" if title else f"{shape}/>")

    def text(self, x: float, y: float, text: str, cls: str = "", anchor: str = "start") -> None:
        self.add(
            f'<text class="{cls}" x="{_n(x)}" y="{_n(y)}" text-anchor="{anchor}">'
            f"{escape(text)}</text>"
        )


def render_timeline(reports: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """The SVG document for ``(name, report)`` pairs (one pair: one session)."""
    timeline = Timeline.from_reports(reports)
    policy = reports[0][1]["policy"] if reports else {}
    first, last = timeline.span()
    duration = last - first
    lanes = timeline.lanes or ["session"]
    lanes_top = TOP
    lanes_height = len(lanes) * (LANE + LANE_GAP)
    chart_top = lanes_top + lanes_height + AXIS
    height = chart_top + CHART + AXIS + 8
    plot = WIDTH - LEFT - RIGHT

    def x(time: float) -> float:
        return LEFT + (time - first) * plot / duration

    lane_y = {lane: lanes_top + index * (LANE + LANE_GAP) for index, lane in enumerate(lanes)}
    canvas = _Canvas()
    canvas.add(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">'
    )
    canvas.add(
        "<style>text{fill:#263238}.small{font-size:9px;fill:#546e7a}"
        ".title{font-size:13px;font-weight:bold}.grid{stroke:#eceff1}"
        f".batch{{stroke:{COLOURS['batch']};stroke-dasharray:3 3}}"
        f".wait{{fill:{COLOURS['wait']}}}.pause{{fill:{COLOURS['pause']};fill-opacity:.18}}"
        f".throttle{{fill:{COLOURS['throttle']}}}"
        f".call{{stroke:{COLOURS['call']};stroke-width:1}}"
        f".call.resent{{stroke:{COLOURS['resent']};stroke-width:1.6}}"
        f".cost{{fill:none;stroke:{COLOURS['cost']};stroke-width:1.6}}"
        f".bound{{fill:none;stroke:{COLOURS['bound']};stroke-width:1.2;stroke-dasharray:6 3}}"
        f".window-bound{{fill:none;stroke:{COLOURS['window']};stroke-width:1.2;"
        "stroke-dasharray:2 2}"
        + "".join(
            f".test.{outcome}{{fill:{colour}}}"
            for outcome, colour in COLOURS.items()
            if outcome and outcome in _OUTCOMES
        )
        + f".test.unfinished{{fill:{COLOURS['']}}}</style>"
    )
    canvas.add(f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>')
    _title(canvas, reports, timeline, policy, duration)
    _legend(canvas, timeline, policy)
    canvas.add(f'<clipPath id="plot"><rect x="{LEFT}" y="0" width="{plot}" height="{height}"/>')
    canvas.add("</clipPath>")
    # Time grid and axes (under the lanes and over the chart).
    step = _nice_step(duration / NANOS_PER_SECOND, 10)
    tick = 0.0
    while tick * NANOS_PER_SECOND <= duration + 1:
        position = x(first + tick * NANOS_PER_SECOND)
        canvas.add(
            f'<line class="grid" x1="{_n(position)}" y1="{lanes_top - 4}" x2="{_n(position)}" '
            f'y2="{chart_top + CHART}"/>'
        )
        for axis_y in (lanes_top + lanes_height + 14, chart_top + CHART + 14):
            canvas.text(position, axis_y, format_span(tick), "small", "middle")
        tick = round(tick + step, 9)
    # Pauses behind everything, across the lanes and the chart.
    canvas.add('<g class="pauses" clip-path="url(#plot)">')
    for start, end, what in timeline.pauses:
        canvas.rect(
            x(start),
            lanes_top - 4,
            x(end) - x(start),
            chart_top + CHART - lanes_top + 4,
            "pause",
            what,
        )
    canvas.add("</g>")
    # Batch boundaries.
    canvas.add('<g class="batches">')
    boundaries = sorted(timeline.batches.items(), key=lambda item: item[1])
    label_every = max(1, math.ceil(len(boundaries) / 40))
    for number, ((_, batch), at) in enumerate(boundaries):
        position = x(at)
        canvas.add(
            f'<line class="batch" data-batch="{batch}" x1="{_n(position)}" y1="{lanes_top - 6}" '
            f'x2="{_n(position)}" y2="{lanes_top + lanes_height}"/>'
        )
        if number % label_every == 0:
            canvas.text(position + 2, lanes_top - 7, f"b{batch}", "small")
    canvas.add("</g>")
    # The lanes: each test's wait and run.
    for lane in lanes:
        top = lane_y[lane]
        canvas.add(f'<g class="lane" data-lane="{escape(lane)}">')
        canvas.text(LEFT - 6, top + LANE - 5, lane, "", "end")
        canvas.add(
            f'<line class="grid" x1="{LEFT}" y1="{top + LANE}" x2="{LEFT + plot}" '
            f'y2="{top + LANE}"/>'
        )
        for bar in (bar for bar in timeline.bars if bar.lane == lane):
            if bar.waited:
                canvas.rect(
                    x(bar.start - bar.waited),
                    top + LANE / 2 - 2,
                    x(bar.start) - x(bar.start - bar.waited),
                    4,
                    "wait",
                    f"{bar.nodeid}: waited {format_span(bar.waited / NANOS_PER_SECOND)}",
                )
            end = bar.finish if bar.finish is not None else bar.start
            outcome = bar.outcome if bar.outcome in _OUTCOMES else "unfinished"
            seconds = (bar.start - first) / NANOS_PER_SECOND
            title = (
                f"{bar.nodeid}: {bar.outcome or 'no outcome'}, started at "
                f"{format_span(seconds)}, ran {format_span((end - bar.start) / NANOS_PER_SECOND)}"
                f", cost {bar.tokens}"
            )
            canvas.rect(
                x(bar.start), top + 2, x(end) - x(bar.start), LANE - 4, f"test {outcome}", title,
                data_nodeid=bar.nodeid,
            )  # fmt: skip
        for call in (call for call in timeline.calls if call.lane == lane):
            call_x = _n(x(call.at))
            canvas.add(
                f'<line class="call{" resent" if call.resent else ""}" x1="{call_x}" '
                f'y1="{top + 1}" x2="{call_x}" y2="{top + LANE - 1}">'
                f"<title>{escape(call.title)}</title></line>"
            )
        canvas.add("</g>")
    for at, what in timeline.throttles:
        position = x(at)
        canvas.add(
            f'<path class="throttle" d="M{_n(position - 5)} {lanes_top - 13}h10l-5 8z">'
            f"<title>{escape(what)}</title></path>"
        )
    _chart(canvas, timeline, policy, x, last, chart_top, plot)
    canvas.add("</svg>")
    return "\n".join(canvas.parts) + "\n"


_OUTCOMES = ("passed", "failed", "error", "xfailed", "xpassed", "skipped", "rerun")


def _title(
    canvas: _Canvas,
    reports: Sequence[tuple[str, dict[str, Any]]],
    timeline: Timeline,
    policy: dict[str, Any],
    duration: int,
) -> None:
    tests = sum(len(report["tests"]) for _, report in reports)
    sessions = f"{len(reports)} sessions, " if len(reports) > 1 else ""
    clock = " (on the store's clock)" if timeline.clock == "store" else ""
    text = (
        f"{sessions}{tests} tests in {format_span(duration / NANOS_PER_SECOND)}{clock}"
        f" \u2014 {policy.get('description', '')}"
    )
    if timeline.cancelled:
        text += f"; {timeline.cancelled} cancelled"
    canvas.text(LEFT, 18, text, "title")


def _legend(canvas: _Canvas, timeline: Timeline, policy: dict[str, Any]) -> None:
    seen = {bar.outcome for bar in timeline.bars}
    entries: list[tuple[str, str]] = [(f"test {o}", o) for o in _OUTCOMES if o in seen]
    if any(bar.waited for bar in timeline.bars):
        entries.append(("wait", "waiting for the limiter"))
    if timeline.batches:
        entries.append(("batch", "batch start"))
    if timeline.pauses:
        entries.append(("pause", "pause"))
    if timeline.throttles:
        entries.append(("throttle", "throttle"))
    if timeline.calls:
        entries.append(("call", "call"))
    if any(call.resent for call in timeline.calls):
        entries.append(("call resent", "call re-sent"))
    entries.append(("cost", "cost started"))
    if policy.get("interval_ns"):
        entries.append(("bound", "burst + rate \u00d7 t"))
    if policy.get("rate_limit"):
        entries.append(("window-bound", "window limits"))
    position = float(LEFT)
    for cls, label in entries:
        if cls.startswith("call"):  # a tick, as on the lanes
            canvas.add(
                f'<line class="legend {cls}" x1="{_n(position + 7)}" y1="29" '
                f'x2="{_n(position + 7)}" y2="39"/>'
            )
        elif cls in ("cost", "bound", "window-bound", "batch"):
            canvas.add(
                f'<line class="legend {cls}" x1="{_n(position)}" y1="34" '
                f'x2="{_n(position + 14)}" y2="34"/>'
            )
        else:
            canvas.add(
                f'<rect class="legend {cls}" x="{_n(position)}" y="29" width="14" height="10"/>'
            )
        canvas.text(position + 18, 38, label)
        position += 26 + 6.2 * len(label)


def _chart(
    canvas: _Canvas,
    timeline: Timeline,
    policy: dict[str, Any],
    x: Any,
    last: int,
    top: int,
    plot: int,
) -> None:
    """The cumulative cost started, against the bucket's and each window's bound."""
    starts = sorted(timeline.starts)
    total = sum(cost for _, cost in starts)
    scale_top = max(total, 1) * 1.1
    bottom = top + CHART

    def y(cost: float) -> float:
        return bottom - cost * CHART / scale_top

    canvas.add(f'<g class="chart" data-total-cost="{total}">')
    canvas.add(
        f'<rect x="{LEFT}" y="{top}" width="{plot}" height="{CHART}" fill="none" stroke="#b0bec5"/>'
    )
    step = _nice_step(scale_top, 5)
    level = 0.0
    while level <= scale_top:
        canvas.add(
            f'<line class="grid" x1="{LEFT}" y1="{_n(y(level))}" x2="{LEFT + plot}" '
            f'y2="{_n(y(level))}"/>'
        )
        canvas.text(LEFT - 6, y(level) + 3, f"{level:g}", "small", "end")
        level = round(level + step, 9)
    canvas.text(LEFT - 6, top - 6, "cost started", "small", "end")
    if starts:
        origin = starts[0][0]
        canvas.add(
            f'<path class="cost" d="{_steps(((at, cost) for at, cost in starts), x, y, last)}"/>'
        )
        interval = policy.get("interval_ns")
        burst = policy.get("burst")
        if interval and burst:
            # G1 from the first start: cost started by t <= burst + (t - first start) / interval.
            reach = burst + (last - origin) / interval
            path = f"M{_n(x(origin))} {_n(y(burst))}L{_n(x(last))} {_n(y(reach))}"
            canvas.add(
                f'<path class="bound" clip-path="url(#chart)" data-burst="{burst}" '
                f'data-interval-ns="{interval}" d="{path}"/>'
            )
        for window in policy.get("rate_limit") or ():
            count, window_ns = window["count"], window["window_ns"]
            points: list[tuple[int, int]] = []
            at = origin
            while at <= last:
                points.append((at, count))
                at += window_ns
            path = _steps(points, x, y, last)
            canvas.add(
                f'<path class="window-bound" clip-path="url(#chart)" data-count="{count}" '
                f'data-window-ns="{window_ns}" d="{path}"/>'
            )
    canvas.add(
        f'<clipPath id="chart"><rect x="{LEFT}" y="{top}" width="{plot}" height="{CHART}"/>'
        "</clipPath>"
    )
    canvas.add("</g>")


def _steps(points: Iterable[tuple[int, int]], x: Any, y: Any, last: int) -> str:
    """A staircase path rising by each point's amount at its time, flat to ``last``."""
    parts: list[str] = []
    level = 0
    previous: int | None = None
    for at, amount in points:
        if previous is None:
            parts.append(f"M{_n(x(at))} {_n(y(0))}")
        elif at != previous:
            parts.append(f"H{_n(x(at))}")
        level += amount
        parts.append(f"V{_n(y(level))}")
        previous = at
    if parts:
        parts.append(f"H{_n(x(last))}")
    return "".join(parts)


def write_timeline(
    path: Path, reports: Sequence[dict[str, Any]] | Sequence[tuple[str, dict[str, Any]]]
) -> None:
    """Draw the reports (or ``(name, report)`` pairs) into the SVG file at ``path``,
    atomically; ``OutputError`` (``views.output``) naming the path if it cannot be written."""
    named = [
        item if isinstance(item, tuple) else (f"{index + 1}", item)
        for index, item in enumerate(reports)
    ]
    from .output import write_atomically

    write_atomically(path, render_timeline(named))
