"""Per-test cost (``@pytest.mark.ratebatch(cost=N)``) and the in-test ``ratebatch`` fixture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pytest_ratebatch.limits.policy import parse_cost
from pytest_ratebatch.views.report import worst_excess

pytest_plugins = ["pytester"]


def load_report(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def all_admissions(report: dict[str, Any]) -> list[tuple[int, int]]:
    """Every start and every in-test acquisition, as ``(time, tokens)``."""
    admissions = []
    for test in report["tests"]:
        if test["start_ns"] is not None and test["tokens"]:
            admissions.append((test["start_ns"], test["tokens"]))
        admissions += [(start, tokens) for start, tokens, _ in test["acquired"]]
    return admissions


@pytest.mark.parametrize(
    ("args", "kwargs", "cost"),
    [
        ((), {}, 1),
        ((), {"cost": 0}, 0),
        ((3,), {}, 3),
        ((), {"cost": 5}, 5),
        ((), {"pace_calls": False}, 1),
        ((2,), {"pace_calls": True}, 2),
    ],
)
def test_parse_cost(args: tuple[Any, ...], kwargs: dict[str, Any], cost: int) -> None:
    assert parse_cost(args, kwargs, burst=5) == cost


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {"cost": -1}, "whole number >= 0"),
        ((), {"cost": 1.5}, "whole number >= 0"),
        ((), {"cost": True}, "whole number >= 0"),
        ((), {"tokens": 2}, "takes cost=N, priority=N"),
        ((1, 2), {}, "takes cost=N, priority=N"),
        ((1,), {"cost": 1}, "takes cost=N, priority=N"),
        ((), {"pace_calls": 0}, "pace_calls must be True or False, not 0"),
        ((), {"cost": 6}, r"cost 6 exceeds the burst \(5\)"),
    ],
)
def test_parse_cost_rejects(args: tuple[Any, ...], kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_cost(args, kwargs, burst=5)


def test_marker_is_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(
        ["@pytest.mark.ratebatch(cost=1, priority=0, resources={}, pace_calls=True): tokens*"]
    )


def test_costs_are_taken_at_each_start(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.ratebatch(cost=3)
        def test_three_calls(): pass

        @pytest.mark.ratebatch(cost=0)
        def test_offline(): pass

        def test_one_call(): pass
        """
    )
    result = pytester.runpytest("--rate-per-minute=600", "--burst=3", "--ratebatch-report=r.json")
    result.assert_outcomes(passed=3)
    report = load_report(pytester.path / "r.json")
    tokens = {test["nodeid"].split("::")[1]: test["tokens"] for test in report["tests"]}
    assert tokens == {"test_three_calls": 3, "test_offline": 0, "test_one_call": 1}
    starts = {test["nodeid"].split("::")[1]: test["start_ns"] for test in report["tests"]}
    interval = report["policy"]["interval_ns"]
    # The bucket is empty after the first test; the exempt test does not wait for it.
    assert starts["test_offline"] - starts["test_three_calls"] < interval / 2
    assert starts["test_one_call"] - starts["test_three_calls"] >= interval
    assert worst_excess(all_admissions(report), interval, 3) <= 0


def test_exempt_tests_skip_batches_but_not_a_stop(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        def test_fails(): assert False

        @pytest.mark.ratebatch(cost=0)
        def test_unit(): pass
        """
    )
    result = pytester.runpytest(
        "--batch-size=1", "--max-failures=1", "--ratebatch-report=r.json", "-p", "no:randomly"
    )
    result.assert_outcomes(failed=1, skipped=1)
    tests = load_report(pytester.path / "r.json")["tests"]
    assert [test["batch"] for test in tests] == [1, 0]
    assert tests[1]["outcome"] == "cancelled"


def test_a_batch_costing_more_than_the_burst_is_paced_inside(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.ratebatch(cost=2)
        @pytest.mark.parametrize("n", range(6))
        def test_two_calls(n): pass
        """
    )
    result = pytester.runpytest(
        "--rate-per-minute=1200", "--burst=3", "--batch-size=3", "--ratebatch-report=r.json"
    )
    result.assert_outcomes(passed=6)
    report = load_report(pytester.path / "r.json")
    assert [test["batch"] for test in report["tests"]] == [1, 1, 1, 2, 2, 2]
    assert worst_excess(all_admissions(report), report["policy"]["interval_ns"], 3) <= 0


