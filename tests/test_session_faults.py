"""The session directory and the processes that share it, under faults: a full TMPDIR (a real
tmpfs filled to its last byte, in a private mount namespace), the directory removed mid-run
(as temporary-file cleaners do), xdist workers killed with SIGKILL, Ctrl-C, a controller
killed with SIGKILL. Real pytest sessions and real pytest-xdist workers throughout."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
import xdist  # noqa: F401  (the tests need pytest-xdist: fail, don't skip, without it)

from pytest_ratebatch.plugin.session_dir import (
    DIRECTORY_PREFIX,
    OWNER_FILE,
    process_start,
    remove_stale,
    this_machine,
)
from tests.mounts import FILL_SCRIPT, in_mount_namespace

pytest_plugins = ["pytester"]

#: xdist and this plugin alone: others installed here may take their time on an interrupt.
ONLY_OURS = ["-p", "xdist.plugin", "-p", "pytest_ratebatch_entry.plugin"]


def load_report(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def assert_summary_agrees_with_the_tests(report: dict[str, Any]) -> None:
    """The report's totals are those of its own test list."""
    tests = report["tests"]
    summary = report["summary"]
    outcomes = Counter(test["outcome"] for test in tests)
    assert summary["run"] == sum(test["start_ns"] is not None for test in tests)
    assert summary["cancelled"] == outcomes["cancelled"]
    assert summary["not_run"] == outcomes["not run"]
    assert summary["run"] + summary["cancelled"] + summary["not_run"] == len(tests)


def assert_every_test_accounted_for(result: pytest.RunResult, junit: Path, count: int) -> None:
    output = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in output
    assert "Traceback" not in output
    outcomes = result.parseoutcomes()
    assert sum(outcomes.get(kind, 0) for kind in ("passed", "failed", "skipped")) == count
    cases = ElementTree.parse(junit).getroot().findall(".//testcase")
    assert len(cases) == count


def session_directories(tmpdir: Path) -> list[Path]:
    return sorted(tmpdir.glob(f"{DIRECTORY_PREFIX}*"))


# --- a full TMPDIR ------------------------------------------------------------------------

FILL_TMPDIR = f"""
import os, subprocess

def pytest_sessionstart(session):
    # The session directory exists (the plugin made it while pytest configured itself):
    # now the disk it is on fills up, before any test starts.
    if not hasattr(session.config, "workerinput"):
        subprocess.run(["sh", "-c", {FILL_SCRIPT!r}, "sh", os.environ["TMPDIR"]], check=True)
"""


@pytest.mark.parametrize(
    "options",
    [
        ["-n", "2", "--rate-per-minute=6000", "--batch-size=2"],
        ["-n", "2", "--max-concurrency=1"],
        ["-p", "no:xdist", "--ratebatch-store=file", "--rate-per-minute=6000"],
    ],
    ids=["xdist-rate-batches", "xdist-cap", "one-process-file-store"],
)
def test_a_full_tmpdir_cancels_every_test_with_the_reason(
    pytester: pytest.Pytester, options: list[str]
) -> None:
    pytester.makeconftest(FILL_TMPDIR)
    pytester.makepyfile(
        test_a="import pytest\n@pytest.mark.parametrize('n', range(6))\ndef test_a(n): pass\n"
    )
    tmpdir = pytester.mkdir("tmp")
    command = [
        "env", f"TMPDIR={tmpdir}", sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
        "-rs", "--junitxml=junit.xml", "--ratebatch-report=r.json", *options,
    ]  # fmt: skip
    result = pytester.run(*in_mount_namespace(command, empty=tmpdir), timeout=120)
    assert_every_test_accounted_for(result, pytester.path / "junit.xml", 6)
    assert result.parseoutcomes() == {"skipped": 6}
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    directory = f"the session directory {tmpdir}/{DIRECTORY_PREFIX}*"
    reason = f"store unavailable: {directory}: No space left on device"
    result.stdout.fnmatch_lines(
        [f"stop: {reason}", f"SKIPPED ?6? *ratebatch: cancelled ({reason})"]
    )
    report = load_report(pytester.path / "r.json")
    assert {test["outcome"] for test in report["tests"]} == {"cancelled"}
    assert report["summary"]["cancelled"] == 6
    assert report["session"]["stop_reason"].endswith(": No space left on device")


# --- the session directory removed mid-run ---------------------------------------------------

REMOVES_THE_DIRECTORY = f"""
import glob, os, shutil, time
import pytest

@pytest.mark.parametrize("n", range(30))
def test_c(n):
    time.sleep(0.05)
    if n == 8:  # as a temporary-file cleaner would, mid-run
        for directory in glob.glob(os.path.join(os.environ["TMPDIR"], "{DIRECTORY_PREFIX}*")):
            shutil.rmtree(directory)
"""


