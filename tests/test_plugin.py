"""The plugin inside real pytest sessions (``pytester``): options, outcomes, output, report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

import pytest

from pytest_ratebatch.plugin.options import OPTIONS
from pytest_ratebatch.views.report import worst_excess

pytest_plugins = ["pytester"]

SECOND = 1_000_000_000


def write_tests(pytester: pytest.Pytester, count: int = 4, body: str = "pass") -> None:
    pytester.makepyfile(
        test_many=f"""
        import pytest

        @pytest.mark.parametrize("n", range({count}))
        def test_one(n):
            {body}
        """
    )


def load_report(path: Path) -> dict[str, object]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


# --- options -------------------------------------------------------------------------


def test_inert_without_a_policy(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import sys

        def pytest_sessionfinish(session):
            manager = session.config.pluginmanager
            ours = [name for name, _ in manager.list_name_plugin() if name.startswith("ratebatch")]
            print("plugins:", ours)
            ours = sorted(name for name in sys.modules if name.startswith("pytest_ratebatch"))
            print("modules:", ours)
        """
    )
    write_tests(pytester)
    result = pytester.runpytest_subprocess("-s")
    result.assert_outcomes(passed=4)
    output = result.stdout.str()
    assert "plugins: ['ratebatch']" in output  # the entry point alone: no session's hooks
    imported = (
        "modules: ['pytest_ratebatch', 'pytest_ratebatch.plugin', 'pytest_ratebatch.plugin.hooks', "
        "'pytest_ratebatch.plugin.options', 'pytest_ratebatch_entry', "
        "'pytest_ratebatch_entry.plugin']"
    )
    assert imported in output
    assert not [line for line in result.stdout.lines if line.startswith("ratebatch")]


REPOSITORY = Path(__file__).resolve().parent.parent


def installed_module_files() -> list[str]:
    """The module files a regular install lists (RECORD), by which pytest marks a plugin's
    packages for assertion rewriting. (An editable install lists none: pytest then marks
    nothing, so these tests mark as a regular install would.)"""
    packages = ("pytest_ratebatch", "pytest_ratebatch_entry")
    return sorted(
        path.relative_to(REPOSITORY).as_posix()
        for package in packages
        for path in (REPOSITORY / package).rglob("*.py")
    )


def test_pytest_marks_the_package_for_rewriting_but_not_the_entry_module() -> None:
    from importlib.metadata import entry_points

    from _pytest.config import _iter_rewritable_modules

    marked = list(_iter_rewritable_modules(installed_module_files()))
    assert marked == ["pytest_ratebatch"]
    (entry,) = [ep.value for ep in entry_points(group="pytest11") if ep.name == "ratebatch"]
    assert entry == "pytest_ratebatch_entry.plugin"
    assert not any(entry.startswith(f"{name}.") for name in marked)


