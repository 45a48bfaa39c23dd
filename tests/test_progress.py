"""The progress line's arithmetic, on a fake clock."""

from __future__ import annotations

import io
import threading

from pytest_ratebatch.views.forecast import simulate
from pytest_ratebatch.views.progress import LinePace, Progress
from pytest_ratebatch.views.terminal import ProgressLine
from tests.fakes import FakeClock

SECOND = 1_000_000_000


def test_on_schedule_the_time_left_is_the_forecast() -> None:
    forecast = simulate([1] * 300, interval_ns=SECOND, burst=5)  # 4m55s
    progress = Progress(300, forecast, start_ns=1000 * SECOND, burst=5)
    assert progress.describe(0, 1000 * SECOND) == "0/300 started, 4m55s left"
    assert progress.describe(5, 1000 * SECOND) == "5/300 started, 4m55s left"
    # 40 started after 35 s: exactly the schedule.
    now = 1035 * SECOND
    assert progress.left_ns(40, now) == 260 * SECOND
    assert progress.describe(40, now) == "40/300 started, 60/min, 4m20s left"
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
    assert progress.describe(25, 10 * SECOND) == "25/100 started, 150/min, 30s left"


def test_a_log_line_at_most_every_30_seconds() -> None:
    pace = LinePace(30 * SECOND)
    assert pace.due(0)
    assert not pace.due(29 * SECOND)
    assert pace.due(30 * SECOND)
    assert not pace.due(31 * SECOND)
    assert pace.due(75 * SECOND)


class FakeWriter:
    def __init__(self) -> None:
        self._file = io.StringIO()
        self.fullwidth = 80
        self.width_of_current_line = 0


class FakeTerminal:
    """What the progress line uses of pytest's terminal reporter."""

    def __init__(self) -> None:
        self._tw = FakeWriter()
        self.lines: list[str] = []

    def ensure_newline(self) -> None:
        pass

    def write(self, text: str) -> None:
        self._tw._file.write(text)

    def write_line(self, text: str) -> None:
        self.lines.append(text)


def progress_line(tty: bool, clock: FakeClock) -> tuple[ProgressLine, FakeTerminal]:
    terminal = FakeTerminal()
    status = Progress(10, simulate([1] * 10, interval_ns=SECOND, burst=1), clock.now)

    def describe(now: int) -> tuple[str, int | None]:
        return status.describe_parts(3, now)

    line = ProgressLine(terminal, threading.RLock(), describe, tty, clock)  # type: ignore[arg-type]
    return line, terminal


def test_on_a_terminal_one_line_is_updated_in_place_and_erased(clock: FakeClock) -> None:
    line, terminal = progress_line(True, clock)
    terminal._tw.width_of_current_line = 13  # "test_a.py ..." so far
    clock.advance(2)
    line.waiting("rate tokens", 5.0)
    clock.advance(1)
    line.tick()
    clock.advance(5)
    line.tick()  # the wait is over: nothing more
    line.clear()
    assert terminal._tw._file.getvalue() == (
        "\n\x1b[Kratebatch: waiting 5s for rate tokens; 3/10 started, 90/min, 7s left"
        "\r\x1b[Kratebatch: waiting 4s for rate tokens; 3/10 started, 90/min, 6s left"
        "\r\x1b[K\x1b[A\x1b[14G"  # back to the end of pytest's line
    )
    assert terminal.lines == []


def test_in_a_log_a_line_at_most_every_30_seconds(clock: FakeClock) -> None:
    line, terminal = progress_line(False, clock)
    line.waiting("rate tokens", 2.0)
    clock.advance(10)
    line.waiting("rate tokens for batch 2", 100.0, worker="gw1")
    for _ in range(12):  # a long wait: a line every 30 s
        clock.advance(5)
        line.tick()
    assert terminal.lines == [
        "ratebatch: waiting 2s for rate tokens; 3/10 started, 7s left",  # no rate yet
        # Behind the schedule (35 s left when the wait began), but never less than the wait.
        "ratebatch: [gw1] waiting 1m20s for rate tokens for batch 2; 3/10 started, 18/min, "
        "1m20s left",
        "ratebatch: [gw1] waiting 50s for rate tokens for batch 2; 3/10 started, 18/min, 50s left",
    ]
    assert terminal._tw._file.getvalue() == ""
