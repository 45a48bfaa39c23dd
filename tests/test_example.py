"""End to end: the example API suite passes under its ini policy and fails without the plugin.

Each run is a fresh ``python -m pytest examples/api_suite`` that starts its own server (the
environment passed on holds no ``RATE_LIMITED_API_*`` variable), so the server's counts
belong to that run alone. Nothing here asserts on timing: only exit codes and the counts
the server reports.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SUITE = "examples/api_suite"
# The suite's conftest prints this line; the counts come from the server itself.
API_STATS = re.compile(r"^rate-limited API: (\d+) requests, (\d+) rejected with 429$", re.M)
PASSED = re.compile(r"\b(\d+) passed\b")


#: The test files whose tests make one API call each (the rest make several).
ONE_CALL_FILES = (f"{SUITE}/test_catalog.py", f"{SUITE}/test_orders.py")
#: The calls the whole suite makes (25 one-call tests, the checkout flows 24).
SUITE_CALLS = 49
#: The suite's policy replaced by one on test starts, for its one-call tests: ``-o key=``
#: unsets the ini file's call limit.
TEST_STARTS = ("-o", "call_limits=", "-o", "rate_per_minute=120", "-o", "batch_size=5")


def run_suite(
    *args: str, server_limit: str | None = None, targets: tuple[str, ...] = (SUITE,)
) -> tuple[int, str]:
    """Run the example suite (or ``targets`` in it) in a subprocess; its exit code and its
    combined output. ``server_limit`` replaces the server's limit (``RATE_LIMITED_API_LIMIT``)."""
    # A server URL or limit from outside would change what this run measures, and
    # PYTEST_ADDOPTS or PYTEST_DISABLE_PLUGIN_AUTOLOAD what it runs: pass none of them on.
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("RATE_LIMITED_API_", "PYTEST_"))
    }
    assert "RATE_LIMITED_API_URL" not in env
    env["PYTEST_ADDOPTS"] = "-p no:randomly"  # a test dependency; it would reorder the run
    if server_limit is not None:
        env["RATE_LIMITED_API_LIMIT"] = server_limit
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", *targets, "--color=no", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
        check=False,
    )
    return completed.returncode, completed.stdout


def api_stats(output: str) -> tuple[int, int]:
    """``(requests, rejected)`` from the suite's summary line."""
    match = API_STATS.search(output)
    assert match is not None, f"no 'rate-limited API: ...' line in the output:\n{output}"
    return int(match.group(1)), int(match.group(2))


def test_suite_passes_with_the_plugin() -> None:
    code, output = run_suite()
    assert code == pytest.ExitCode.OK, output
    # The policy really came from the suite's pytest.ini.
    assert "ratebatch: calls 127.0.0.1=10/2s" in output, output
    assert f"calls to 127.0.0.1 (10/2s): {SUITE_CALLS} calls in " in output, output
    assert "0 throttled" in output, output
    # Every call reached the server once, and none was refused.
    assert api_stats(output) == (SUITE_CALLS, 0), output


def test_suite_hits_429_without_the_plugin() -> None:
    code, output = run_suite("-p", "no:ratebatch")
    assert code == pytest.ExitCode.TESTS_FAILED, output
    assert "ratebatch:" not in output, output
    assert "429 Too Many Requests from the API" in output, output
    _, rejected = api_stats(output)
    assert rejected > 0, output


def test_suite_passes_on_four_workers_sharing_the_calls_limit() -> None:
    code, output = run_suite("-n", "4")
    assert code == pytest.ExitCode.OK, output
    assert "store: file (shared by this session's workers)" in output, output
    requests, rejected = api_stats(output)
    # Each call is admitted under the limit; the server counts it when it arrives. On a
    # loaded machine (five processes on few cores) a call can reach the server later than
    # the 20 ms the call limit allows for that, and be refused once; it is then sent again,
    # so every test passes. Without the plugin about 10 of these calls are refused.
    assert rejected <= 2, output
    assert requests == SUITE_CALLS + rejected, output
    assert f"calls to 127.0.0.1 (10/2s): {SUITE_CALLS + rejected} calls in " in output, output


