"""Our files under faults: a report or timeline that cannot be written costs pytest nothing of
its own (JUnit XML, the terminal summary), leaves nothing behind and says so in one line;
files are written with the user's umask. Real faults: a full tmpfs, a read-only one, the
kernel's ``/dev/full`` (in a private mount namespace, ``tests.mounts``), a name too long, a
path under a file."""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest
import xdist  # noqa: F401  (the tests need pytest-xdist: fail, don't skip, without it)

from pytest_ratebatch.views.output import OutputError
from pytest_ratebatch.views.report import write_json
from tests.mounts import in_mount_namespace

pytest_plugins = ["pytester"]

TESTS = """
import pytest

@pytest.mark.parametrize("n", range(4))
def test_one(n):
    assert n != {failing}
"""

#: How each fault shows: the reason in the error line.
FAULTS = {
    "full-disk": "No space left on device",
    "read-only": "Read-only file system",
    "full-device": "No space left on device",
    "name-too-long": "File name too long",
    "under-a-file": "Not a directory",
}


def run_with_fault(
    pytester: pytest.Pytester, fault: str, options: list[str], failing: int = -1
) -> tuple[pytest.RunResult, Path, Path, list[str]]:
    """A session whose report and timeline go where ``fault`` stops them; the result, both
    paths and the names left in the faulty directory afterwards."""
    pytester.makepyfile(test_many=TESTS.format(failing=failing))
    place = pytester.mkdir("place")
    mounts: dict[str, Path] = {}
    if fault == "full-disk":
        mounts["full"] = place
    elif fault == "read-only":
        mounts["read_only"] = place
    report, timeline = place / "r.json", place / "t.svg"
    if fault == "full-device":
        mounts["full_device"] = place
        report = timeline = place / "full"
    elif fault == "name-too-long":
        report, timeline = place / ("r" * 400 + ".json"), place / ("t" * 400 + ".svg")
    elif fault == "under-a-file":
        (place / "file").write_text("")
        report, timeline = place / "file" / "r.json", place / "file" / "t.svg"
    command = [
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly",
        "--rate-per-minute=6000", f"--ratebatch-report={report}",
        f"--ratebatch-timeline={timeline}", "--junitxml=junit.xml", *options,
    ]  # fmt: skip
    listing = pytester.path / "listing.txt"
    # Every case runs in a mount namespace: the ones without a mount of their own too, so
    # that nothing here can ever write to the machine's own /dev/full.
    result = pytester.run(*in_mount_namespace(command, listing=listing, **mounts), timeout=120)
    # The mounts end with the command: what they held is in the listing.
    left = listing.read_text().split() if mounts else sorted(p.name for p in place.iterdir())
    return result, report, timeline, left


@pytest.mark.parametrize(
    ("fault", "workers"),
    [(fault, []) for fault in sorted(FAULTS)]
    + [("full-disk", ["-n", "2"]), ("read-only", ["-n", "2"])],  # the controller writes them
    ids=[*sorted(FAULTS), "full-disk-xdist", "read-only-xdist"],
)
def test_a_file_that_cannot_be_written_costs_pytest_nothing(
    pytester: pytest.Pytester, fault: str, workers: list[str]
) -> None:
    result, report, timeline, left = run_with_fault(pytester, fault, workers)
    output = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in output
    assert "INTERNALERROR" not in output
    # One line for each file, naming its path and why; a status that is not success.
    errors = [line for line in result.stdout.lines if line.startswith("ERROR: ratebatch")]
    assert errors == [
        f"ERROR: ratebatch: report {report}: cannot be written ({FAULTS[fault]})",
        f"ERROR: ratebatch: timeline {timeline}: cannot be written ({FAULTS[fault]})",
    ]
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR
    # pytest's own outputs, whole: the JUnit XML and the terminal summary.
    junit = ElementTree.parse(pytester.path / "junit.xml").getroot()
    assert len(junit.findall(".//testcase")) == 4
    result.stdout.fnmatch_lines(
        ["*generated xml file*", "*= ratebatch =*", "tests: 4 run, 0 cancelled"]
    )
    assert result.parseoutcomes() == {"passed": 4}
    # Nothing left behind where the files were to go.
    expected = {"full-disk": [".fill"], "under-a-file": ["file"], "full-device": ["full"]}
    assert left == expected.get(fault, [])


