"""The calls the collected tests will make, from the counts of the last run.

At a session's end each test's calls per call limit (the limit's pattern) are kept in
pytest's cache (``CACHE_KEY``: node id -> {pattern: calls}); after the next collection the
counts of the collected tests say about how many calls each limit will see, and the least
time a stated limit then imposes: the greedy schedule of the calls under every window of
the limit. Pure: the cache is read and written by the reporter.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence

from ..limits.calls import CallLimit
from ..limits.policy import NANOS_PER_SECOND, WindowLimit
from .forecast import format_span

__all__ = [
    "CACHE_KEY",
    "MAX_GROUPS",
    "Counts",
    "call_forecast_lines",
    "describe_call_forecast",
    "least_time_ns",
    "merge_counts",
    "read_counts",
]

#: The key of the tests' call counts in pytest's cache (``.pytest_cache/v/ratebatch/calls``).
CACHE_KEY = "ratebatch/calls"

#: Each test's calls by limit: node id -> {pattern: calls}.
Counts = dict[str, dict[str, int]]
#: The most groups of calls ``least_time_ns`` schedules (a few tenths of a second).
MAX_GROUPS = 50_000


def least_time_ns(calls: int, windows: Iterable[WindowLimit]) -> int:
    """The least time ``calls`` calls take under every window at once, in ns: the last
    call's moment in the greedy schedule, each call as early as every window allows.

    Under one window of ``c`` per ``W`` the calls go ``c`` at a time, a window apart: the
    last at ``floor((calls - 1) / c) * W``. Each window alone so bounds the schedule from
    below; with several the schedule can be longer than the largest of these (2/1s and
    3/2s hold 6 calls 3 s, not 2 s), so they are scheduled together, a group of calls at a
    time (as many as every window has room for at once). Past ``MAX_GROUPS`` groups (a
    million calls at 1/s, say) the schedule is cut short: the time it reached, or each
    window's own bound if larger, is still a time the calls take at least.
    """
    limits = [(window.count, window.window_ns) for window in windows]
    if calls <= 1 or not limits:
        return 0
    if len(limits) == 1:
        count, window_ns = limits[0]
        return (calls - 1) // count * window_ns
    sent: list[deque[tuple[int, int]]] = [deque() for _ in limits]  # (at, calls) per window
    totals = [0] * len(limits)
    at = 0
    left = calls
    for _ in range(MAX_GROUPS):
        room = left
        for index, (count, window_ns) in enumerate(limits):
            queue = sent[index]
            while queue and queue[0][0] + window_ns <= at:
                totals[index] -= queue.popleft()[1]
            room = min(room, count - totals[index])
        for index in range(len(limits)):
            sent[index].append((at, room))
            totals[index] += room
        left -= room
        if not left:
            return at
        # The next moment every window has room again (each only gains room as time passes).
        for index, (count, window_ns) in enumerate(limits):
            total = totals[index]
            for sent_at, amount in sent[index]:
                if total < count:
                    break
                total -= amount
                at = max(at, sent_at + window_ns)
    return max(at, *((calls - 1) // count * window_ns for count, window_ns in limits))


def read_counts(data: object) -> Counts:
    """The counts found in the cache, keeping only well-formed entries (a cache written by
    another version, or edited by hand, is not trusted)."""
    counts: Counts = {}
    if not isinstance(data, dict):
        return counts
    for nodeid, calls in data.items():
        if not isinstance(nodeid, str) or not isinstance(calls, dict):
            continue
        counts[nodeid] = {
            pattern: number
            for pattern, number in calls.items()
            if isinstance(pattern, str)
            and isinstance(number, int)
            and not isinstance(number, bool)
            and number > 0
        }
    return counts


def merge_counts(
    previous: object, runs: Mapping[str, int], counts: Mapping[str, Mapping[str, int]]
) -> Counts:
    """What the cache holds after a session: the previous counts (as ``read_counts`` finds
    them) with each test that ran replaced by its calls this time (``{}``: none); tests
    that did not run keep their previous counts. ``runs``: each test that ran, and in how
    many processes (each xdist worker runs every test with ``--dist each``): ``counts``
    holds every process's calls added up, a run's share is kept (rounded)."""
    merged = read_counts(previous)
    for nodeid, processes in runs.items():
        times = max(1, processes)
        shares = {
            pattern: (2 * number + times) // (2 * times)  # number / times, half up
            for pattern, number in counts.get(nodeid, {}).items()
        }
        merged[nodeid] = {pattern: share for pattern, share in shares.items() if share > 0}
    return merged


def describe_call_forecast(
    tests: int, calls: int, limit: CallLimit, unknown: int = 0, least_ns: int | None = None
) -> str:
    """One limit's forecast line (without the ``ratebatch: forecast:`` prefix):
    ``300 tests, about 1,140 calls to api.example.com (from the last run), take at least
    9m30s``; ``unknown``: the tests without a count; ``least_ns``: ``None`` for a limit that
    states no window (``auto``, a concurrency alone)."""
    source = "from the last run"
    if unknown:
        source += f"; {unknown:,} {'test' if unknown == 1 else 'tests'} without a count"
    noun = "test" if tests == 1 else "tests"
    text = (
        f"{tests:,} {noun}, about {calls:,} {'call' if calls == 1 else 'calls'} to "
        f"{limit.pattern} ({source})"
    )
    if least_ns is not None:
        verb = "takes" if tests == 1 else "take"
        text += f", {verb} at least {format_span(least_ns / NANOS_PER_SECOND)}"
    return text


def call_forecast_lines(
    limits: Sequence[CallLimit],
    nodeids: Sequence[str],
    known: Mapping[str, Mapping[str, int]],
    repeat: int = 1,
) -> list[str]:
    """Each limit's forecast line for the collected ``nodeids`` (``repeat``: how often each
    runs, the workers of ``--dist each``); none when no collected test has a count, and
    none for a limit that no counted test called."""
    counted = [known[nodeid] for nodeid in nodeids if nodeid in known]
    if not counted:
        return []
    repeat = max(1, repeat)
    unknown = (len(nodeids) - len(counted)) * repeat
    lines = []
    for limit in limits:
        calls = sum(test.get(limit.pattern, 0) for test in counted) * repeat
        if not calls:
            continue
        least = least_time_ns(calls, limit.windows) if limit.windows else None
        lines.append(describe_call_forecast(len(nodeids) * repeat, calls, limit, unknown, least))
    return lines
