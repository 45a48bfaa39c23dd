"""The whole policy across real pytest-xdist workers (subprocess sessions, real processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
import xdist  # noqa: F401  (the tests need pytest-xdist: fail, don't skip, without it)

from pytest_ratebatch.views.report import worst_excess

pytest_plugins = ["pytester"]

SECOND = 1_000_000_000
DIST_MODES = ["load", "loadscope", "loadfile", "loadgroup", "worksteal"]

# Each test notes when its body starts and ends, on the system-wide monotonic clock, so the
# barrier can be checked against what the tests themselves saw.
TIMED_TESTS = """
import os, time
import pytest

def note(event):
    line = f"{{os.environ.get('PYTEST_XDIST_WORKER', 'main')}} {{event}} {{time.monotonic_ns()}}\\n"
    with open(os.environ["TIMELINE"], "a") as timeline:
        timeline.write(line)

@pytest.mark.parametrize("n", range({count}))
def test_timed(request, n):
    note(f"start {{request.node.nodeid}}")
    time.sleep({sleep})
    {body}
    note(f"end {{request.node.nodeid}}")
"""


def write_timed(
    pytester: pytest.Pytester, count: int, sleep: float = 0.02, body: str = "pass", name: str = "a"
) -> Path:
    pytester.makepyfile(**{f"test_{name}": TIMED_TESTS.format(count=count, sleep=sleep, body=body)})
    timeline = pytester.path / "timeline.txt"
    os.environ["TIMELINE"] = str(timeline)  # inherited by the subprocess and its workers
    return timeline


def read_timeline(path: Path) -> dict[str, dict[str, int]]:
    events: dict[str, dict[str, int]] = {}
    for line in path.read_text().splitlines():
        _worker, event, nodeid, stamp = line.split()
        events.setdefault(nodeid, {})[event] = int(stamp)
    return events


def load_report(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(autouse=True)
def _timeline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIMELINE", os.devnull)


def assert_batches_keep_the_barrier(
    report: dict[str, Any], timeline: dict[str, dict[str, int]]
) -> None:
    tests = report["tests"]
    batches = sorted({test["batch"] for test in tests if test["start_ns"] is not None})
    backoff = report["policy"]["batch_backoff"] * SECOND
    for batch in batches[1:]:
        previous = [t["nodeid"] for t in tests if t["batch"] == batch - 1]
        current = [t["nodeid"] for t in tests if t["batch"] == batch]
        last_end = max(timeline[nodeid]["end"] for nodeid in previous)
        first_start = min(timeline[nodeid]["start"] for nodeid in current)
        assert first_start >= last_end + backoff, (batch, first_start - last_end)


@pytest.mark.parametrize("dist", DIST_MODES)
def test_batches_and_rate_are_global_in_every_dist_mode(
    pytester: pytest.Pytester, dist: str
) -> None:
    for name in "abc":  # three modules, so that scope- and file-based modes spread them too
        timeline = write_timed(pytester, 4, name=name)
    result = pytester.runpytest_subprocess(
        "-n", "3", f"--dist={dist}", "--rate-per-minute=1200", "--batch-size=3",
        "--batch-backoff=0.05", "--ratebatch-report=r.json",
    )  # fmt: skip
    result.assert_outcomes(passed=12)
    report = load_report(pytester.path / "r.json")
    tests = report["tests"]
    assert len(tests) == 12
    assert sorted(test["batch"] for test in tests) == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert len({test["worker"] for test in tests}) >= 2  # really spread over workers
    starts = [(test["start_ns"], test["tokens"]) for test in tests]
    assert worst_excess(starts, report["policy"]["interval_ns"], 3) <= 0
    assert_batches_keep_the_barrier(report, read_timeline(timeline))
    # Header and summary once, on the controller, with every worker's tests.
    output = result.stdout.str()
    assert output.count("ratebatch: rate 1200/min") == 1
    assert "store: file (shared by this session's workers)" in output
    result.stdout.fnmatch_lines(["tests: 12 run, 0 cancelled, in 4 batches"])


def test_four_workers_share_one_rate(pytester: pytest.Pytester) -> None:
    write_timed(pytester, 16, sleep=0)
    result = pytester.runpytest_subprocess(
        "-n", "4", "--rate-per-minute=600", "--burst=2", "--ratebatch-report=r.json"
    )
    result.assert_outcomes(passed=16)
    report = load_report(pytester.path / "r.json")
    starts = sorted(test["start_ns"] for test in report["tests"])
    assert worst_excess([(start, 1) for start in starts], report["policy"]["interval_ns"], 2) <= 0
    # One worker alone would need (16 - 2) intervals; four together need no less.
    assert starts[-1] - starts[0] >= 14 * report["policy"]["interval_ns"]


def test_failures_are_counted_across_workers(pytester: pytest.Pytester) -> None:
    write_timed(pytester, 12, body="assert n not in (0, 1)")
    result = pytester.runpytest_subprocess(
        "-n", "2", "--batch-size=2", "--max-failures=2", "-rs", "--junit-xml=junit.xml",
        "--ratebatch-report=r.json", "-p", "no:randomly",
    )  # fmt: skip
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    outcomes = result.parseoutcomes()
    assert outcomes["failed"] == 2
    assert outcomes["failed"] + outcomes.get("passed", 0) + outcomes["skipped"] == 12
    assert outcomes["skipped"] >= 8  # the batch after the failures and everything later
    result.stdout.fnmatch_lines(["*ratebatch: cancelled (max failures (2) reached)*"])
    report = load_report(pytester.path / "r.json")
    assert sorted(test["nodeid"] for test in report["tests"]) == sorted(
        f"test_a.py::test_timed[{n}]" for n in range(12)
    )
    assert sum(test["outcome"] == "cancelled" for test in report["tests"]) == outcomes["skipped"]
    junit = ElementTree.parse(pytester.path / "junit.xml").getroot()
    assert len(junit.findall(".//testcase")) == 12
    assert len(junit.findall(".//skipped")) == outcomes["skipped"]


@pytest.mark.parametrize("workers", [[], ["-n", "2"]])
def test_a_rerun_that_passes_is_not_a_failure(
    pytester: pytest.Pytester, workers: list[str]
) -> None:
    # Every test fails its first attempt and passes its rerun (pytest-rerunfailures).
    pytester.makepyfile(
        test_flaky="""
        import pytest

        @pytest.mark.parametrize("n", range(12))
        def test_flaky(n, tmp_path_factory):
            mark = tmp_path_factory.getbasetemp().parent / f"attempted-{n}"
            if not mark.exists():
                mark.touch()
                raise AssertionError("first attempt")
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "rerunfailures", "--reruns=1", "--max-failures=1", "--batch-size=2",
        "--ratebatch-report=r.json", *workers,
    )  # fmt: skip
    assert result.parseoutcomes() == {"passed": 12, "rerun": 12}
    assert result.ret == pytest.ExitCode.OK
    outcomes = {test["outcome"] for test in load_report(pytester.path / "r.json")["tests"]}
    assert outcomes == {"passed"}
    result.stdout.fnmatch_lines(["stop: none, every test was started"])


