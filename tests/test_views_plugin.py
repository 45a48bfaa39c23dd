"""The forecast, the progress line and the timeline inside real pytest sessions."""

from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree

import pytest

from pytest_ratebatch.__main__ import main
from pytest_ratebatch.views.loading import load_report

pytest_plugins = ["pytester"]


def write_tests(pytester: pytest.Pytester, count: int = 4, marker: str = "") -> None:
    pytester.makepyfile(
        test_many=f"""
        import pytest

        @pytest.mark.parametrize("n", range({count}))
        def test_one(n):
            pass

        {marker}
        def test_marked():
            pass
        """
    )


def forecast_lines(result: pytest.RunResult) -> list[str]:
    return [line for line in result.stdout.lines if line.startswith("ratebatch: forecast:")]


# --- the forecast ----------------------------------------------------------------------


def test_the_forecast_is_printed_once_before_the_first_test(pytester: pytest.Pytester) -> None:
    write_tests(pytester, 4, "@pytest.mark.ratebatch(cost=0)")
    result = pytester.runpytest("--rate-per-minute=600000", "--burst=2")
    result.assert_outcomes(passed=5)
    assert forecast_lines(result) == [
        "ratebatch: forecast: 5 tests (1 exempt) take at least 0s by the policy "
        "(test durations add to it)"
    ]
    lines = result.stdout.lines
    first_progress = next(index for index, line in enumerate(lines) if line.startswith("test_"))
    assert lines.index(forecast_lines(result)[0]) < first_progress


def test_the_forecast_counts_costs_and_stays_with_q(pytester: pytest.Pytester) -> None:
    write_tests(pytester, 2, "@pytest.mark.ratebatch(cost=3)")
    result = pytester.runpytest("-q", "--rate-per-minute=6000000", "--burst=3")
    assert forecast_lines(result) == [
        "ratebatch: forecast: 3 tests, cost 5, take at least 0s by the policy "
        "(test durations add to it)"
    ]
    assert forecast_lines(pytester.runpytest("-qq", "--rate-per-minute=6000000")) == []


def test_a_shorter_total_timeout_is_announced_before_anything_runs(
    pytester: pytest.Pytester,
) -> None:
    write_tests(pytester, 4)
    # The fourth test would wait a minute: cancelled at once, whatever the timeout's length, so
    # a long one costs nothing and a loaded machine still starts the first three in time.
    result = pytester.runpytest("--rate-per-minute=1", "--burst=3", "--total-timeout=20s")
    assert forecast_lines(result) == [
        "ratebatch: forecast: 5 tests take at least 2m by the policy (test durations add to "
        "it); the total timeout (20s) passes first: about 2 tests will be cancelled"
    ]
    result.assert_outcomes(passed=3, skipped=2)


def test_no_rate_no_forecast(pytester: pytest.Pytester) -> None:
    write_tests(pytester, 2)
    result = pytester.runpytest("--batch-size=2", "--max-failures=3")
    result.assert_outcomes(passed=3)
    assert forecast_lines(result) == []


def test_under_xdist_the_controller_prints_the_forecast_once_with_the_costs(
    pytester: pytest.Pytester,
) -> None:
    write_tests(pytester, 6, "@pytest.mark.ratebatch(cost=2)")
    result = pytester.runpytest_subprocess("-n", "2", "--rate-per-minute=60000", "--burst=4")
    result.assert_outcomes(passed=7)
    assert forecast_lines(result) == [
        "ratebatch: forecast: 7 tests, cost 8, take at least 0.004s by the policy "
        "(test durations add to it)"
    ]


# --- the timeline and the report -------------------------------------------------------


def svg_lanes(path: Path) -> list[str]:
    root = ElementTree.parse(path).getroot()
    return [
        group.get("data-lane", "")
        for group in root.iter("{http://www.w3.org/2000/svg}g")
        if group.get("class") == "lane"
    ]


