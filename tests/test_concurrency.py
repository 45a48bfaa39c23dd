"""``--max-concurrency`` end to end: real pytest sessions, xdist workers and redis-server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import xdist  # noqa: F401  (the tests need pytest-xdist: fail, don't skip, without it)

from tests.redis_server import RedisServer

pytest_plugins = ["pytester"]

# Each test notes when it starts (its first fixture's set-up) and ends (that fixture's
# teardown, after the test's own), on the system-wide monotonic clock, into one file shared
# by every process: "in flight" is checked on what the tests themselves saw.
SUITE = """
import os, time
import pytest

def note(event):
    with open(os.environ["TIMELINE"], "a") as timeline:
        timeline.write(f"{{event}} {{time.monotonic_ns()}}\\n")

@pytest.fixture(autouse=True)
def in_flight():
    note("start")
    yield
    note("end")

@pytest.mark.parametrize("n", range({count}))
def test_call(n):
    time.sleep({sleep})
    {body}
"""


def write_suite(
    pytester: pytest.Pytester, count: int, sleep: float, body: str = "pass", name: str = "a"
) -> Path:
    pytester.makepyfile(**{f"test_{name}": SUITE.format(count=count, sleep=sleep, body=body)})
    return pytester.path / "timeline.txt"


@pytest.fixture(autouse=True)
def _timeline_env(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIMELINE", str(pytester.path / "timeline.txt"))


def most_in_flight(timeline: Path) -> tuple[int, int]:
    """The most tests in flight at once, and how many started."""
    events = []
    for line in timeline.read_text().splitlines():
        kind, stamp = line.split()
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


def test_four_workers_keep_two_in_flight(pytester: pytest.Pytester) -> None:
    timeline = write_suite(pytester, 12, sleep=0.1)
    result = pytester.runpytest_subprocess(
        "-n", "4", "--max-concurrency=2", "--ratebatch-report=r.json", timeout=120
    )
    result.assert_outcomes(passed=12)
    assert most_in_flight(timeline) == (2, 12)
    result.stdout.fnmatch_lines(["ratebatch: max concurrency 2; store: file*"])
    report = load_report(pytester.path / "r.json")
    assert report["policy"]["max_concurrency"] == 2
    assert len({test["worker"] for test in report["tests"]}) >= 3  # really spread over workers
    # Which limit bound: the cap, in the summary and for the tests that waited for a slot.
    result.stdout.fnmatch_lines(["waited on concurrency for *s"])
    assert report["summary"]["waited_by_limit"]["concurrency"] > 0
    assert any(test["limit"] == "concurrency" for test in report["tests"])


def test_the_cap_with_a_rate_and_batches(pytester: pytest.Pytester) -> None:
    # Batches of 4 under a cap of 2: a batch's members wait for each other's slots, and the
    # next batch still waits for the whole previous one.
    timeline = write_suite(pytester, 8, sleep=0.05)
    result = pytester.runpytest_subprocess(
        "-n", "3", "--max-concurrency=2", "--batch-size=4", "--rate-per-minute=6000",
        "--ratebatch-report=r.json", timeout=120,
    )  # fmt: skip
    result.assert_outcomes(passed=8)
    assert most_in_flight(timeline) == (2, 8)
    report = load_report(pytester.path / "r.json")
    assert sorted(test["batch"] for test in report["tests"]) == [1] * 4 + [2] * 4


def test_one_process_with_a_cap(pytester: pytest.Pytester) -> None:
    # pytest runs one test at a time here, so the timeline alone cannot show a cap. Each test
    # therefore asks, from another thread, whether a second test could start now: never while
    # it is in flight (set-up, call, teardown), since it holds the only slot; at the session's
    # end, yes.
    pytester.makeconftest(
        """
        import threading
        import pytest
        from pytest_ratebatch.plugin.hooks import PACER_KEY

        def another_could_start(config):
            slots = config.stash[PACER_KEY].scheduler.slots
            got = []
            thread = threading.Thread(target=lambda: got.append(slots.acquire(0)))
            thread.start()
            thread.join()
            if got[0] is None:
                return False
            slots.release(got[0])
            return True

        @pytest.fixture(autouse=True)
        def holds_the_slot(request):
            assert not another_could_start(request.config), "set-up"
            yield
            assert not another_could_start(request.config), "teardown"

        def pytest_sessionfinish(session):
            print("after the run, another could start:", another_could_start(session.config))
        """
    )
    timeline = write_suite(pytester, 3, sleep=0)
    result = pytester.runpytest_subprocess("--max-concurrency=1", "-p", "no:xdist", "-s")
    result.assert_outcomes(passed=3)
    assert most_in_flight(timeline) == (1, 3)
    result.stdout.fnmatch_lines(["ratebatch: max concurrency 1; store: memory"])
    assert "after the run, another could start: True" in result.stdout.str()


def test_a_worker_killed_mid_test_does_not_keep_its_slot(pytester: pytest.Pytester) -> None:
    # With one slot, a leaked slot would hold every later test until the timeout.
    write_suite(pytester, 6, sleep=0.05, body="if n == 1: os._exit(1)")
    result = pytester.runpytest_subprocess(
        "-n", "2", "--max-concurrency=1", "-p", "no:randomly", "--ratebatch-report=r.json",
        timeout=120,
    )  # fmt: skip
    result.stdout.fnmatch_lines(["*crashed while running*test_call?1?*"])
    result.assert_outcomes(passed=5, failed=1)
    outcomes = {t["nodeid"]: t["outcome"] for t in load_report(pytester.path / "r.json")["tests"]}
    assert outcomes["test_a.py::test_call[1]"] == "failed"
    assert list(outcomes.values()).count("passed") == 5


def test_the_total_timeout_ends_a_wait_for_a_slot(pytester: pytest.Pytester) -> None:
    # Whichever test gets the one slot holds it until the total timeout (8 s from the
    # session's start, before the workers import the tests) has surely passed: the other
    # worker's test waits for the slot meanwhile, and the timeout ends that wait.
    pytester.makepyfile(
        test_a="""
        import time
        import pytest

        IMPORTED = time.monotonic()

        @pytest.mark.parametrize("n", range(4))
        def test_call(n):
            time.sleep(max(0, IMPORTED + 9 - time.monotonic()))
        """
    )
    result = pytester.runpytest_subprocess(
        "-n", "2", "--max-concurrency=1", "--total-timeout=8s", "-rs",
        "--ratebatch-report=r.json", timeout=120,
    )  # fmt: skip
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # cancelled tests fail the session
    result.assert_outcomes(passed=1, skipped=3)
    result.stdout.fnmatch_lines(["*ratebatch: cancelled (total timeout (8s) passed)*"])
    cancelled = [t for t in load_report(pytester.path / "r.json")["tests"] if t["reason"]]
    assert max(test["waited"] for test in cancelled) > 1  # it waited for the slot, then stopped


def test_two_sessions_on_one_redis_key_share_the_cap(
    pytester: pytest.Pytester, redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    timeline = write_suite(pytester, 6, sleep=0.1)
    key = f"cap-{os.getpid()}-{request.node.name}"
    command = [
        sys.executable, "-m", "pytest", "-n", "2", "--max-concurrency=2", "-p", "no:cacheprovider",
        f"--ratebatch-store={redis_server.url}", f"--ratebatch-key={key}",
    ]  # fmt: skip
    sessions = [
        subprocess.Popen(command, cwd=pytester.path, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for session in sessions:
        output, _ = session.communicate(timeout=120)
        assert session.returncode == 0, output
        assert "6 passed" in output
        assert "max concurrency 2; store: redis" in output
    assert most_in_flight(timeline) == (2, 12)  # 4 workers of 2 sessions, 2 in flight
    leftover = redis_server.client().keys(f"pytest-ratebatch:{key}:slots:leases")
    assert [redis_server.client().zcard(name) for name in leftover] in ([], [0])


def test_no_cap_loads_no_slot_module(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import sys

        def pytest_sessionfinish(session):
            print("slot modules:", sorted(m for m in sys.modules if ".slots" in m))
        """
    )
    write_suite(pytester, 2, sleep=0)
    result = pytester.runpytest_subprocess("-s", "--rate-per-minute=6000", "--batch-size=2")
    result.assert_outcomes(passed=2)
    assert "slot modules: []" in result.stdout.str()