MARKING_AS_INSTALLED = """
import sys

import pytest
from _pytest import config

installed = {files!r}
found = config._iter_rewritable_modules
config._iter_rewritable_modules = lambda files: [*found(files), *found(installed)]
sys.exit(pytest.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("args", [[], ["--rate-per-minute=600", "--ratebatch-report=r.json"]])
def test_no_module_of_the_plugin_is_compiled_by_pytest(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    # pytest parses and compiles each module it rewrites anew on every run without bytecode.
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    driver = pytester.path / "driver.py"
    driver.write_text(MARKING_AS_INSTALLED.format(files=installed_module_files()))
    pytester.makeconftest(
        """
        import sys

        def pytest_sessionfinish(session):
            loaders = {
                type(module.__spec__.loader).__name__
                for name, module in list(sys.modules.items())
                if name.startswith("pytest_ratebatch") and getattr(module, "__file__", None)
            }
            print("loaders:", sorted(loaders))
        """
    )
    write_tests(pytester, 2)
    result = pytester.run(sys.executable, str(driver), "-s", "-p", "no:cacheprovider", *args)
    result.assert_outcomes(passed=2)
    assert "loaders: ['SourceFileLoader']" in result.stdout.str()


def test_hooks_are_registered_on_as_few_plugins_as_can_be() -> None:
    from pytest_ratebatch.plugin.registry import register_hooks

    class Wrapping:
        state = "not a hook"

        @pytest.hookimpl(wrapper=True, tryfirst=True)
        def pytest_runtest_protocol(self, item: object) -> object:
            return (yield)

        def helper(self) -> None: ...

    class Running:
        def pytest_runtest_protocol(self, item: object) -> bool:
            return True

        @pytest.hookimpl(trylast=True)
        def pytest_sessionfinish(self) -> None: ...

    manager = pytest.PytestPluginManager()
    wrapping, running = Wrapping(), Running()
    register_hooks(manager, "ratebatch-session", wrapping, running)
    holders = dict(manager.list_name_plugin())
    first, second = holders["ratebatch-session"], holders["ratebatch-session-2"]
    hooks = {name for name in vars(first) if not name.startswith("__")}
    assert hooks == {"pytest_runtest_protocol", "pytest_sessionfinish"}  # no state, no helper
    assert {name for name in vars(second) if not name.startswith("__")} == {
        "pytest_runtest_protocol"
    }
    impls = manager.hook.pytest_runtest_protocol.get_hookimpls()
    assert [(impl.function, impl.wrapper, impl.tryfirst) for impl in impls] == [
        (running.pytest_runtest_protocol, False, False),
        (wrapping.pytest_runtest_protocol, True, True),
    ]
    (finish,) = manager.hook.pytest_sessionfinish.get_hookimpls()
    assert finish.function == running.pytest_sessionfinish
    assert finish.trylast


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], {"main": ["ratebatch", "ratebatch-session"]}),
        (
            ["-p", "xdist", "-n", "1"],
            {
                "main": ["ratebatch", "ratebatch-session"],
                # Two implementations of pytest_runtest_protocol: the pacing wrapper and the
                # throttle-aware protocol.
                "gw0": ["ratebatch", "ratebatch-session", "ratebatch-session-2"],
            },
        ),
    ],
)
def test_a_session_registers_its_hooks_on_one_plugin(
    pytester: pytest.Pytester, args: list[str], expected: dict[str, list[str]]
) -> None:
    pytester.makeconftest(
        """
        import json, pathlib

        def pytest_sessionfinish(session):
            manager = session.config.pluginmanager
            ours = [name for name, _ in manager.list_name_plugin() if name.startswith("ratebatch")]
            worker = getattr(session.config, "workerinput", {}).get("workerid", "main")
            pathlib.Path(f"plugins-{worker}.json").write_text(json.dumps(ours))
        """
    )
    write_tests(pytester, 1)
    result = pytester.runpytest("--rate-per-minute=600", "--ratebatch-report=r.json", *args)
    result.assert_outcomes(passed=1)
    found = {
        path.stem.removeprefix("plugins-"): json.loads(path.read_text())
        for path in pytester.path.glob("plugins-*.json")
    }
    assert found == expected


def test_the_package_alone_imports_neither_pytest_nor_its_parts() -> None:
    # The API and ``python -m pytest_ratebatch`` stay light: pytest's hooks load when asked.
    code = (
        "import sys, pytest_ratebatch; "
        "print(sorted(name for name in sys.modules if name.startswith(('pytest', '_pytest'))))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert output.strip() == "['pytest_ratebatch']"


def test_the_package_lists_the_public_api_without_importing_it() -> None:
    import pytest_ratebatch
    from pytest_ratebatch import api

    assert pytest_ratebatch.__all__ == api.__all__
    assert all(getattr(pytest_ratebatch, name) is getattr(api, name) for name in api.__all__)


def package_modules() -> list[str]:
    """Every module of the package, by its dotted name."""
    package = REPOSITORY / "pytest_ratebatch"
    return sorted(
        ".".join(
            ("pytest_ratebatch", *path.relative_to(package).with_suffix("").parts)
        ).removesuffix(".__init__")
        for path in package.rglob("*.py")
    )


@pytest.mark.parametrize("module", package_modules())
def test_any_module_imports_first(module: str) -> None:
    # A submodule's ``from ..limits import gcra`` must not reach the lazy API midway.
    code = f"import {module}"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_header_shows_the_effective_policy(pytester: pytest.Pytester) -> None:
    write_tests(pytester, 1)
    result = pytester.runpytest("--rate-per-minute=600", "--batch-size=2", "--max-failures=3")
    result.stdout.fnmatch_lines(
        ["ratebatch: rate 600/min, burst 2, batch size 2, backoff 0s, max failures 3; store: *"]
    )
    assert result.ret == 0


def test_help_lists_every_flag_and_ini_key_with_one_text(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    output = result.stdout.str()
    assert "rate limit, batches and stop conditions (pytest-ratebatch)" in output
    for spec in OPTIONS:
        assert f"{spec.flag}={spec.metavar}" in output
        assert f"  {spec.name} (string):" in output
        first_words = " ".join(spec.help.split()[:4])
        assert output.count(first_words) >= 2, spec.name  # once for the flag, once for the ini key


def test_plays_along_with_xdist_timeout_and_rerunfailures(pytester: pytest.Pytester) -> None:
    write_tests(pytester, 2)
    result = pytester.runpytest(
        "-p", "xdist", "-p", "timeout", "-p", "rerunfailures",
        "--rate-per-minute=6000", "--timeout=30", "--reruns=1", "--maxfail=5",
    )  # fmt: skip
    result.assert_outcomes(passed=2)
    assert (
        pytester.runpytest("-p", "xdist", "-p", "timeout", "-p", "rerunfailures", "--help").ret == 0
    )


BAD_VALUES = [
    (["--rate-per-minute=0"], "", "--rate-per-minute='0' (command line): must be from 0.001 *"),
    (["--rate-per-minute", "nan"], "", "--rate-per-minute='nan' (command line): must be a finite*"),
    (["--batch-size=2.5"], "", "--batch-size='2.5' (command line): not a whole number"),
    (["--total-timeout=10y"], "", "--total-timeout='10y' (command line): not a duration*"),
    (["--max-failures=-1"], "", "--max-failures='-1' (command line): must be a whole number *"),
    (["--batch-backoff=inf"], "batch_size = 2", "--batch-backoff='inf' (command line): not a dur*"),
    (
        ["--burst=2", "--batch-size=3", "--rate-per-minute=60"],
        "",
        "--burst='2' (command line): smaller than the batch size (3)*",
    ),
    ([], "rate_per_minute = fast", "rate_per_minute='fast' (ini file */tox.ini): not a number*"),
    ([], "burst = 4", "burst='4' (ini file */tox.ini): a burst needs a rate*"),
    (["-o", "batch_size=0"], "", "batch_size='0' (-o/--override-ini): must be a whole number*"),
    (["--ratebatch-report= "], "", "--ratebatch-report=' ' (command line): must not be empty"),
]


@pytest.mark.parametrize(("args", "ini", "message"), BAD_VALUES)
def test_bad_values_end_the_run_before_any_test(
    pytester: pytest.Pytester, args: list[str], ini: str, message: str
) -> None:
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(test_never="def test_never(): raise AssertionError('ran')")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: ratebatch: {message}"])
    assert "Traceback" not in result.stderr.str() + result.stdout.str()
    assert "ran" not in result.stdout.str()


def test_a_toml_number_is_a_clear_error_not_a_traceback(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml("[tool.pytest]\nrate_per_minute = 60\n")
    pytester.makepyfile(test_never="def test_never(): pass")
    result = pytester.runpytest()
    output = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in output
    if result.ret == 0:
        # pytest before 9 ignores the native [tool.pytest] table altogether.
        assert pytest.version_tuple < (9,)
        return
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    # Newer pytest checks the type itself; older 9.x leaves it to the plugin's message.
    result.stderr.fnmatch_lines(
        ["*rate_per_minute*expects a string, got int: 60*"]
        if "ratebatch:" not in result.stderr.str()
        else ['*ratebatch: rate_per_minute*rate_per_minute = "60"*']
    )


def test_command_line_wins_over_the_ini_file(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nrate_per_minute = 1\nbatch_size = 3\n")
    write_tests(pytester, 1)
    result = pytester.runpytest("--rate-per-minute=120")
    result.stdout.fnmatch_lines(["ratebatch: rate 120/min, burst 3, batch size 3*"])


def test_a_flag_wins_over_override_ini_which_wins_over_the_ini_file(
    pytester: pytest.Pytester,
) -> None:
    # pytest's -o overrides ini values, not flags (as with pytest-timeout's --timeout).
    pytester.makeini("[pytest]\nrate_per_minute = 60\n")
    write_tests(pytester, 1)
    result = pytester.runpytest("--rate-per-minute=3000", "-o", "rate_per_minute=1500")
    result.stdout.fnmatch_lines(["ratebatch: rate 3000/min, burst 1; store: *"])
    result = pytester.runpytest("-o", "rate_per_minute=1500")
    result.stdout.fnmatch_lines(["ratebatch: rate 1500/min, burst 1; store: *"])
    # A bad -o value hidden by a flag is not read; a bad flag is named as the flag.
    result = pytester.runpytest("--rate-per-minute=3000", "-o", "rate_per_minute=fast")
    assert result.ret == pytest.ExitCode.OK
    result = pytester.runpytest("--rate-per-minute=fast", "-o", "rate_per_minute=1500")
    result.stderr.fnmatch_lines(["ERROR: ratebatch: --rate-per-minute='fast' (command line): *"])


@pytest.mark.parametrize(
    ("args", "source"),
    [
        (["-o", "rate_per_minute=fast"], "(-o/--override-ini)"),
        (["-o", "rate_per_minute=1500", "-o", "rate_per_minute=fast"], "(-o/--override-ini)"),
        # pytest reads the key before "=" as written: this -o overrides nothing of ours.
        (["-o", "rate_per_minute =1500"], "(ini file */tox.ini)"),
    ],
)
def test_errors_say_whether_a_value_came_from_override_ini(
    pytester: pytest.Pytester, args: list[str], source: str
) -> None:
    ini = "[pytest]\nrate_per_minute = fast\n" if "ini file" in source else "[pytest]\n"
    pytester.makeini(ini)
    write_tests(pytester, 1)
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: ratebatch: rate_per_minute='fast' {source}: not a *"])


def test_qq_prints_nothing_of_ours_when_the_run_went_as_planned(
    pytester: pytest.Pytester,
) -> None:
    write_tests(pytester, 3)
    result = pytester.runpytest("-qq", "--rate-per-minute=6000", "--ratebatch-report=r.json")
    assert result.ret == pytest.ExitCode.OK
    assert not [line for line in result.stdout.lines if "ratebatch" in line]
    result = pytester.runpytest("-q", "--rate-per-minute=6000")
    result.stdout.fnmatch_lines(["*= ratebatch =*", "stop: none, every test was started"])


def test_qq_prints_one_line_when_something_needs_attention(pytester: pytest.Pytester) -> None:
    write_tests(pytester, 4, body="assert n != 1")
    result = pytester.runpytest("-qq", "--rate-per-minute=6000", "--max-failures=1")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    ours = [line for line in result.stdout.lines if "ratebatch" in line]
    assert ours == ["ratebatch: stop: max failures (1) reached; 2 cancelled"]


def test_plugin_can_be_disabled(pytester: pytest.Pytester) -> None:
    write_tests(pytester, 2)
    assert pytester.runpytest("-p", "no:ratebatch", "--rate-per-minute=60").ret == (
        pytest.ExitCode.USAGE_ERROR
    )
    pytester.makeini("[pytest]\nmax_failures = 1\n")
    result = pytester.runpytest("-p", "no:ratebatch")
    result.assert_outcomes(passed=2)
    result.stdout.no_fnmatch_line("ratebatch:*")


# --- stop conditions and accounting ---------------------------------------------------


def test_max_failures_cancels_the_rest_as_skips_everywhere(pytester: pytest.Pytester) -> None:
    write_tests(pytester, 6, body="assert n not in (1, 2)")
    result = pytester.runpytest(
        "--max-failures=2", "-rs", "--junit-xml=junit.xml", "--ratebatch-report=report.json"
    )
    result.assert_outcomes(passed=1, failed=2, skipped=3)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["SKIPPED [3] test_many.py:3: ratebatch: cancelled (max failures (2) reached)"]
    )
    skipped = ElementTree.parse(pytester.path / "junit.xml").getroot().findall(".//skipped")
    assert [element.get("message") for element in skipped] == [
        "ratebatch: cancelled (max failures (2) reached)"
    ] * 3
    report = load_report(pytester.path / "report.json")
    tests = report["tests"]
    assert isinstance(tests, list)
    assert [test["outcome"] for test in tests] == ["passed", "failed", "failed"] + ["cancelled"] * 3
    assert report["session"] == {**report["session"], "stop_reason": "max failures (2) reached"}  # type: ignore[dict-item]


def test_cancelled_tests_fail_the_session_even_without_failures(pytester: pytest.Pytester) -> None:
    write_tests(pytester, 3, body="import time; time.sleep(1.0 if n == 0 else 0)")
    result = pytester.runpytest("--total-timeout=0.5s", "-rs")
    result.assert_outcomes(passed=1, skipped=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*ratebatch: cancelled (total timeout (0.5s) passed)*"])
    result.stdout.fnmatch_lines(["stop: total timeout (0.5s) passed"])


def test_every_outcome_lands_in_the_report(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def broken():
            raise RuntimeError("set-up failed")

        def test_pass(): pass
        def test_fail(): assert False
        def test_error(broken): pass
        @pytest.mark.skip(reason="not today")
        def test_skip(): pass
        @pytest.mark.xfail(strict=False)
        def test_xfail(): assert False
        @pytest.mark.xfail(strict=False)
        def test_xpass(): pass
        """
    )
    result = pytester.runpytest("--ratebatch-report=out/report.json")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    tests = load_report(pytester.path / "out" / "report.json")["tests"]
    assert isinstance(tests, list)
    outcomes = {test["nodeid"].split("::")[1]: test["outcome"] for test in tests}
    assert outcomes == {
        "test_pass": "passed",
        "test_fail": "failed",
        "test_error": "error",
        "test_skip": "skipped",
        "test_xfail": "xfailed",
        "test_xpass": "xpassed",
    }
    result.stdout.fnmatch_lines(["report: *report.json"])


