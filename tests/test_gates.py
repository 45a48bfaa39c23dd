"""Declared resources and the machine's gates in whole sessions: real xdist workers sharing a
capacity, the collection errors of requests that can never fit, and the machine's memory
and load read for real."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

HEAVY_SUITE = """
import os
import time

import pytest

LOG = {log!r}


def note(kind):
    with open(LOG, "a") as log:
        log.write(f"{{kind}} {{time.monotonic_ns()}} {{os.getpid()}}\\n")


@pytest.mark.ratebatch(resources={{"memory": 2}})
@pytest.mark.parametrize("i", range({count}))
def test_heavy(i):
    note("start")
    time.sleep({sleep})
    note("end")


@pytest.mark.parametrize("i", range(2))
def test_light(i):
    pass
"""


def most_in_flight(log: Path) -> tuple[int, int]:
    """The most tests that declared resources in flight at once, and how many started."""
    events = []
    for line in log.read_text().splitlines():
        kind, stamp, _ = line.split()
        events.append((int(stamp), 0 if kind == "end" else 1))  # at a tie, the end first
    in_flight = most = 0
    for _, starts in sorted(events):
        in_flight += 1 if starts else -1
        most = max(most, in_flight)
    return most, sum(starts for _, starts in events)


def load_report(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def test_four_workers_share_a_capacity(pytester: pytest.Pytester) -> None:
    log = pytester.path / "log"
    pytester.makepyfile(test_heavy=HEAVY_SUITE.format(log=str(log), count=8, sleep=0.2))
    result = pytester.runpytest_subprocess(
        "-n", "4", "--resources", "memory=4, gpu=1", "--ratebatch-report=r.json", timeout=120
    )  # fmt: skip
    result.assert_outcomes(passed=10)
    assert most_in_flight(log) == (2, 8)  # 2 of 4 each: never more than 2 at once
    result.stdout.fnmatch_lines(["ratebatch: resources gpu=1, memory=4; store: file*"])
    report = load_report(pytester.path / "r.json")
    assert report["policy"]["resources"] == {"gpu": 1.0, "memory": 4.0}
    assert report["summary"]["waited_by_limit"]["resources"] > 0
    assert any(test["limit"] == "resources" for test in report["tests"])


def test_one_process_with_a_capacity_of_one_request(pytester: pytest.Pytester) -> None:
    log = pytester.path / "log"
    pytester.makepyfile(test_heavy=HEAVY_SUITE.format(log=str(log), count=3, sleep=0.01))
    result = pytester.runpytest("--resources=memory=2")
    result.assert_outcomes(passed=5)
    assert most_in_flight(log) == (1, 3)


@pytest.mark.parametrize(
    ("marker", "problem"),
    [
        ('resources={"gpu": 1}', "needs gpu=1 but --resources has no gpu"),
        ('resources={"memory": 10}', "needs memory=10, more than the capacity memory=8"),
        ('resources={"memory": -1}', "memory"),
        ('resources=["memory"]', "resources"),
    ],
)
def test_a_request_that_can_never_fit_is_a_collection_error(
    pytester: pytest.Pytester, marker: str, problem: str
) -> None:
    pytester.makepyfile(
        test_bad=f"""
        import pytest

        @pytest.mark.ratebatch({marker})
        def test_bad(): pass

        def test_good(): pass
        """
    )
    result = pytester.runpytest("--resources=memory=8")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*ratebatch: test_bad.py::test_bad: @pytest.mark.ratebatch: *"])
    assert problem in result.stdout.str()
    assert "Traceback" not in result.stdout.str()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--resources", "memory", "expected NAME=AMOUNT"),
        ("--resources", "memory=0", "positive"),
        ("--min-free-memory", "lots", "expected a size such as 512MiB, 2GiB or 10%"),
        ("--min-free-memory", "150%", ""),
        ("--max-load", "-1", ""),
    ],
)
def test_bad_values_are_usage_errors(
    pytester: pytest.Pytester, option: str, value: str, message: str
) -> None:
    pytester.makepyfile("def test_a(): pass")
    result = pytester.runpytest(f"{option}={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = result.stderr.str()
    assert f"{option}={value!r} (command line)" in text
    assert message in text
    assert "Traceback" not in text


def test_the_gates_pass_on_a_machine_that_meets_them(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_a(): pass\ndef test_b(): pass")
    result = pytester.runpytest("--min-free-memory=1MiB", "--max-load=1000000")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["ratebatch: min free memory 1 MiB, max load 1000000*"])


def test_memory_never_free_cancels_the_tests_at_the_total_timeout_naming_memory(
    pytester: pytest.Pytester,
) -> None:
    # No machine running this suite has 99% of its memory available.
    pytester.makepyfile("def test_a(): pass\ndef test_b(): pass")
    result = pytester.runpytest(
        "--min-free-memory=99%", "--total-timeout=1s", "--ratebatch-report=r.json"
    )
    result.assert_outcomes(skipped=2)
    report = load_report(pytester.path / "r.json")
    assert [test["outcome"] for test in report["tests"]] == ["cancelled", "cancelled"]
    reason = report["session"]["stop_reason"]
    assert "total timeout (1s) reached" in reason
    assert "available memory" in reason
    assert report["summary"]["waited_by_limit"]["free memory"] >= 0.5


def test_a_floor_above_the_machines_memory_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_a(): pass")
    result = pytester.runpytest("--min-free-memory=1000000TiB")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--min-free-memory" in result.stderr.str()
