"""Throttled tests end to end: real clients (requests, urllib) against a real server on
127.0.0.1 that answers 429, in one process and across real pytest-xdist workers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
import requests  # noqa: F401  (the tests need it: fail, don't skip, without it)
import xdist  # noqa: F401

from tests.throttling_server import ThrottlingServer

pytest_plugins = ["pytester"]

REQUESTS_TESTS = """
import os
import pytest
import requests

@pytest.mark.parametrize("n", range({count}))
def test_call(n):
    requests.get(os.environ["API_URL"], timeout=10).raise_for_status()
"""

URLLIB_TESTS = """
import os
import urllib.request

def test_call():
    with urllib.request.urlopen(os.environ["API_URL"], timeout=10) as response:
        assert response.status == 200
"""


def load_report(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Start a ThrottlingServer with the given settings; its URL is in $API_URL."""
    servers: list[ThrottlingServer] = []

    def start(**settings: Any) -> ThrottlingServer:
        server = ThrottlingServer(**settings).__enter__()
        servers.append(server)
        monkeypatch.setenv("API_URL", server.url)
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def test_a_throttled_test_waits_for_the_server_and_passes(
    pytester: pytest.Pytester, api: Any
) -> None:
    server = api(refuse_first=1, retry_after="1")
    pytester.makepyfile(REQUESTS_TESTS.format(count=3))
    result = pytester.runpytest(
        "--batch-size=5", "--ratebatch-report=r.json", "-p", "no:randomly", "-rA"
    )
    result.assert_outcomes(passed=3)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        [
            "throttled: 1 (HTTP 429 x1), paused 1s in all",
            "retried: 1 test (1 retry): 1 then passed, 0 failed",
        ]
    )
    refused, accepted = server.refused(), server.accepted()
    assert len(refused) == 1
    # Nobody called the server inside the wait it asked for.
    assert all(at - refused[0] >= 0.99 for at in accepted)
    report = load_report(pytester.path / "r.json")
    (event,) = report["events"]
    assert event["event"] == "throttle"
    assert (event["status"], event["wait"], event["wait_source"]) == (429, 1.0, "Retry-After")
    assert event["retried"] is True
    assert event["paused_until_ns"] - event["at_ns"] == 1_000_000_000
    first = report["tests"][0]
    assert first["outcome"] == "passed"
    assert len(first["retries"]) == 1
    assert first["retries"][0][0] >= event["paused_until_ns"]  # the retry took its tokens after
    assert report["throttling"]["retried_tests"] == 1


def test_urllib_errors_are_recognised(pytester: pytest.Pytester, api: Any) -> None:
    api(refuse_first=1, retry_after="0.2")
    pytester.makepyfile(URLLIB_TESTS)
    result = pytester.runpytest("--max-failures=1")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["throttled: 1 (HTTP 429 x1), paused 0.2s in all"])


def test_503_with_retry_after_is_a_throttle_and_without_it_a_failure(
    pytester: pytest.Pytester, api: Any
) -> None:
    api(refuse_first=1, retry_after="0.2", status=503)
    pytester.makepyfile(REQUESTS_TESTS.format(count=1))
    pytester.runpytest("--max-failures=5").assert_outcomes(passed=1)
    api(refuse_first=1, status=503)
    result = pytester.runpytest("--max-failures=5")
    result.assert_outcomes(failed=1)
    result.stdout.no_fnmatch_line("throttled:*")


def test_still_throttled_after_its_retries_fails_saying_so(
    pytester: pytest.Pytester, api: Any
) -> None:
    server = api(refuse_first=10, retry_after="0.1")
    pytester.makepyfile(REQUESTS_TESTS.format(count=1))
    result = pytester.runpytest("--throttle-retries=2", "--junit-xml=junit.xml")
    result.assert_outcomes(failed=1)
    assert len(server.refused()) == 3  # the first attempt and two retries
    result.stdout.fnmatch_lines(
        [
            "still throttled (HTTP 429 (requests.exceptions.HTTPError)) after running 3 times; "
            "retried 2 times",
            "retried: 1 test (2 retries): 0 then passed, 1 failed",
        ]
    )
    testcases = ElementTree.parse(pytester.path / "junit.xml").getroot().findall(".//testcase")
    assert len(testcases) == 1  # one outcome, not one per attempt
    assert testcases[0].find("failure") is not None


def test_no_retries_fails_at_once(pytester: pytest.Pytester, api: Any) -> None:
    server = api(refuse_first=10, retry_after="0.1")
    pytester.makepyfile(REQUESTS_TESTS.format(count=1))
    result = pytester.runpytest("--throttle-retries=0")
    result.assert_outcomes(failed=1)
    assert len(server.refused()) == 1
    result.stdout.fnmatch_lines(["*not retried (throttle_retries = 0)*"])