def test_report_alone_records_without_limiting(pytester: pytest.Pytester) -> None:
    write_tests(pytester, 3)
    result = pytester.runpytest("--ratebatch-report=r.json")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["ratebatch: no limits; store: memory"])
    report = load_report(pytester.path / "r.json")
    assert report["policy"] == {**report["policy"], "rate_per_minute": None}  # type: ignore[dict-item]


# --- pacing ----------------------------------------------------------------------------


def test_report_proves_the_rate_bound(pytester: pytest.Pytester) -> None:
    write_tests(pytester, 12)
    result = pytester.runpytest("--rate-per-minute=1200", "--burst=3", "--ratebatch-report=r.json")
    result.assert_outcomes(passed=12)
    report = load_report(pytester.path / "r.json")
    policy = report["policy"]
    tests = report["tests"]
    assert isinstance(policy, dict)
    assert isinstance(tests, list)
    starts = [(test["start_ns"], test["tokens"]) for test in tests]
    assert worst_excess(starts, policy["interval_ns"], policy["burst"]) <= 0
    span = max(start for start, _ in starts) - min(start for start, _ in starts)
    assert span >= (12 - 3) * policy["interval_ns"]  # the rate really bound
    for test in tests:
        assert test["finish_ns"] >= test["start_ns"]
        assert test["started_at"].endswith("+00:00")


