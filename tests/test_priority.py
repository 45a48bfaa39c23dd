"""Priorities: ``@pytest.mark.ratebatch(priority=N)`` orders the tiers, higher first; the
order inside a tier is pytest's (and other plugins'); a stop cancels the lowest."""

from __future__ import annotations

import importlib
import json
from typing import Any

import pytest

from pytest_ratebatch.limits.policy import MAX_PRIORITY, parse_priority
from pytest_ratebatch.views.forecast import (
    describe_cancelled_priorities,
    describe_forecast,
    simulate,
)

SECOND = 1_000_000_000

SUITE = """
import pytest

def test_low_a():
    pass

@pytest.mark.ratebatch(priority=5)
def test_high_a():
    pass

def test_low_b():
    pass

@pytest.mark.ratebatch(priority=-1)
def test_last():
    pass

@pytest.mark.ratebatch(priority=5)
def test_high_b():
    pass

@pytest.mark.ratebatch(priority=1)
class TestMiddle:
    @pytest.mark.ratebatch(cost=2)
    def test_costly(self):
        pass

    def test_plain(self):
        pass
"""


def run_order(result: pytest.RunResult) -> list[str]:
    return [
        line.split("::")[-1].split(" ")[0]
        for line in result.outlines
        if "::" in line and (" PASSED" in line or " FAILED" in line or " SKIPPED" in line)
    ]


@pytest.mark.parametrize("value", [0, 7, -3, MAX_PRIORITY, -MAX_PRIORITY])
def test_parse_priority_takes_whole_numbers(value: int) -> None:
    assert parse_priority(value) == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "priority must be a whole number, not True"),
        (1.5, "priority must be a whole number, not 1.5"),
        ("high", "priority must be a whole number, not 'high'"),
        (None, "priority must be a whole number, not None"),
        (MAX_PRIORITY + 1, f"priority must be within -{MAX_PRIORITY}..{MAX_PRIORITY}"),
        (-(10**50), "not -100000000000000000000000000000000000000..."),
    ],
)
def test_parse_priority_refuses(value: object, message: str) -> None:
    with pytest.raises(ValueError, match="priority must be") as refused:
        parse_priority(value)
    assert message in str(refused.value)


def test_higher_priorities_start_first_and_a_tier_keeps_pytests_order(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_order=SUITE)
    result = pytester.runpytest(
        "-v", "--rate-per-minute=600000", "--burst=5", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=7)
    assert run_order(result) == [
        "test_high_a",
        "test_high_b",
        "test_costly",  # the class's priority holds for a method whose marker states a cost
        "test_plain",
        "test_low_a",
        "test_low_b",
        "test_last",
    ]


def test_without_priorities_the_order_is_untouched(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_plain="""
        import pytest

        @pytest.mark.ratebatch(cost=2)
        def test_c(): pass
        def test_a(): pass
        def test_b(): pass
        """
    )
    result = pytester.runpytest("-v", "--rate-per-minute=600000", "--burst=2")
    assert run_order(result) == ["test_c", "test_a", "test_b"]