def test_a_stop_cancels_the_tests_waiting_in_other_workers_at_once(
    pytester: pytest.Pytester,
) -> None:
    # One token every 10 s. The failing test is exempt and fails 2 s in; meanwhile the other
    # worker started a test with the burst's token and waits for the next one.
    pytester.makepyfile(
        test_s="""
        import time
        import pytest

        @pytest.mark.ratebatch(cost=0)
        def test_fail():
            time.sleep(2)
            raise AssertionError("boom")

        @pytest.mark.parametrize("n", range(5))
        def test_pass(n):
            pass
        """
    )
    result = pytester.runpytest_subprocess(
        "-n", "2", "--dist=load", "--max-failures=1", "--rate-per-minute=6", "--burst=1",
        "--ratebatch-report=r.json", "-p", "no:randomly",
    )  # fmt: skip
    result.assert_outcomes(failed=1, passed=1, skipped=4)
    tests = {test["nodeid"]: test for test in load_report(pytester.path / "r.json")["tests"]}
    failure_finished = tests["test_s.py::test_fail"]["finish_ns"]
    starts = [test["start_ns"] for test in tests.values() if test["start_ns"] is not None]
    assert len(starts) == 2
    assert max(starts) < failure_finished  # nothing started after the stop
    cancelled = [test for test in tests.values() if test["outcome"] == "cancelled"]
    reasons = {test["reason"] for test in cancelled}
    assert reasons == {"ratebatch: cancelled (max failures (1) reached)"}
    # The waiter was woken by the stop, seconds before the slot it had reserved.
    (waiter,) = [test for test in cancelled if test["waited"] > 0.5]
    assert waiter["waited"] < 6, waiter