def test_batches_in_the_report_keep_the_barrier_and_backoff(pytester: pytest.Pytester) -> None:
    write_tests(pytester, 5, body="import time; time.sleep(0.05)")
    result = pytester.runpytest(
        "--batch-size=2", "--batch-backoff=0.2s", "--ratebatch-report=r.json"
    )
    result.assert_outcomes(passed=5)
    tests = load_report(pytester.path / "r.json")["tests"]
    assert isinstance(tests, list)
    assert [test["batch"] for test in tests] == [1, 1, 2, 2, 3]
    for batch in (2, 3):
        previous_finish = max(t["finish_ns"] for t in tests if t["batch"] == batch - 1)
        first_start = min(t["start_ns"] for t in tests if t["batch"] == batch)
        assert first_start >= previous_finish + 0.2 * SECOND
    result.stdout.fnmatch_lines(["tests: 5 run, 0 cancelled, in 3 batches"])


def test_long_waits_are_announced_between_progress_lines(pytester: pytest.Pytester) -> None:
    write_tests(pytester, 2)
    result = pytester.runpytest("--rate-per-minute=40")  # 1.5 s between starts
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "test_many.py .*",
            "ratebatch: waiting 1.5s for rate tokens; 1/2 started, 1.5s left",
            "test_many.py .*",
        ]
    )