@pytest.mark.parametrize(
    ("marker", "message", "args"),
    [
        ("ratebatch(cost=-1)", "cost must be a whole number >= 0, not -1", ["-n", "2"]),
        ("ratebatch(cost='2')", "cost must be a whole number >= 0, not '2'", []),
        ("ratebatch(cost=9)", "cost 9 exceeds the burst (2)*", []),
        (
            "ratebatch(calls=2)",
            "takes cost=N, priority=N, resources={NAME: AMOUNT} and pace_calls=True|False",
            [],
        ),
    ],
)
def test_a_bad_marker_is_a_collection_error_naming_the_test(
    pytester: pytest.Pytester, marker: str, message: str, args: list[str]
) -> None:
    pytester.makepyfile(
        test_bad=f"""
        import pytest

        @pytest.mark.{marker}
        def test_bad(): pass

        def test_good(): pass
        """
    )
    result = pytester.runpytest_subprocess("--rate-per-minute=60", "--burst=2", *args)
    assert result.ret != pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        [
            "*ERROR collecting test_bad.py*",
            f"ratebatch: test_bad.py::test_bad: @pytest.mark.ratebatch: {message}",
        ]
    )
    assert "Traceback" not in result.stdout.str()
    assert "passed" not in result.stdout.str()


MARKED_IN_CONFTEST = """
import pytest

def pytest_collection_modifyitems(items):
    for item in items:
        if "offline" in item.nodeid:
            item.add_marker(pytest.mark.ratebatch(cost=0))
"""


@pytest.mark.parametrize("workers", [[], ["-n", "2"]])
def test_markers_added_by_a_conftest_hook_count(
    pytester: pytest.Pytester, workers: list[str]
) -> None:
    pytester.makeconftest(MARKED_IN_CONFTEST)
    pytester.makepyfile(
        test_offline="""
        import pytest

        @pytest.mark.parametrize("n", range(20))
        def test_parse(n): pass
        """,
        test_online="def test_call(): pass",
    )
    # At 6/min, burst 1, the exempt tests would take minutes if they took tokens.
    result = pytester.runpytest_subprocess(
        "--rate-per-minute=6", "--ratebatch-report=r.json", "--total-timeout=60s", *workers
    )
    result.assert_outcomes(passed=21)
    report = load_report(pytester.path / "r.json")
    tokens = {test["nodeid"]: test["tokens"] for test in report["tests"]}
    assert tokens.pop("test_online.py::test_call") == 1
    assert set(tokens.values()) == {0}
    assert len(tokens) == 20


DOCTEST_MODULE = '''
def double(x):
    """
    >>> double(2)
    4
    """
    return 2 * x
'''


def test_markers_on_unittest_classes_and_doctests_count(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest

        def pytest_collection_modifyitems(items):
            for item in items:
                if isinstance(item, pytest.DoctestItem):
                    item.add_marker(pytest.mark.ratebatch(cost=3))
        """
    )
    pytester.makepyfile(
        test_unit="""
        import unittest
        import pytest

        @pytest.mark.ratebatch(cost=2)
        class TestClient(unittest.TestCase):
            def test_get(self): pass
            def test_put(self): pass
        """,
        helpers=DOCTEST_MODULE,
    )
    result = pytester.runpytest(
        "--doctest-modules", "--rate-per-minute=60000", "--burst=3", "--ratebatch-report=r.json"
    )
    result.assert_outcomes(passed=3)
    report = load_report(pytester.path / "r.json")
    tokens = {test["nodeid"]: test["tokens"] for test in report["tests"]}
    assert tokens == {
        "helpers.py::helpers.double": 3,
        "test_unit.py::TestClient::test_get": 2,
        "test_unit.py::TestClient::test_put": 2,
    }


@pytest.mark.parametrize("workers", [[], ["-n", "2"]])
def test_a_bad_marker_from_a_conftest_hook_stops_before_any_test(
    pytester: pytest.Pytester, workers: list[str]
) -> None:
    pytester.makeconftest(MARKED_IN_CONFTEST.replace("cost=0", "cost=-2"))
    pytester.makepyfile(
        test_offline="def test_parse(): pass",
        test_online="""
        import pytest

        @pytest.mark.parametrize("n", range(6))
        def test_call(n): raise AssertionError("ran")
        """,
    )
    result = pytester.runpytest_subprocess("--rate-per-minute=600", *workers)
    assert result.ret != pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        [
            "*ERROR collecting test_offline.py*",
            "ratebatch: test_offline.py::test_parse: @pytest.mark.ratebatch: cost must be *-2",
        ]
    )
    assert "ran" not in result.stdout.str()
    assert "passed" not in result.stdout.str()
    assert "Traceback" not in result.stdout.str()


def test_fixture_takes_tokens_from_the_same_bucket(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.ratebatch(cost=0)
        def test_variable_calls(ratebatch):
            assert ratebatch.active
            for _ in range(3):
                ratebatch.acquire()
            ratebatch.acquire(cost=5)  # more than the burst: taken a burst at a time

        def test_next(): pass
        """
    )
    result = pytester.runpytest("--rate-per-minute=1200", "--burst=2", "--ratebatch-report=r.json")
    result.assert_outcomes(passed=2)
    report = load_report(pytester.path / "r.json")
    acquired = report["tests"][0]["acquired"]
    assert [tokens for _, tokens, _ in acquired] == [1, 1, 1, 2, 2, 1]
    admissions = all_admissions(report)
    assert sum(tokens for _, tokens in admissions) == 9
    interval = report["policy"]["interval_ns"]
    assert worst_excess(admissions, interval, 2) <= 0
    times = sorted(time for time, _ in admissions)
    assert times[-1] - times[0] >= (9 - 2) * interval


