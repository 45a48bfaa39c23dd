"""The progress line's arithmetic, on a fake clock."""

from __future__ import annotations

from pytest_ratebatch.views.forecast import simulate
from pytest_ratebatch.views.progress import LinePace, Progress

SECOND = 1_000_000_000


def test_on_schedule_the_time_left_is_the_forecast() -> None:
    forecast = simulate([1] * 300, interval_ns=SECOND, burst=5)  # 4m55s
    progress = Progress(300, forecast, start_ns=1000 * SECOND)
    assert progress.describe(0, 1000 * SECOND) == "0/300 started, about 4m55s left"
    # 40 started after 35 s: exactly the schedule.
    now = 1035 * SECOND
    assert progress.left_ns(40, now) == 260 * SECOND
    assert progress.describe(40, now) == "40/300 started, 68.57/min, about 4m20s left"
    assert progress.left_ns(300, now) == 0


def test_behind_schedule_the_rest_is_stretched_but_pauses_over_are_not() -> None:
    forecast = simulate([1] * 105, interval_ns=SECOND, burst=5)  # 100 s
    progress = Progress(105, forecast, start_ns=0)
    # Test 55 started at 50 s by the schedule; the run is at 100 s: twice as slow.
    assert progress.left_ns(55, 100 * SECOND) == 100 * SECOND
    # Unless 50 s of it was a pause the server asked for: then it is on schedule.
    assert progress.left_ns(55, 100 * SECOND, paused_ns=50 * SECOND) == 50 * SECOND
    # Ahead of the schedule (never, by G1, but clocks differ): the forecast stands.
    assert progress.left_ns(55, 10 * SECOND) == 50 * SECOND


def test_without_a_forecast_the_achieved_rate_tells() -> None:
    progress = Progress(100, None, start_ns=0)
    assert progress.left_ns(0, 10 * SECOND) is None
    assert progress.left_ns(25, 10 * SECOND) == 30 * SECOND
    assert progress.describe(25, 10 * SECOND) == "25/100 started, 150/min, about 30s left"


def test_a_log_line_at_most_every_30_seconds() -> None:
    pace = LinePace(30 * SECOND)
    assert pace.due(0)
    assert not pace.due(29 * SECOND)
    assert pace.due(30 * SECOND)
    assert not pace.due(31 * SECOND)
    assert pace.due(75 * SECOND)