def test_a_failed_session_keeps_its_status(pytester: pytest.Pytester) -> None:
    result, report, _, left = run_with_fault(pytester, "read-only", [], failing=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [f"ERROR: ratebatch: report {report}: cannot be written (Read-only file system)"]
    )
    assert result.parseoutcomes() == {"passed": 3, "failed": 1}
    assert left == []


@pytest.mark.parametrize("option", ["--ratebatch-report", "--ratebatch-timeline"])
def test_a_directory_is_refused_before_any_test(pytester: pytest.Pytester, option: str) -> None:
    pytester.makepyfile(test_never="def test_never(): raise AssertionError('ran')")
    pytester.mkdir("out")
    result = pytester.runpytest_subprocess(f"{option}=out")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"ERROR: ratebatch: {option}='out' (command line): a directory; name a file in it"]
    )
    assert "ran" not in result.stdout.str()


@pytest.fixture
def umask() -> Iterator[None]:
    """The test sets the process's umask; it is put back afterwards."""
    before = os.umask(0o022)
    yield
    os.umask(before)


@pytest.mark.usefixtures("umask")
@pytest.mark.parametrize(
    ("mask", "mode", "workers"),
    [(0o022, 0o644, []), (0o027, 0o640, []), (0o002, 0o664, ["-n", "2"])],
    ids=["022", "027", "002-xdist"],
)
def test_files_follow_the_umask(
    pytester: pytest.Pytester, workers: list[str], mask: int, mode: int
) -> None:
    pytester.makepyfile(test_one="def test_one(): pass")
    os.umask(mask)
    result = pytester.runpytest_subprocess(
        "--ratebatch-report=r.json", "--ratebatch-timeline=t.svg", *workers
    )
    assert result.ret == pytest.ExitCode.OK
    for name in ("r.json", "t.svg"):
        assert stat.S_IMODE((pytester.path / name).stat().st_mode) == mode, name


@pytest.mark.usefixtures("umask")
def test_a_file_written_again_keeps_its_permissions(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_one="def test_one(): pass")
    report = pytester.path / "r.json"
    report.write_text("{}")
    report.chmod(0o604)
    assert pytester.runpytest_subprocess("--ratebatch-report=r.json").ret == 0
    assert stat.S_IMODE(report.stat().st_mode) == 0o604
    assert json.loads(report.read_text())["tests"][0]["outcome"] == "passed"


# --- the writer itself -------------------------------------------------------------------


def test_a_long_name_that_fits_is_written(tmp_path: Path) -> None:
    # 250 bytes fit a file name (255); a temporary name made longer from it would not.
    path = tmp_path / ("r" * 245 + ".json")
    write_json(path, {"format": 2})
    assert json.loads(path.read_text()) == {"format": 2}
    assert [entry.name for entry in tmp_path.iterdir()] == [path.name]


def test_a_pipe_or_device_is_written_through(tmp_path: Path) -> None:
    # ``--ratebatch-report /dev/stdout``: the text goes into the pipe, which stays a pipe.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as reader:
            received.append(reader.read())

    reader = threading.Thread(target=read, daemon=True)  # never keeps a failed run alive
    reader.start()
    write_json(fifo, {"format": 2})
    reader.join(timeout=10)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert received == [b'{\n "format": 2\n}\n']


def test_a_symbolic_link_is_written_through(tmp_path: Path) -> None:
    # The link stays (root could otherwise replace /dev/stdout itself); its target is written.
    target = tmp_path / "elsewhere" / "report.json"
    target.parent.mkdir()
    target.write_text("old, longer than what replaces it" * 10)
    link = tmp_path / "r.json"
    link.symlink_to(target)
    write_json(link, {"format": 2})
    assert link.is_symlink()
    assert json.loads(target.read_text()) == {"format": 2}
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["elsewhere", "r.json"]


def test_a_failed_write_says_where_and_why(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError) as raised:
        write_json(tmp_path / "file" / "r.json", {})
    assert str(raised.value) == f"{tmp_path}/file/r.json: cannot be written (Not a directory)"
    with pytest.raises(OutputError, match=r"cannot be written \(a directory\)"):
        write_json(tmp_path, {})
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["file"]