ANOTHER_TEST_LOOP = """
    import pytest

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(session):
        # Another plugin's loop (as pytest's own), which the session then runs instead.
        for index, item in enumerate(session.items):
            nextitem = session.items[index + 1] if index + 1 < len(session.items) else None
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
        print("another loop ran")
        return True
"""


@pytest.mark.parametrize("loop", ["the plugin's", "another plugin's", "an xdist worker's"])
def test_waits_do_not_count_toward_the_test_timeout(pytester: pytest.Pytester, loop: str) -> None:
    # Admitted before pytest-timeout's timer starts, whichever loop runs the tests: in this
    # plugin's own loop, or as the outermost wrapper of each test's protocol.
    write_tests(pytester, 3)
    extra = ["-p", "xdist", "-n", "2"] if loop == "an xdist worker's" else ["-s"]
    if loop == "another plugin's":
        pytester.makeconftest(ANOTHER_TEST_LOOP)
    result = pytester.runpytest(
        "-p", "timeout", "--timeout=1", "--rate-per-minute=40", "--burst=1",
        "--ratebatch-report=r.json", *extra,
    )  # fmt: skip
    result.assert_outcomes(passed=3)
    assert ("another loop ran" in result.stdout.str()) == (loop == "another plugin's")
    tests = load_report(pytester.path / "r.json")["tests"]
    assert isinstance(tests, list)
    starts = sorted(test["start_ns"] for test in tests)
    assert starts[2] - starts[0] >= 2.9 * SECOND  # 1.5 s apart: each later test waited