def test_calls_the_server_refuses_are_sent_again() -> None:
    # 5 calls in any 3 s: less than the stated limit. Each refused call waits for the
    # server's Retry-After and is sent again; no test sees a 429.
    code, output = run_suite(server_limit="5 per 3 seconds")
    assert code == pytest.ExitCode.OK, output
    requests, rejected = api_stats(output)
    assert rejected >= 1, output
    assert requests == SUITE_CALLS + rejected, output
    assert f"{rejected} throttles: {rejected} re-sent" in output or (
        rejected == 1 and "1 throttle: 1 re-sent" in output
    ), output


def test_an_unknown_calls_limit_is_learnt_on_two_workers() -> None:
    code, output = run_suite("-o", "call_limits=127.0.0.1 = auto", "-n", "2")
    assert code == pytest.ExitCode.OK, output
    assert "ratebatch: calls 127.0.0.1=auto" in output, output
    requests, rejected = api_stats(output)
    assert requests == SUITE_CALLS + rejected, output


def test_one_call_tests_pass_with_test_starts_paced() -> None:
    code, output = run_suite(*TEST_STARTS, targets=ONE_CALL_FILES)
    assert code == pytest.ExitCode.OK, output
    assert "ratebatch: rate 120/min, burst 5, batch size 5" in output, output
    requests, rejected = api_stats(output)
    assert rejected == 0, output
    passed = PASSED.search(output)
    assert passed is not None, output
    # One API call per test: every test reached the server exactly once.
    assert requests == int(passed.group(1)) == 25, output


def test_one_call_tests_on_four_workers_sharing_the_rate() -> None:
    code, output = run_suite(*TEST_STARTS, "-n", "4", targets=ONE_CALL_FILES)
    assert code == pytest.ExitCode.OK, output
    assert "store: file (shared by this session's workers)" in output, output
    assert api_stats(output) == (25, 0), output


def assert_throttles_absorbed(code: int, output: str) -> None:
    """Every test passed although the server refused some calls: each was retried."""
    assert code == pytest.ExitCode.OK, output
    requests, rejected = api_stats(output)
    assert rejected >= 1, output
    passed = PASSED.search(output)
    assert passed is not None, output
    # Each refused call was a test's attempt that ran again and then passed.
    assert requests == int(passed.group(1)) + rejected, output
    assert f"throttled: {rejected} (HTTP 429 x{rejected})" in output, output
    assert "then passed, 0 failed" in output, output


def test_one_call_tests_pass_when_the_server_allows_less_than_the_policy() -> None:
    # 5 calls in any 3 s: a whole batch fits, but not one every 2.5 s (the policy's rate).
    code, output = run_suite(*TEST_STARTS, server_limit="5 per 3 seconds", targets=ONE_CALL_FILES)
    assert_throttles_absorbed(code, output)
    assert "rate: 120/min before the first throttle" in output, output


def test_one_call_tests_learn_an_unknown_rate_on_two_workers() -> None:
    starts = (*TEST_STARTS, "-o", "rate_per_minute=auto")
    code, output = run_suite(*starts, "-n", "2", targets=ONE_CALL_FILES)
    assert "ratebatch: rate auto, burst 5, batch size 5" in output, output
    assert_throttles_absorbed(code, output)


@pytest.mark.parametrize("workers", [[], ["-n", "4"]])
def test_one_call_tests_pass_with_the_apis_limit_stated_as_a_window(workers: list[str]) -> None:
    window = ["-o", "call_limits=", "-o", "rate_limit=10/2s"]
    code, output = run_suite(*window, *workers, targets=ONE_CALL_FILES)
    assert code == pytest.ExitCode.OK, output
    assert "ratebatch: limits 10/2s; store:" in output, output
    assert "waited on 10/2s for " in output, output
    requests, rejected = api_stats(output)
    # A test's call reaches the server a little after its start; the window is kept 50 ms
    # longer for that. On a heavily loaded machine a call can take longer and be refused
    # once (the test then runs again and passes); without the limit some 15 are refused.
    assert rejected <= 1, output
    assert requests == 25 + rejected, output