def test_fixture_is_a_no_op_without_a_policy(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        "def test_free(ratebatch):\n    assert not ratebatch.active\n    ratebatch.acquire(100)"
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_fixture_honours_the_stop(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_fails(): assert False

        def test_keeps_calling(ratebatch):
            ratebatch.acquire()
        """
    )
    # The stop comes between the two tests here; the second test is cancelled at its start.
    result = pytester.runpytest("--max-failures=1", "-p", "no:randomly", "-rs")
    result.assert_outcomes(failed=1, skipped=1)
    pytester.makepyfile(
        test_inside="""
        import time

        def test_slow_then_call(ratebatch):
            time.sleep(1.2)
            ratebatch.acquire()  # the total timeout passed meanwhile
            raise AssertionError("not reached")
        """
    )
    result = pytester.runpytest("test_inside.py", "--total-timeout=1s", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*ratebatch: cancelled (total timeout (1s) passed)*"])


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one process", "xdist"])
def test_tokens_cut_off_by_the_total_timeout_cancel_the_test(
    pytester: pytest.Pytester, workers: list[str]
) -> None:
    pytester.makepyfile(
        test_inside="""
        def test_many_calls(ratebatch):
            ratebatch.acquire(100)  # a minute for the last token: past the total timeout
            raise AssertionError("not reached")
        """
    )
    result = pytester.runpytest_subprocess(
        "--rate-per-minute=1", "--burst=100", "--total-timeout=30s", "--ratebatch-report=r.json",
        "-rs", *workers,
    )  # fmt: skip
    result.assert_outcomes(skipped=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # a cancelled test is no success
    reason = "ratebatch: cancelled (total timeout (30s) would pass before the next start)"
    result.stdout.fnmatch_lines(["tests: 0 run, 1 cancelled"])
    # Where the test is, not where the plugin raised.
    result.stdout.fnmatch_lines([f"SKIPPED [[]1[]] test_inside.py:1: {reason}"])
    report = load_report(pytester.path / "r.json")
    (test,) = report["tests"]
    assert (test["outcome"], test["reason"]) == ("cancelled", reason)
    assert (report["summary"]["run"], report["summary"]["cancelled"]) == (0, 1)
    assert test["acquired"] == []  # none taken: the wait was not begun


def test_fixture_under_xdist(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.ratebatch(cost=0)
        @pytest.mark.parametrize("n", range(4))
        def test_calls(ratebatch, n):
            ratebatch.acquire(2)
        """
    )
    result = pytester.runpytest_subprocess(
        "-n", "2", "--rate-per-minute=1200", "--burst=2", "--ratebatch-report=r.json"
    )
    result.assert_outcomes(passed=4)
    report = load_report(pytester.path / "r.json")
    admissions = all_admissions(report)
    assert sum(tokens for _, tokens in admissions) == 8
    assert worst_excess(admissions, report["policy"]["interval_ns"], 2) <= 0


def test_store_choices(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_one(): pass")
    result = pytester.runpytest_subprocess("--rate-per-minute=60", "--ratebatch-store=file")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["ratebatch: *; store: file*"])
    result = pytester.runpytest_subprocess(
        "-n", "2", "--rate-per-minute=60", "--ratebatch-store=memory"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*the memory store cannot be shared by pytest-xdist workers*"])
    result = pytester.runpytest_subprocess("--rate-per-minute=60", "--ratebatch-store=mysql://x")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: ratebatch: --ratebatch-store='mysql://x' (command line): not a store*"]
    )
    result = pytester.runpytest_subprocess(
        "--rate-per-minute=60", "--ratebatch-store=redis://u:hunter2@h:1/0", "--ratebatch-key=a b"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "hunter2" not in result.stderr.str() + result.stdout.str()