def test_the_timeline_option_draws_the_session(pytester: pytest.Pytester) -> None:
    write_tests(pytester, 3)
    result = pytester.runpytest("--rate-per-minute=60000", "--ratebatch-timeline=out/t.svg")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines([f"timeline: {pytester.path / 'out' / 't.svg'}"])
    assert svg_lanes(pytester.path / "out" / "t.svg") == ["session"]


def test_the_timeline_ini_key_under_xdist_draws_a_lane_per_worker(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\nratebatch_timeline = t.svg\nratebatch_report = r.json\n")
    write_tests(pytester, 7)
    result = pytester.runpytest_subprocess("-n", "2", "--rate-per-minute=60000", "--burst=2")
    result.assert_outcomes(passed=8)
    assert svg_lanes(pytester.path / "t.svg") == ["gw0", "gw1"]
    report = json.loads((pytester.path / "r.json").read_text())
    assert report["format"] == 2
    assert report["policy"]["description"] == "rate 60000/min, burst 2"
    assert report["policy"]["rate_limit"] == []
    assert report["session"]["forecast"] == {"least": 0.006, "tests": 8, "cost": 8, "cancelled": 0}
    assert report["summary"]["cost"] == 8
    assert set(report["summary"]) == {
        "run", "cancelled", "not_run", "batches", "waited", "longest_wait", "cost",
        "achieved_per_minute", "waited_by_limit",
    }  # fmt: skip


def test_a_timeline_alone_needs_no_policy(pytester: pytest.Pytester) -> None:
    write_tests(pytester, 2)
    result = pytester.runpytest("--ratebatch-timeline=t.svg")
    result.assert_outcomes(passed=3)
    assert forecast_lines(result) == []
    assert svg_lanes(pytester.path / "t.svg") == ["session"]


# A session with something of everything a report holds: batches, an in-test acquisition, a
# throttle and its retry, a failure and the stop it causes, cancelled tests.
ROUND_TRIP = """
import pytest

@pytest.mark.parametrize("n", range(6))
def test_call(n, ratebatch, tmp_path_factory):
    ratebatch.acquire(1)
    mark = tmp_path_factory.getbasetemp().parent / f"throttled-{n}"
    if n == 2 and not mark.exists():
        mark.touch()
        ratebatch.throttled(0.05)
    assert n != 4
"""


def summary_section(result: pytest.RunResult) -> list[str]:
    """The lines of the session's ``ratebatch`` summary section, up to the report's path."""
    lines = result.stdout.lines
    start = next(i for i, line in enumerate(lines) if line.strip("= ") == "ratebatch") + 1
    end = next(i for i, line in enumerate(lines) if line.startswith("report: "))
    return lines[start:end]


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one process", "xdist"])
def test_load_report_reads_what_the_plugin_writes(
    pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str], workers: list[str]
) -> None:
    pytester.makepyfile(test_round=ROUND_TRIP)
    result = pytester.runpytest_subprocess(
        "--rate-per-minute=6000", "--burst=2", "--batch-size=2", "--max-failures=1",
        "--ratebatch-report=r.json", "-p", "no:randomly", *workers,
    )  # fmt: skip
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    path = pytester.path / "r.json"
    data = load_report(path)
    assert data == json.loads(path.read_text())  # accepted as written
    assert sorted(test["nodeid"] for test in data["tests"]) == [
        f"test_round.py::test_call[{n}]" for n in range(6)
    ]
    assert data["throttling"]["throttles"] == 1
    assert data["session"]["stop_reason"] == "max failures (1) reached"
    # Read back, the summary is the one the session printed.
    printed = summary_section(result)
    assert any(line.startswith("throttled: 1 ") for line in printed)
    capsys.readouterr()
    assert main(["summary", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == printed
    # And it draws: a lane per process that ran tests.
    assert main(["timeline", str(path), "-o", str(pytester.path / "t.svg")]) == 0
    lanes = sorted({test["worker"] or "session" for test in data["tests"] if test["start_ns"]})
    assert svg_lanes(pytester.path / "t.svg") == lanes
