"""Declared resources and the machine's gates in whole sessions: real xdist workers sharing a
capacity, the collection errors of requests that can never fit, and the machine's memory
and load read for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_ratebatch.engine.gates import FREE_MEMORY, RESOURCES, Gates, GateSlot
from pytest_ratebatch.engine.machine import MachineGate
from pytest_ratebatch.limits.machine import MemoryFloor
from pytest_ratebatch.stores.memory import MemoryResourcePool, MemorySlotPool
from tests.fakes import FakeClock
from tests.redis_server import RedisServer

GIB = 2**30

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
    held = {test["nodeid"].split("::")[-1][:10]: test["resources"] for test in report["tests"]}
    assert held == {"test_heavy": {"memory": 2.0}, "test_light": {}}


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


def test_two_sessions_on_one_redis_key_share_the_capacity(
    pytester: pytest.Pytester, redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    log = pytester.path / "log"
    pytester.makepyfile(test_heavy=HEAVY_SUITE.format(log=str(log), count=4, sleep=0.1))
    key = f"resources-{os.getpid()}-{request.node.name}"
    command = [
        sys.executable, "-m", "pytest", "-n", "2", "--resources=memory=4", "-p",
        "no:cacheprovider", f"--ratebatch-store={redis_server.url}", f"--ratebatch-key={key}",
    ]  # fmt: skip
    sessions = [
        subprocess.Popen(command, cwd=pytester.path, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for session in sessions:
        output, _ = session.communicate(timeout=120)
        assert session.returncode == 0, output
        assert "6 passed" in output
        assert "resources memory=4; store: redis" in output
    assert most_in_flight(log) == (2, 8)  # 4 workers of 2 sessions, 2 of memory=2 at once


def test_two_sessions_stating_other_capacities_on_one_key_are_refused(
    pytester: pytest.Pytester, redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    pytester.makepyfile(
        test_slow="""
        import time

        def test_a():
            time.sleep(3)
        """
    )
    key = f"resources-{os.getpid()}-{request.node.name}"
    store = [f"--ratebatch-store={redis_server.url}", f"--ratebatch-key={key}"]
    first = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--resources=gpu=2", *store],
        cwd=pytester.path,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        second = pytester.runpytest_subprocess("--resources=gpu=4", *store, timeout=60)
        # Whichever claimed the key first, the other one is refused at its start.
        refused = second.ret == pytest.ExitCode.USAGE_ERROR
        output, _ = first.communicate(timeout=60)
        if refused:
            assert "gpu=2" in second.stderr.str()
        else:
            assert first.returncode == pytest.ExitCode.USAGE_ERROR, output
    finally:
        if first.poll() is None:
            first.kill()


# --- the gates on a fake clock ---------------------------------------------------------------


class Readings:
    """Memory readings a test sets: (available, total)."""

    def __init__(self, available: int) -> None:
        self.available = available

    def memory(self) -> tuple[int, int] | None:
        return self.available, 16 * GIB

    def load(self) -> float | None:
        return 0.5


def test_gates_name_each_wait_and_give_everything_back() -> None:
    clock = FakeClock()
    readings = Readings(1 * GIB)
    machine = MachineGate(MemoryFloor(bytes=2 * GIB), None, readings, clock)
    resources = MemoryResourcePool({"gpu": 2})
    cap = MemorySlotPool(1)
    gates = Gates(cap, resources, machine, clock)

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        readings.available = 4 * GIB  # memory frees after the first poll

    gates.sleep = sleep
    gates.request = ({"gpu": 2}, 0)
    slot = gates.acquire(None)
    assert isinstance(slot, GateSlot)
    assert set(gates.waits) == {FREE_MEMORY}
    assert resources.in_use() == {"gpu": 2.0}
    assert cap.in_use() == 1
    gates.release(slot)
    gates.release(slot)  # a second release gives nothing back twice
    assert resources.in_use() == {}
    assert cap.in_use() == 0


def test_gates_give_the_resources_back_when_the_cap_times_out() -> None:
    resources = MemoryResourcePool({"gpu": 2})
    cap = MemorySlotPool(1)
    held = cap.acquire()
    gates = Gates(cap, resources, None)
    gates.request = ({"gpu": 1}, 0)
    assert gates.acquire(0) is None
    assert resources.in_use() == {}
    assert gates.blocked == ""  # the cap's own timeout: the scheduler names it
    assert held is not None
    cap.release(held)


def test_gates_name_the_resources_they_waited_for_at_the_deadline() -> None:
    resources = MemoryResourcePool({"gpu": 2})
    other = resources.acquire({"gpu": 2})
    gates = Gates(None, resources, None)
    gates.request = ({"gpu": 1}, 0)
    assert gates.acquire(1_000_000) is None
    assert gates.blocked == "waited for resources (gpu=1)"
    assert RESOURCES in gates.waits
    assert other is not None
    resources.release(other)


def test_gates_give_the_resources_back_on_an_interruption() -> None:
    resources = MemoryResourcePool({"gpu": 2})

    class Interrupting(MemorySlotPool):
        def acquire(self, max_wait_ns: int | None = None) -> Any:
            raise KeyboardInterrupt

    gates = Gates(Interrupting(1), resources, None)
    gates.request = ({"gpu": 2}, 0)
    with pytest.raises(KeyboardInterrupt):
        gates.acquire(None)
    # The amounts came back: another request gets them at once.
    again = resources.acquire({"gpu": 2}, 0)
    assert again is not None
    resources.release(again)