def test_a_wait_longer_than_allowed_stops_the_session(pytester: pytest.Pytester, api: Any) -> None:
    api(refuse_first=1, retry_after="86400")
    pytester.makepyfile(REQUESTS_TESTS.format(count=4))
    result = pytester.runpytest("--batch-size=1", "-p", "no:randomly", "-rs")
    result.assert_outcomes(failed=1, skipped=3)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    reason = "the server asked to wait 24h (Retry-After), more than throttle_max_wait (5m)"
    result.stdout.fnmatch_lines(
        [
            # The throttled test fails, saying so; the tests not started are cancelled.
            "refused by the server for longer than allowed (HTTP 429 "
            f"(requests.exceptions.HTTPError)): {reason}; the session stopped",
            f"stop: {reason}",
            f"*ratebatch: cancelled ({reason})*",
        ]
    )


def test_a_wait_past_the_total_timeout_stops_the_session(
    pytester: pytest.Pytester, api: Any
) -> None:
    api(refuse_first=1, retry_after="30")
    pytester.makepyfile(REQUESTS_TESTS.format(count=2))
    result = pytester.runpytest("--total-timeout=20s", "-p", "no:randomly")
    result.assert_outcomes(failed=1, skipped=1)
    result.stdout.fnmatch_lines(
        ["stop: the server asked to wait 30s (Retry-After), past the total*"]
    )


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one process", "xdist"])
def test_a_stop_before_the_retry_cancels_the_throttled_test(
    pytester: pytest.Pytester, api: Any, workers: list[str]
) -> None:
    server = api(refuse_first=1, retry_after="1")
    pytester.makepyfile(
        test_cancelled_retry="""
        import os
        import pytest
        import requests

        @pytest.mark.ratebatch(cost=30)  # after the pause, 30 tokens at the lowered rate: 58 s
        def test_call():
            requests.get(os.environ["API_URL"], timeout=10).raise_for_status()
        """
    )
    result = pytester.runpytest_subprocess(
        "--rate-per-minute=60", "--burst=30", "--total-timeout=30s", "--ratebatch-report=r.json",
        "-rs", *workers,
    )  # fmt: skip
    result.assert_outcomes(skipped=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    reason = "ratebatch: cancelled (total timeout (30s) would pass before the next start)"
    result.stdout.fnmatch_lines([f"SKIPPED [[]1[]] test_cancelled_retry.py:5: {reason}"])
    assert len(server.log) == 1  # not run again
    report = load_report(pytester.path / "r.json")
    (test,) = report["tests"]
    assert (test["outcome"], test["reason"], test["retries"]) == ("cancelled", reason, [])
    assert (report["summary"]["run"], report["summary"]["cancelled"]) == (0, 1)
    (event,) = report["events"]
    assert event["retried"] is False
    assert report["throttling"]["retried_tests"] == 0


def test_a_retried_attempt_is_not_a_failure(pytester: pytest.Pytester, api: Any) -> None:
    api(refuse_first=2, retry_after="0.1")
    pytester.makepyfile(REQUESTS_TESTS.format(count=4))
    result = pytester.runpytest("--max-failures=1", "-p", "no:randomly")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["stop: none, every test was started"])


def test_the_users_own_exception_types(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        quota="class QuotaError(Exception):\n    pass\n",
        test_quota="""
        import os
        import quota

        def test_call(tmp_path_factory):
            mark = tmp_path_factory.getbasetemp().parent / "called"
            if not mark.exists():
                mark.touch()
                raise RuntimeError("wrapped") from quota.QuotaError("quota exceeded")
        """,
    )
    pytester.syspathinsert()
    pytester.makeini("[pytest]\nratebatch_throttle_exceptions = quota:QuotaError\n")
    result = pytester.runpytest("--max-failures=3")
    result.assert_outcomes(passed=1)
    # No header: a backoff of 1s (+-10%).
    result.stdout.fnmatch_lines(["throttled: 1 (other x1), paused *s in all"])
    result = pytester.runpytest("--max-failures=3", "--ratebatch-throttle-exceptions=quota:Missing")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: ratebatch: --ratebatch-throttle-exceptions='quota:Missing' (command line): "
         "'quota:Missing' cannot be loaded*"]
    )  # fmt: skip