def test_exitfirst_stops_the_plugins_loop(pytester: pytest.Pytester) -> None:
    write_tests(pytester, 4, body="assert n != 1")
    result = pytester.runpytest("-x", "--rate-per-minute=6000", "--ratebatch-report=r.json")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*stopping after 1 failures*"])
    report = load_report(pytester.path / "r.json")
    tests = report["tests"]
    assert isinstance(tests, list)
    assert [test["outcome"] for test in tests] == ["passed", "failed", "not run", "not run"]
    result.stdout.fnmatch_lines(
        ["tests: 2 run, 0 cancelled, 2 not run", "stop: pytest stopped the session (*)"]
    )


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one process", "xdist"])
@pytest.mark.parametrize("option", ["-x", "--maxfail=2"])
def test_the_summary_says_when_pytest_stopped_the_session(
    pytester: pytest.Pytester, workers: list[str], option: str
) -> None:
    write_tests(pytester, 10, body="assert n not in (1, 2)")
    result = pytester.runpytest_subprocess(
        option, "--rate-per-minute=6000", "--ratebatch-report=r.json", "-p", "no:randomly",
        *workers,
    )  # fmt: skip
    # xdist's controller ends such a session as interrupted (its own way of stopping).
    expected = pytest.ExitCode.INTERRUPTED if workers else pytest.ExitCode.TESTS_FAILED
    assert result.ret == expected
    failures = 1 if option == "-x" else 2
    reason = f"pytest stopped the session (stopping after {failures} failures)"
    result.stdout.fnmatch_lines([f"stop: {reason}"])
    assert load_report(pytester.path / "r.json")["session"]["stop_reason"] == reason  # type: ignore[index]


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one process", "xdist"])
def test_collect_only_lists_the_tests_and_nothing_of_ours(
    pytester: pytest.Pytester, workers: list[str]
) -> None:
    write_tests(pytester, 3)
    result = pytester.runpytest_subprocess(
        "--co", "-q", "--rate-per-minute=60", "--ratebatch-report=r.json", *workers
    )
    assert result.ret == pytest.ExitCode.OK
    lines = result.stdout.lines
    listed = lines[: lines.index("")]  # tools read the node ids up to the first blank line
    assert listed == [f"test_many.py::test_one[{n}]" for n in range(3)]
    result.stdout.fnmatch_lines(
        [
            "*= ratebatch =*",
            "policy: rate 60/min, burst 1",
            "forecast: 3 tests take at least 2s by the policy (test durations add to it)",
            "collect-only: no test was run",
        ]
    )
    tests = load_report(pytester.path / "r.json")["tests"]
    assert isinstance(tests, list)
    assert [(test["nodeid"], test["outcome"]) for test in tests] == [
        (f"test_many.py::test_one[{n}]", "not run") for n in range(3)
    ]