@pytest.mark.parametrize(
    "options",
    [["--batch-size=3"], ["--max-concurrency=1"], ["--batch-size=2", "--max-concurrency=1"]],
    ids=["batches", "cap", "batches-and-cap"],
)
def test_a_session_directory_removed_mid_run_cancels_the_rest(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, options: list[str]
) -> None:
    pytester.makepyfile(test_c=REMOVES_THE_DIRECTORY)
    tmpdir = pytester.mkdir("tmp")
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    result = pytester.runpytest_subprocess(
        "-n", "2", "-p", "no:randomly", "-rs", "--junitxml=junit.xml", "--ratebatch-report=r.json",
        *options, timeout=120,
    )  # fmt: skip
    assert_every_test_accounted_for(result, pytester.path / "junit.xml", 30)
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] >= 9  # up to the one that removed it, at least
    assert outcomes["skipped"] >= 10
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    directory = f"the session directory {tmpdir}/{DIRECTORY_PREFIX}*"
    reason = f"store unavailable: {directory} was removed while the session ran"
    result.stdout.fnmatch_lines([f"stop: {reason}", f"SKIPPED * ratebatch: cancelled ({reason})"])
    report = load_report(pytester.path / "r.json")
    assert len(report["tests"]) == 30
    assert Counter(test["outcome"] for test in report["tests"]) == {
        "passed": outcomes["passed"],
        "cancelled": outcomes["skipped"],
    }
    assert_summary_agrees_with_the_tests(report)
    assert session_directories(tmpdir) == []


def test_the_bucket_outlives_its_directory_where_nothing_else_is_needed(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without batches or a cap, every process keeps its bucket and ledger open: they go on.
    pytester.makepyfile(test_c=REMOVES_THE_DIRECTORY)
    tmpdir = pytester.mkdir("tmp")
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    result = pytester.runpytest_subprocess(
        "-n", "2", "--rate-per-minute=6000", "--junitxml=junit.xml", timeout=120
    )
    assert_every_test_accounted_for(result, pytester.path / "junit.xml", 30)
    assert result.parseoutcomes() == {"passed": 30}


# --- workers killed, Ctrl-C: the totals agree with the test list -------------------------

KILLS_ITS_WORKER = """
import os, signal, time
import pytest

@pytest.mark.parametrize("n", range(30))
def test_d(n):
    time.sleep(0.02)
    if n == 7:
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_report_agrees_with_itself_after_a_worker_is_killed(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_d=KILLS_ITS_WORKER)
    result = pytester.runpytest_subprocess(
        "-n", "3", "-p", "no:randomly", "--rate-per-minute=60000", "--ratebatch-report=r.json",
        "--junitxml=junit.xml", timeout=120,
    )  # fmt: skip
    assert_every_test_accounted_for(result, pytester.path / "junit.xml", 30)
    assert result.parseoutcomes() == {"passed": 29, "failed": 1}
    report = load_report(pytester.path / "r.json")
    assert_summary_agrees_with_the_tests(report)
    assert report["summary"]["run"] == 30
    result.stdout.fnmatch_lines(["tests: 30 run, 0 cancelled"])


def test_without_a_report_a_killed_workers_tests_are_not_called_not_run(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_d=KILLS_ITS_WORKER)
    result = pytester.runpytest_subprocess(
        "-n", "3", "-p", "no:randomly", "--rate-per-minute=60000", timeout=120
    )
    assert result.parseoutcomes() == {"passed": 29, "failed": 1}
    (tests,) = [line for line in result.stdout.lines if line.startswith("tests: ")]
    assert "not run" not in tests  # every test ran: the crashed worker's are not counted
    result.stdout.fnmatch_lines(["(without the tests of gw?, which crashed)"])


def interrupt_while_waiting(pytester: pytest.Pytester, *options: str) -> str:
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) once a worker waits."""
    pytester.makepyfile(
        test_e="import pytest\n@pytest.mark.parametrize('n', range(6))\ndef test_e(n): pass\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", *ONLY_OURS, "-n", "2", "--rate-per-minute=2",
         "--burst=3", *options],
        cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
    )  # fmt: skip
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if "waiting 30s for rate tokens" in line:
            break
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == pytest.ExitCode.INTERRUPTED, output
    return "".join(seen) + output


def test_the_report_agrees_with_itself_after_ctrl_c(pytester: pytest.Pytester) -> None:
    output = interrupt_while_waiting(pytester, "--ratebatch-report=r.json")
    report = load_report(pytester.path / "r.json")
    assert_summary_agrees_with_the_tests(report)
    passed = sum(test["outcome"] == "passed" for test in report["tests"])
    assert passed >= 1
    assert report["summary"]["run"] >= passed
    assert f"tests: {report['summary']['run']} run, 0 cancelled" in output
    assert report["session"]["stop_reason"] == "interrupted"