def test_a_crashed_worker_does_not_stick_the_session(pytester: pytest.Pytester) -> None:
    write_timed(pytester, 8, sleep=0.1, body="if n == 2: os._exit(1)")
    result = pytester.runpytest_subprocess(
        "-n", "2", "--batch-size=2", "--rate-per-minute=6000", "--max-failures=1",
        "--ratebatch-report=r.json", "-p", "no:randomly", timeout=120,
    )  # fmt: skip
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*crashed while running*test_timed?2?*"])
    report = load_report(pytester.path / "r.json")
    outcomes = {test["nodeid"]: test["outcome"] for test in report["tests"]}
    assert outcomes["test_a.py::test_timed[2]"] == "failed"
    crashed = next(test for test in report["tests"] if test["nodeid"].endswith("[2]"))
    assert crashed["start_ns"] is not None  # its start counts against the rate
    assert crashed["finish_ns"] is None
    assert len(outcomes) == 8
    assert "not run" not in outcomes.values()
    assert "cancelled" in outcomes.values()  # the crash counted as the one allowed failure
    assert report["session"]["stop_reason"] == "max failures (1) reached"


def test_works_with_xdist_disabled(pytester: pytest.Pytester) -> None:
    write_timed(pytester, 3)
    result = pytester.runpytest_subprocess(
        "-p", "no:xdist", "--rate-per-minute=6000", "--batch-size=2"
    )
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["ratebatch: *; store: memory"])


def test_concurrent_sessions_do_not_share_state(pytester: pytest.Pytester) -> None:
    # Each session may start its 3 tests at once (burst 3); shared state would make one wait
    # a minute per token and trip its total timeout.
    pytester.makepyfile(test_x="def test_x(n=0): pass\ndef test_y(): pass\ndef test_z(): pass")
    command = [
        sys.executable, "-m", "pytest", "-n", "2", "--rate-per-minute=1", "--burst=3",
        "--total-timeout=20s", "-p", "no:cacheprovider",
    ]  # fmt: skip
    sessions = [
        subprocess.Popen(command, cwd=pytester.path, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for session in sessions:
        output, _ = session.communicate(timeout=120)
        assert session.returncode == 0, output
        assert "3 passed" in output


def test_long_waits_are_announced_once_by_the_controller(pytester: pytest.Pytester) -> None:
    write_timed(pytester, 3, sleep=0)
    result = pytester.runpytest_subprocess("-n", "2", "--rate-per-minute=50")  # 1.2 s per token
    result.assert_outcomes(passed=3)
    announcements = [
        line for line in result.stdout.lines if "ratebatch: [gw" in line and "waiting" in line
    ]
    # Two workers wait in turn, but a log gets at most one such line every 30 s.
    assert len(announcements) == 1, result.stdout.str()
    assert all("for rate tokens; " in line for line in announcements)
    assert "/3 started" in announcements[0]


def test_ctrl_c_while_workers_wait(pytester: pytest.Pytester) -> None:
    write_timed(pytester, 6, sleep=0)
    # xdist and this plugin alone: others installed here may take their time on an interrupt.
    only = ["-p", "xdist.plugin", "-p", "pytest_ratebatch_entry.plugin"]
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", *only, "-n", "2", "--rate-per-minute=2"],
        cwd=pytester.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
    )
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if "waiting 30s for rate tokens" in line:
            break
    assert "waiting 30s" in seen[-1], seen
    interrupted = time.monotonic()
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert time.monotonic() - interrupted < 15  # generous on a loaded machine, not 30 s per test
    assert process.returncode == pytest.ExitCode.INTERRUPTED, output
    assert "KeyboardInterrupt" in output