def test_throttled_from_the_test_itself(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_polls(ratebatch, tmp_path_factory):
            mark = tmp_path_factory.getbasetemp().parent / "asked"
            if not mark.exists():
                mark.touch()
                ratebatch.throttled(retry_after=0.2)
        """
    )
    result = pytester.runpytest("--max-failures=3", "--ratebatch-report=r.json")
    result.assert_outcomes(passed=1)
    (event,) = load_report(pytester.path / "r.json")["events"]
    assert (event["wait"], event["recognised"]) == (0.2, "ratebatch.throttled()")


def test_a_published_budget_is_never_exceeded(pytester: pytest.Pytester, api: Any) -> None:
    server = api(window_limit=5, window=1.0)
    pytester.makepyfile(
        """
        import os
        import pytest
        import requests

        @pytest.fixture
        def client(ratebatch):
            session = requests.Session()
            session.hooks["response"].append(lambda response, *a, **k: ratebatch.observe(response))
            return session

        @pytest.mark.parametrize("n", range(12))
        def test_call(client, n):
            client.get(os.environ["API_URL"] + "/budget", timeout=10).raise_for_status()
        """
    )
    result = pytester.runpytest("--rate-per-minute=auto", "--ratebatch-report=r.json")
    result.assert_outcomes(passed=12)
    assert server.refused() == []
    budget_pauses = load_report(pytester.path / "r.json")["throttling"]["budget_pauses"]
    assert budget_pauses >= 2  # 12 calls need three windows of 5


def test_observe_without_a_policy_does_nothing(pytester: pytest.Pytester, api: Any) -> None:
    api(refuse_first=1)
    pytester.makepyfile(
        """
        import os
        import requests

        def test_call(ratebatch):
            response = ratebatch.observe(requests.get(os.environ["API_URL"], timeout=10))
            assert response.status_code == 429
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_workers_all_pause_for_a_throttle(pytester: pytest.Pytester, api: Any) -> None:
    # A slow server: 4 per second, capacity 2; four workers would hammer it without pauses.
    server = api(rate=4, capacity=2, retry_after="1")
    pytester.makepyfile(REQUESTS_TESTS.format(count=12))
    result = pytester.runpytest_subprocess(
        "-n", "4", "--rate-per-minute=auto", "--ratebatch-report=r.json"
    )
    result.assert_outcomes(passed=12)
    refused = server.refused()
    assert 1 <= len(refused) <= 8
    report = load_report(pytester.path / "r.json")
    pauses = [
        (event["store_ns"], event["paused_until_store_ns"])
        for event in report["events"]
        if "paused_until_store_ns" in event
    ]
    assert len(pauses) == len(report["events"]) == report["throttling"]["throttles"]
    # After the first throttle was seen, no worker called inside its wait.
    first = min(refused)
    accepted_inside = [at for at in server.accepted() if first + 0.05 < at < first + 0.99]
    assert accepted_inside == []
    result.stdout.fnmatch_lines(["throttled: *", "rate: no rate before the first throttle, *"])


def test_auto_learns_a_rate_in_one_process(pytester: pytest.Pytester, api: Any) -> None:
    server = api(rate=5, capacity=3)
    pytester.makepyfile(REQUESTS_TESTS.format(count=20))
    result = pytester.runpytest("--rate-per-minute=auto", "--ratebatch-report=r.json")
    result.assert_outcomes(passed=20)
    refused = len(server.refused())
    assert 1 <= refused <= 6  # the benchmark measures the exact figures
    summary = load_report(pytester.path / "r.json")["throttling"]
    assert summary["rate_before"] is None
    assert 0 < summary["rate_after"] <= 5 * 60 * 1.5


def test_setup_show_and_setup_only_still_work(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def client():
            return object()

        def test_uses(client):
            raise AssertionError("ran")
        """
    )
    result = pytester.runpytest("--setup-show", "--setup-only", "--max-failures=3")
    result.stdout.fnmatch_lines(["*SETUP    F client*", "*test_uses (fixtures used: client)*"])
    result.stdout.no_fnmatch_line("*AssertionError: ran*")
    result = pytester.runpytest("--setup-show", "--max-failures=3")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*SETUP    F client*", "*TEARDOWN F client*"])


# --- pytest-rerunfailures: its reruns are the retries ---------------------------------------

RERUN_TESTS = {
    "--reruns": """
        import os
        import urllib.request
        import pytest

        @pytest.mark.parametrize("n", range(6))
        def test_call(n):
            with urllib.request.urlopen(os.environ["API_URL"], timeout=10) as response:
                assert response.status == 200
        """,
    "flaky marker": """
        import os
        import urllib.request
        import pytest

        @pytest.mark.flaky(reruns=2)
        @pytest.mark.parametrize("n", range(6))
        def test_call(n):
            with urllib.request.urlopen(os.environ["API_URL"], timeout=10) as response:
                assert response.status == 200
        """,
    "throttled()": """
        import pytest

        @pytest.mark.parametrize("n", range(6))
        def test_call(n, ratebatch, tmp_path_factory):
            mark = tmp_path_factory.getbasetemp().parent / "asked"
            if n == 0 and not mark.exists():
                mark.touch()
                ratebatch.throttled(retry_after=1)
        """,
}


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one process", "xdist"])
@pytest.mark.parametrize("reruns", list(RERUN_TESTS))
def test_pytest_rerunfailures_reruns_are_the_retries(
    pytester: pytest.Pytester, api: Any, workers: list[str], reruns: str
) -> None:
    server = api(refuse_first=1, retry_after="1")
    pytester.makepyfile(test_reruns=RERUN_TESTS[reruns])
    options = ["--reruns=2"] if reruns != "flaky marker" else []
    result = pytester.runpytest_subprocess(
        "-p", "rerunfailures", *options, "--rate-per-minute=120", "--burst=1",
        "--ratebatch-report=r.json", "-p", "no:randomly", *workers,
    )  # fmt: skip
    assert result.parseoutcomes() == {"passed": 6, "rerun": 1}
    report = load_report(pytester.path / "r.json")
    (event,) = report["events"]
    assert (event["wait"], event["retried"]) == (1.0, True)
    assert event["rate_after"] == 60.0  # adapted: the first throttle halves the rate
    throttling = report["throttling"]
    assert (throttling["throttles"], throttling["retried_tests"], throttling["retries"]) == (
        1,
        1,
        1,
    )
    if reruns != "throttled()":
        assert len(server.refused()) == 1
        assert len(server.accepted()) == 6  # the rerun once: not retried twice
    at, until = event["at_ns"], event["paused_until_ns"]
    tests = {test["nodeid"]: test for test in report["tests"]}
    (rerun,) = tests[event["test"]]["retries"]
    assert rerun[0] >= until  # the rerun waited for the pause, and took a token
    assert rerun[1] == 1
    # Everyone paused: no test started while the server's wait lasted.
    starts = [test["start_ns"] for test in tests.values()] + [rerun[0]]
    assert not [start for start in starts if at < start < until]
    assert [start for start in starts if start > at]  # some waited for the pause's end
    result.stdout.fnmatch_lines(["throttled: 1 (*), paused 1s in all"])


def test_pytest_rerunfailures_does_not_rerun_a_test_refused_too_long(
    pytester: pytest.Pytester, api: Any
) -> None:
    server = api(refuse_first=1, retry_after="86400")
    pytester.makepyfile(test_reruns=RERUN_TESTS["--reruns"])
    result = pytester.runpytest_subprocess(
        "-p", "rerunfailures", "--reruns=2", "--rate-per-minute=600", "-p", "no:randomly", "-rfs"
    )
    assert result.parseoutcomes() == {"failed": 1, "skipped": 5}
    assert len(server.log) == 1
    asked = "the server asked to wait 24h (Retry-After), more than throttle_max_wait (5m)"
    result.stdout.fnmatch_lines(
        [
            # The test failed, and its report says why, at the top; the others are cancelled.
            "refused by the server for longer than allowed (HTTP 429 (urllib.error.HTTPError)): "
            f"{asked}; the session stopped",
            f"stop: {asked}",
            "FAILED test_reruns.py::test_call[[]0[]] - ratebatch: refused by the server for *",
            f"SKIPPED [[]5[]] test_reruns.py:5: ratebatch: cancelled ({asked})",
        ]
    )


def test_pytest_rerunfailures_gives_up_saying_the_test_was_still_throttled(
    pytester: pytest.Pytester, api: Any
) -> None:
    server = api(refuse_first=10, retry_after="0.2")
    pytester.makepyfile(test_reruns=RERUN_TESTS["--reruns"].replace("range(6)", "range(1)"))
    result = pytester.runpytest_subprocess(
        "-p", "rerunfailures", "--reruns=2", "--rate-per-minute=600", "--ratebatch-report=r.json",
        "-rf",
    )  # fmt: skip
    assert result.parseoutcomes() == {"failed": 1, "rerun": 2}
    assert len(server.log) == 3
    result.stdout.fnmatch_lines(
        [
            "still throttled (HTTP 429 (urllib.error.HTTPError)) after running 3 times; "
            "rerun 2 times by pytest-rerunfailures",
            "retried: 1 test (2 retries): 0 then passed, 1 failed",
            "FAILED test_reruns.py::test_call[[]0[]] - ratebatch: still throttled *",
        ]
    )
    events = load_report(pytester.path / "r.json")["events"]
    assert [event["retried"] for event in events] == [True, True, False]