def test_without_a_report_ctrl_c_claims_no_test_not_run(pytester: pytest.Pytester) -> None:
    output = interrupt_while_waiting(pytester)
    (tests,) = [line for line in output.splitlines() if line.startswith("tests: ")]
    assert "not run" not in tests
    assert "which did not send their totals)" in output


# --- a controller killed: its directory goes at a later start ----------------------------

SLOW_TESTS = """
import os, pathlib, time
import pytest

@pytest.mark.parametrize("n", range(4))
def test_slow(n):
    pathlib.Path(os.environ["STARTED"]).touch()
    time.sleep(60)
"""


def start_slow_session(pytester: pytest.Pytester, tmpdir: Path, name: str) -> subprocess.Popen[str]:
    """A session under ``-n 2`` whose tests run for a minute; returned once one runs."""
    started = pytester.path / f"started-{name}"
    pytester.makepyfile(**{f"test_{name}": SLOW_TESTS})
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2",
         "--rate-per-minute=6000", f"test_{name}.py"],
        cwd=pytester.path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True, env={**os.environ, "TMPDIR": str(tmpdir), "STARTED": str(started)},
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not started.exists():
        assert process.poll() is None, "the session ended before its tests started"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return process


def test_a_killed_controllers_directory_goes_at_the_next_start(
    pytester: pytest.Pytester,
) -> None:
    tmpdir = pytester.mkdir("tmp")
    live = start_slow_session(pytester, tmpdir, "live")
    (kept,) = session_directories(tmpdir)
    killed = start_slow_session(pytester, tmpdir, "killed")
    try:
        (left,) = set(session_directories(tmpdir)) - {kept}
        assert (left / OWNER_FILE).exists()
        killed.send_signal(signal.SIGKILL)  # the controller alone: its workers go on a while
        killed.wait(timeout=30)
        # A killed controller cannot remove its directory: it stays until a later start.
        time.sleep(0.5)
        assert left.exists()
        os.killpg(killed.pid, signal.SIGKILL)  # the orphaned workers, for a clean test
        pytester.makepyfile(test_quick="def test_quick(): pass")
        result = pytester.run(
            "env", f"TMPDIR={tmpdir}", sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
            "-n", "2", "--rate-per-minute=6000", "test_quick.py", timeout=120,
        )  # fmt: skip
        assert result.ret == pytest.ExitCode.OK
        # The dead owner's directory went; the live session's stayed (and so did it).
        assert session_directories(tmpdir) == [kept]
        assert live.poll() is None
    finally:
        for session in (live, killed):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(session.pid, signal.SIGKILL)
            session.wait(timeout=30)


def make_directory(parent: Path, name: str, owner: dict[str, Any] | None) -> Path:
    directory = parent / f"{DIRECTORY_PREFIX}{name}"
    directory.mkdir()
    (directory / "bucket").write_bytes(b"\0" * 64)
    if owner is not None:
        (directory / OWNER_FILE).write_text(json.dumps(owner))
    return directory


def dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_directories_provably_abandoned_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    machine = this_machine()
    assert machine is not None  # Linux: /proc tells the boot and the pid namespace
    me = {"pid": os.getpid(), "started": process_start(os.getpid()), **machine}
    dead = {**me, "pid": dead_pid()}
    dead_owner = make_directory(tmp_path, "dead", dead)
    # The same pid, but another process: the owner died and its pid went to another.
    reused_pid = make_directory(tmp_path, "reused", {**me, "started": "1"})
    alive = make_directory(tmp_path, "alive", me)
    unowned = make_directory(tmp_path, "unowned", None)  # an older version's, or not ours
    garbled = make_directory(tmp_path, "garbled", None)
    (garbled / OWNER_FILE).write_text("{not json")
    other_boot = make_directory(tmp_path, "otherboot", {**dead, "boot": "another boot"})
    other_pids = make_directory(tmp_path, "otherns", {**dead, "pid_namespace": "pid:[1]"})
    not_ours = tmp_path / "pytest-of-someone"
    not_ours.mkdir()
    locked = make_directory(tmp_path, "locked", dead)  # a dead pid, but the lock is held
    holder = os.open(locked / OWNER_FILE, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        # Another user's directories are never touched, whatever their owner record says.
        monkeypatch.setattr(os, "getuid", lambda: os.geteuid() + 1)
        assert remove_stale(tmp_path) == []
        monkeypatch.undo()
        assert sorted(remove_stale(tmp_path)) == sorted([dead_owner, reused_pid])
    finally:
        os.close(holder)
    kept = [alive, unowned, garbled, other_boot, other_pids, not_ours, locked]
    assert sorted(path for path in tmp_path.iterdir()) == sorted(kept)
    # Once its lock is free, the dead owner's directory goes too.
    assert remove_stale(tmp_path) == [locked]
