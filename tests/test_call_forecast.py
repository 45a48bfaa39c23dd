"""The forecast of calls from the last run: its arithmetic and wording, the counts kept in
pytest's cache, and real sessions calling a real server twice."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from types import SimpleNamespace
from xml.etree import ElementTree

import pytest

from pytest_ratebatch.limits.calls import parse_call_limit
from pytest_ratebatch.limits.policy import WindowLimit
from pytest_ratebatch.plugin.reporter import TestsRun
from pytest_ratebatch.views import call_forecast as call_forecast_module
from pytest_ratebatch.views.call_forecast import (
    CACHE_KEY,
    call_forecast_lines,
    describe_call_forecast,
    least_time_ns,
    merge_counts,
    read_counts,
)
from pytest_ratebatch.views.forecast import simulate
from tests.call_server import CallServer

pytest_plugins = ["pytester"]

SECOND = 1_000_000_000
MINUTE = 60 * SECOND


def windows(*pairs: tuple[int, int]) -> tuple[WindowLimit, ...]:
    return tuple(WindowLimit(count, window_ns) for count, window_ns in pairs)


# --- the least time ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("calls", "pairs", "least"),
    [
        (0, ((2, SECOND),), 0),
        (1, ((2, SECOND),), 0),
        (2, ((2, SECOND),), 0),
        (3, ((2, SECOND),), SECOND),
        (4, ((2, SECOND),), SECOND),
        (5, ((2, SECOND),), 2 * SECOND),
        (1140, ((120, MINUTE),), 9 * MINUTE),  # floor(1139 / 120) = 9 windows
        (1141, ((120, MINUTE),), 9 * MINUTE),
        (1201, ((120, MINUTE),), 10 * MINUTE),
        (7, ((3, 1), (1, 7)), 42),  # exact integers, no rounding: 6 windows of 7 ns
        (100, (), 0),  # no window: nothing to wait for
        # The largest window's bound: 10/1s allows 25 calls in 2 s, 20/10s needs 10 s.
        (25, ((10, SECOND), (20, 10 * SECOND)), 10 * SECOND),
        # Together the windows hold the calls longer than either alone (2 s each): two at
        # 0, one at 1 s (3 in 2 s), two at 2 s, the sixth at 3 s.
        (6, ((2, SECOND), (3, 2 * SECOND)), 3 * SECOND),
    ],
)
def test_the_least_time_of_calls_under_windows(
    calls: int, pairs: tuple[tuple[int, int], ...], least: int
) -> None:
    assert least_time_ns(calls, windows(*pairs)) == least


@pytest.mark.parametrize(
    "pairs",
    [
        ((3, 1000),),
        ((2, 1000), (3, 2000)),
        ((10, 1000), (20, 10_000)),
        ((5, 700), (7, 1300), (11, 5000)),
        ((4, 1000), (4, 1000)),
        ((1, 1000), (100, 1000)),
    ],
)
def test_the_least_time_is_the_greedy_schedule_of_the_forecast(
    pairs: tuple[tuple[int, int], ...],
) -> None:
    # The tests' forecast schedules one start at a time: the same windows, the same answer,
    # and never less than each window alone imposes.
    for calls in range(0, 80):
        expected = simulate([1] * calls, interval_ns=None, burst=1, windows=pairs).span_ns
        least = least_time_ns(calls, windows(*pairs))
        assert least == expected, calls
        for count, window_ns in pairs:
            assert least >= max(0, calls - 1) // count * window_ns


def test_many_calls_are_scheduled_by_groups() -> None:
    # A million calls under a minute's window and a day's: 500 a minute for 20 minutes a
    # day, the last group on day 100, 19 minutes in.
    day = 24 * 60 * MINUTE
    limit = windows((500, MINUTE), (10_000, day))
    assert least_time_ns(1_000_000, limit) == 99 * day + 19 * MINUTE


def test_a_schedule_of_too_many_groups_is_cut_short_at_a_lower_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A million calls at 1/s: the day's window never binds, the cut schedule says so too.
    limit = windows((1, SECOND), (100_000, 24 * 60 * MINUTE))
    assert least_time_ns(1_000_000, limit) == 999_999 * SECOND
    pairs = ((2, 1000), (3, 2000))
    for cut in range(1, 12):
        monkeypatch.setattr(call_forecast_module, "MAX_GROUPS", cut)
        for calls in range(2, 30):
            least = least_time_ns(calls, windows(*pairs))
            exact = simulate([1] * calls, interval_ns=None, burst=1, windows=pairs).span_ns
            assert max((calls - 1) // count * window for count, window in pairs) <= least
            assert least <= exact


# --- the wording ---------------------------------------------------------------------------

API = parse_call_limit("api.example.com=120/min")


def test_the_forecast_line_of_a_stated_limit() -> None:
    text = describe_call_forecast(300, 1140, API, 0, least_time_ns(1140, API.windows))
    assert text == (
        "300 tests, about 1,140 calls to api.example.com (from the last run), take at least 9m"
    )
    text = describe_call_forecast(1, 1, API, 0, 0)
    assert text == "1 test, about 1 call to api.example.com (from the last run), takes at least 0s"


def test_an_auto_limit_has_no_time_and_tests_without_a_count_are_said() -> None:
    auto = parse_call_limit("*.example.com:8443=auto, concurrency 2")
    text = describe_call_forecast(12_345, 1_234_567, auto, 1_200)
    assert text == (
        "12,345 tests, about 1,234,567 calls to *.example.com:8443 "
        "(from the last run; 1,200 tests without a count)"
    )
    assert describe_call_forecast(2, 3, auto, 1).endswith(
        "(from the last run; 1 test without a count)"
    )


def test_the_lines_of_the_collected_tests() -> None:
    other = parse_call_limit("other.example.com=2/1s, 100/1h")
    limits = (API, other, parse_call_limit("quiet.example.com=1/s"))
    known = {
        "t::a": {"api.example.com": 570, "other.example.com": 3},
        "t::b": {"api.example.com": 570},
        "t::c": {},
        "t::gone": {"api.example.com": 99},  # not collected this time
    }
    lines = call_forecast_lines(limits, ["t::a", "t::b", "t::c", "t::new"], known)
    assert lines == [
        "4 tests, about 1,140 calls to api.example.com "
        "(from the last run; 1 test without a count), take at least 9m",
        "4 tests, about 3 calls to other.example.com "
        "(from the last run; 1 test without a count), take at least 1s",
    ]  # a limit no counted test called has no line
    # --dist each: every worker runs every test.
    (line, _) = call_forecast_lines(limits, ["t::a", "t::b", "t::c"], known, repeat=2)
    assert (
        line
        == "6 tests, about 2,280 calls to api.example.com (from the last run), take at least 18m"
    )
    assert call_forecast_lines(limits, ["t::new"], known) == []  # no count: no line
    assert call_forecast_lines(limits, [], known) == []


# --- the counts in the cache ----------------------------------------------------------------


def test_counts_read_from_the_cache_keep_only_good_entries() -> None:
    assert read_counts(None) == {}
    assert read_counts(["t::a"]) == {}
    data = {
        "t::a": {"h": 3, "g": 0, "bad": "2", "flag": True, "neg": -1},
        "t::b": {},
        "t::c": 5,
        "t::d": {"h": 1.5},
    }
    assert read_counts(data) == {"t::a": {"h": 3}, "t::b": {}, "t::d": {}}


def test_merging_replaces_the_tests_that_ran_and_keeps_the_others() -> None:
    previous = {"t::a": {"h": 3}, "t::b": {"h": 2}, "t::c": {"h": 1}, "t::bad": "x"}
    runs = {"t::a": 1, "t::b": 1, "t::new": 1}
    merged = merge_counts(previous, runs, {"t::a": {"h": 5}, "t::x": {"h": 1}})
    # t::b ran and made no call; t::c did not run; t::new is new; t::x did not run.
    assert merged == {"t::a": {"h": 5}, "t::b": {}, "t::c": {"h": 1}, "t::new": {}}
    assert merge_counts(None, {"t::a": 1}, {"t::a": {"h": 1, "g": 0}}) == {"t::a": {"h": 1}}
    assert json.loads(json.dumps(merged)) == merged  # what the cache stores


def test_a_test_run_by_several_workers_keeps_one_runs_share() -> None:
    # --dist each: the counts of 3 workers added up, each test run 3 times.
    counts = {"t::a": {"h": 30, "g": 1}, "t::b": {"h": 4}, "t::c": {"h": 5}}
    merged = merge_counts({}, {"t::a": 3, "t::b": 3, "t::c": 2}, counts)
    assert merged == {"t::a": {"h": 10}, "t::b": {"h": 1}, "t::c": {"h": 3}}  # half up


def report(
    nodeid: str, worker: str = "", skipped: str = "", when: str = "teardown"
) -> SimpleNamespace:
    node = SimpleNamespace(gateway=SimpleNamespace(id=worker)) if worker else None
    longrepr = ("test_a.py", 1, f"Skipped: {skipped}") if skipped else None
    return SimpleNamespace(
        nodeid=nodeid, when=when, skipped=bool(skipped), longrepr=longrepr, node=node
    )


def test_the_tests_that_ran_by_worker_without_the_cancelled_nor_the_lost() -> None:
    run = TestsRun()
    for logged in (
        report("t::a", "gw0", when="setup"),
        report("t::a", "gw0", when="call"),
        report("t::a", "gw0"),
        report("t::a", "gw1"),  # --dist each
        report("t::b", "gw1", skipped="no network", when="setup"),
        report("t::b", "gw1"),  # skipped: it ran, without a call
        report("t::c", "gw1", skipped="ratebatch: cancelled (max failures (1) reached)"),
        report("t::c", "gw1"),
        report("t::d", "gw2"),  # gw2 crashed later: its counts never came
        report("t::e", "gw2", when="call"),  # the test gw2 crashed in, or an interrupt
    ):
        run.pytest_runtest_logreport(logged)  # type: ignore[arg-type]
    assert run.runs() == {"t::a": 2, "t::b": 1, "t::d": 1}
    assert run.runs(["gw2"]) == {"t::a": 2, "t::b": 1}
    plain = TestsRun()
    plain.pytest_runtest_logreport(report("t::a"))  # type: ignore[arg-type]
    assert plain.runs() == {"t::a": 1}


# --- real sessions ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[CallServer]:
    with CallServer.start("100 per 1 second") as running:
        yield running


def write_suite(pytester: pytest.Pytester, server: CallServer, tests: int = 3) -> None:
    """``test_calls[n]`` makes ``n`` calls (0, 1, 2, ...), ``test_twice`` two."""
    pytester.makepyfile(
        test_suite=f"""
        import urllib.request

        import pytest

        URL = {server.url!r}

        def call(path):
            with urllib.request.urlopen(URL + path) as response:
                assert response.status == 200

        @pytest.mark.parametrize("n", range({tests}))
        def test_calls(n):
            for _ in range(n):
                call("/one")

        def test_twice():
            call("/a")
            call("/b")
        """
    )


#: Plugins of this environment the sessions do not need: each costs start-up time.
UNUSED = ("randomly", "benchmark", "hypothesispytest", "anyio", "rerunfailures", "timeout")
LIMIT = ("--call-limit", "127.0.0.1=100/1s", *(f"-pno:{name}" for name in UNUSED))


def call_forecast(result: pytest.RunResult) -> list[str]:
    return [
        line
        for line in result.stdout.lines
        if line.startswith("ratebatch: forecast:") and " calls to " in line
    ]


def cached(pytester: pytest.Pytester) -> object:
    path = pytester.path / ".pytest_cache" / "v" / CACHE_KEY
    return json.loads(path.read_text()) if path.exists() else None


def test_the_second_run_forecasts_the_calls_of_the_first(
    pytester: pytest.Pytester, server: CallServer
) -> None:
    write_suite(pytester, server)
    first = pytester.runpytest_subprocess(*LIMIT)
    first.assert_outcomes(passed=4)
    assert call_forecast(first) == []
    assert cached(pytester) == {
        "test_suite.py::test_calls[0]": {},
        "test_suite.py::test_calls[1]": {"127.0.0.1": 1},
        "test_suite.py::test_calls[2]": {"127.0.0.1": 2},
        "test_suite.py::test_twice": {"127.0.0.1": 2},
    }
    second = pytester.runpytest_subprocess(*LIMIT)
    second.assert_outcomes(passed=4)
    assert call_forecast(second) == [
        "ratebatch: forecast: 4 tests, about 5 calls to 127.0.0.1 (from the last run), "
        "take at least 0s"
    ]
    lines = second.stdout.lines
    forecast_at = lines.index(call_forecast(second)[0])
    assert forecast_at < next(i for i, line in enumerate(lines) if line.startswith("test_suite"))
    # -q keeps it, -qq silences it; --collect-only says it in the summary section.
    assert call_forecast(pytester.runpytest_subprocess("-q", *LIMIT))
    assert call_forecast(pytester.runpytest_subprocess("-qq", *LIMIT)) == []
    listed = pytester.runpytest_subprocess("--collect-only", *LIMIT)
    assert call_forecast(listed) == []  # not among the listed tests
    text = listed.stdout.str()
    section = re.search(r"=+ ratebatch =+\n(.*)", text, re.DOTALL)
    assert section is not None
    assert (
        "forecast: 4 tests, about 5 calls to 127.0.0.1 (from the last run), take at least 0s"
        in section.group(1).splitlines()
    )


def test_new_tests_and_tests_not_run_this_time(
    pytester: pytest.Pytester, server: CallServer
) -> None:
    write_suite(pytester, server, tests=3)
    pytester.runpytest_subprocess(*LIMIT).assert_outcomes(passed=4)
    write_suite(pytester, server, tests=5)  # test_calls[3] and [4] are new
    result = pytester.runpytest_subprocess(*LIMIT, "-k", "calls")
    result.assert_outcomes(passed=5, deselected=1)
    assert call_forecast(result) == [
        "ratebatch: forecast: 5 tests, about 3 calls to 127.0.0.1 "
        "(from the last run; 2 tests without a count), take at least 0s"
    ]
    counts = cached(pytester)
    assert isinstance(counts, dict)
    assert counts["test_suite.py::test_calls[4]"] == {"127.0.0.1": 4}
    assert counts["test_suite.py::test_twice"] == {"127.0.0.1": 2}  # deselected: kept


def test_under_xdist_the_controller_keeps_and_forecasts_the_calls(
    pytester: pytest.Pytester, server: CallServer
) -> None:
    write_suite(pytester, server)
    pytester.runpytest_subprocess("-n", "2", *LIMIT).assert_outcomes(passed=4)
    assert cached(pytester) == {
        "test_suite.py::test_calls[0]": {},
        "test_suite.py::test_calls[1]": {"127.0.0.1": 1},
        "test_suite.py::test_calls[2]": {"127.0.0.1": 2},
        "test_suite.py::test_twice": {"127.0.0.1": 2},
    }
    result = pytester.runpytest_subprocess("-n", "2", *LIMIT, "--ratebatch-timeline", "t.svg")
    result.assert_outcomes(passed=4)
    assert call_forecast(result) == [
        "ratebatch: forecast: 4 tests, about 5 calls to 127.0.0.1 (from the last run), "
        "take at least 0s"
    ]
    # The timeline has a tick per call, on the lanes of the workers that made them.
    svg = ElementTree.parse(pytester.path / "t.svg").getroot()
    ticks = [
        line
        for line in svg.iter("{http://www.w3.org/2000/svg}line")
        if (line.get("class") or "").startswith("call")
    ]
    assert len(ticks) == 5
    assert all("call to 127.0.0.1, " in (tick.findtext("*") or "") for tick in ticks)


def test_without_the_cache_nothing_is_kept_nor_forecast(
    pytester: pytest.Pytester, server: CallServer
) -> None:
    write_suite(pytester, server)
    for _ in range(2):
        result = pytester.runpytest_subprocess(
            *LIMIT, "-p", "no:cacheprovider", "--ratebatch-report", "r.json"
        )
        result.assert_outcomes(passed=4)
        assert call_forecast(result) == []
        assert not re.search(r"Error|Traceback", result.stderr.str())
    assert not (pytester.path / ".pytest_cache").exists()


def test_a_stated_limit_forecasts_its_least_time(pytester: pytest.Pytester) -> None:
    # The counts of an earlier run in the cache; no call needed to forecast.
    pytester.makepyfile(test_few="def test_a(): pass\ndef test_b(): pass\n")
    cache = pytester.path / ".pytest_cache" / "v" / "ratebatch"
    cache.mkdir(parents=True)
    (cache / "calls").write_text(
        json.dumps({"test_few.py::test_a": {"api.example.com": 1139}, "test_few.py::test_b": {}})
    )
    result = pytester.runpytest_subprocess(
        *LIMIT[2:], "--call-limit", "api.example.com=120/min", "--call-limit", "other=auto"
    )
    result.assert_outcomes(passed=2)
    assert call_forecast(result) == [
        "ratebatch: forecast: 2 tests, about 1,139 calls to api.example.com (from the last run), "
        "take at least 9m"
    ]  # the auto limit, which no test called, has no line