def test_collect_only_and_collection_errors_run_nothing(pytester: pytest.Pytester) -> None:
    write_tests(pytester, 2, body="raise AssertionError('ran')")
    result = pytester.runpytest("--collect-only", "-q", "--rate-per-minute=60")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["test_many.py::test_one[[]0[]]", "test_many.py::test_one[[]1[]]"])
    pytester.makepyfile(test_broken="import nowhere_to_be_found")
    result = pytester.runpytest("--rate-per-minute=60")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*Interrupted: 1 error during collection*"])
    assert "ran" not in result.stdout.str()


def test_summary_section(pytester: pytest.Pytester) -> None:
    write_tests(pytester, 4)
    result = pytester.runpytest("--rate-per-minute=1200", "--burst=2")
    result.stdout.fnmatch_lines(
        [
            "*= ratebatch =*",
            "policy: rate 1200/min, burst 2",
            "tests: 4 run, 0 cancelled",
            "waited: * in total, longest *",
            "pace: */min after the first burst (limit 1200/min): the limit set the pace",
            "stop: none, every test was started",
        ]
    )


def test_ctrl_c_during_a_wait_interrupts_at_once(pytester: pytest.Pytester) -> None:
    write_tests(pytester, 2)
    # This plugin alone: others installed here may take their time on an interrupt.
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "pytest_ratebatch_entry.plugin",
            "--rate-per-minute=2",
        ],
        cwd=pytester.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
    )
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if "waiting 30s for rate tokens" in line:  # the second test now waits for its token
            break
    assert "waiting 30s for rate tokens" in seen[-1], seen
    interrupted = time.monotonic()
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=20)
    assert time.monotonic() - interrupted < 5  # generous: a loaded machine, not a 30 s wait
    assert process.returncode == pytest.ExitCode.INTERRUPTED
    assert "KeyboardInterrupt" in output
    assert "stop: interrupted" in output