def test_a_conftest_hook_can_give_priorities(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest

        def pytest_collection_modifyitems(items):
            for item in items:
                if "smoke" in item.name:
                    item.add_marker(pytest.mark.ratebatch(priority=10))
        """
    )
    pytester.makepyfile(
        test_hooked="""
        def test_full_1(): pass
        def test_full_2(): pass
        def test_smoke_1(): pass
        def test_full_3(): pass
        def test_smoke_2(): pass
        """
    )
    result = pytester.runpytest("-v", "--rate-per-minute=600000")
    assert run_order(result) == [
        "test_smoke_1",
        "test_smoke_2",
        "test_full_1",
        "test_full_2",
        "test_full_3",
    ]


def test_a_bad_priority_is_a_collection_error_naming_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_bad="""
        import pytest

        @pytest.mark.ratebatch(priority="high")
        def test_bad(): pass

        def test_good(): pass
        """
    )
    result = pytester.runpytest("--rate-per-minute=600000")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(
        ["*ratebatch: test_bad.py::test_bad: @pytest.mark.ratebatch: priority must be a whole "
         "number, not 'high'*"]
    )  # fmt: skip
    assert "Traceback" not in result.stdout.str()


def test_a_total_timeout_cancels_the_lowest_priorities_and_the_forecast_says_so(
    pytester: pytest.Pytester,
) -> None:
    # 10 tests at 1 start a second, burst 3: a total timeout of 4 s lets about 6 start (fewer
    # on a loaded machine), the 3 critical ones first, at once.
    pytester.makepyfile(
        test_budget="""
        import pytest

        @pytest.mark.parametrize("i", range(7))
        def test_routine(i): pass

        @pytest.mark.ratebatch(priority=1)
        @pytest.mark.parametrize("i", range(3))
        def test_critical(i): pass
        """
    )
    result = pytester.runpytest(
        "-v", "--rate-per-minute=60", "--burst=3", "--total-timeout=4s",
        "--ratebatch-report=r.json", "-p", "no:cacheprovider",
    )  # fmt: skip
    result.stdout.fnmatch_lines(
        ["*forecast: 10 tests take at least 7s*about 4 tests will be cancelled, "
         "all of priority 0*"]
    )  # fmt: skip
    report = json.loads((pytester.path / "r.json").read_text())
    tests = {test["nodeid"].split("::")[-1]: test for test in report["tests"]}
    for i in range(3):
        assert tests[f"test_critical[{i}]"]["outcome"] == "passed"
        assert tests[f"test_critical[{i}]"]["priority"] == 1
    cancelled = [name for name, test in tests.items() if test["outcome"] == "cancelled"]
    assert cancelled
    assert all(name.startswith("test_routine") for name in cancelled)
    assert all(test["priority"] == 0 for name, test in tests.items() if "routine" in name)


def test_the_forecast_counts_cancelled_tests_by_priority() -> None:
    forecast = simulate([1] * 6, interval_ns=SECOND, burst=1, deadline_ns=3 * SECOND)
    assert forecast.cancelled == 3
    text = describe_forecast(forecast, 3.0, priorities=[2, 2, 1, 1, 0, 0])
    assert text.endswith("about 3 tests will be cancelled: 2 of priority 0, 1 of priority 1")
    assert describe_cancelled_priorities([0, 0]) == ", all of priority 0"


def test_failed_first_orders_within_a_tier(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_ff="""
        import os
        import pytest

        def test_a(): pass
        def test_b(): assert not os.environ.get("FAIL_B")
        @pytest.mark.ratebatch(priority=3)
        def test_c(): pass
        def test_d(): pass
        """
    )
    pytester.runpytest("--rate-per-minute=600000", "--ff")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FAIL_B", "1")
        pytester.runpytest("--rate-per-minute=600000")  # test_b fails once, in the cache
    result = pytester.runpytest("-v", "--rate-per-minute=600000", "--ff")
    # --ff puts test_b first; the priority tier still comes before it.
    assert run_order(result) == ["test_c", "test_b", "test_a", "test_d"]


def test_pytest_order_orders_within_a_tier(pytester: pytest.Pytester) -> None:
    importlib.import_module("pytest_order")  # a test dependency: fails, not skips, if missing

    pytester.makepyfile(
        test_ordered="""
        import pytest

        @pytest.mark.order(2)
        def test_a(): pass
        @pytest.mark.order(1)
        def test_b(): pass
        @pytest.mark.ratebatch(priority=1)
        @pytest.mark.order(4)
        def test_c(): pass
        @pytest.mark.ratebatch(priority=1)
        @pytest.mark.order(3)
        def test_d(): pass
        """
    )
    result = pytester.runpytest("-v", "--rate-per-minute=600000", "-p", "pytest_order")
    assert run_order(result) == ["test_d", "test_c", "test_b", "test_a"]


def test_priorities_under_xdist_in_the_report_and_the_forecast(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_workers="""
        import pytest

        @pytest.mark.parametrize("i", range(14))
        def test_routine(i): pass

        @pytest.mark.ratebatch(priority=2)
        @pytest.mark.parametrize("i", range(2))
        def test_critical(i): pass
        """
    )
    # 1 start a second, burst 2: the forecast cancels 5 of 16 at a total timeout of 10 s.
    # The critical tests are each worker's first: the first two starts, at once.
    result = pytester.runpytest_subprocess(
        "-n", "2", "--rate-per-minute=60", "--burst=2", "--total-timeout=10s",
        "--ratebatch-report=r.json", "-p", "no:cacheprovider", timeout=120,
    )  # fmt: skip
    result.stdout.fnmatch_lines(
        ["*forecast: 16 tests*about 5 tests will be cancelled, all of priority 0*"]
    )
    report: dict[str, Any] = json.loads((pytester.path / "r.json").read_text())
    tests = {test["nodeid"].split("::")[-1]: test for test in report["tests"]}
    assert [tests[f"test_critical[{i}]"]["priority"] for i in range(2)] == [2, 2]
    assert all(tests[f"test_critical[{i}]"]["outcome"] == "passed" for i in range(2))
    assert {tests[f"test_routine[{i}]"]["priority"] for i in range(14)} == {0}
    assert any(test["outcome"] == "cancelled" for test in tests.values())


def test_pytest_randomly_shuffles_within_a_tier(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    importlib.import_module("pytest_randomly")  # a test dependency: fails, not skips, if missing
    monkeypatch.delenv("PYTEST_ADDOPTS")  # on, as where it is installed
    pytester.makepyfile(
        test_shuffled="""
        import pytest

        @pytest.mark.parametrize("i", range(8))
        def test_low(i): pass

        @pytest.mark.ratebatch(priority=1)
        @pytest.mark.parametrize("i", range(3))
        def test_high(i): pass
        """
    )
    tiers = []
    for seed in (1, 2, 3):
        result = pytester.runpytest(
            "-v", "--rate-per-minute=600000", "-p randomly", f"--randomly-seed={seed}"
        )
        order = [
            line.split("::")[-1].split(" ")[0] for line in result.outlines if " PASSED" in line
        ]
        assert len(order) == 11, result.outlines
        assert {name.split("[")[0] for name in order[:3]} == {"test_high"}  # the tier first
        tiers.append(tuple(order[3:]))
    assert len(set(tiers)) > 1  # pytest-randomly did shuffle within the tier


def test_stepwise_resumes_at_the_failure_and_priorities_order_the_rest(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        test_sw="""
        import os
        import pytest

        def test_a(): pass
        def test_b(): assert not os.environ.get("FAIL_B")
        @pytest.mark.ratebatch(priority=3)
        def test_c(): pass
        def test_d(): pass
        """
    )
    monkeypatch.setenv("FAIL_B", "1")
    first = pytester.runpytest("-v", "--rate-per-minute=600000", "--sw")
    assert run_order(first) == ["test_c", "test_a", "test_b"]  # --sw stops at the failure
    monkeypatch.delenv("FAIL_B")
    second = pytester.runpytest("-v", "--rate-per-minute=600000", "--sw")
    # --sw skips what came before the failure in pytest's order; the priority tier still
    # comes first among the rest.
    assert run_order(second) == ["test_c", "test_b", "test_d"]
