"""The pytest glue: options, the header, pacing each test's start, reporting.

Without any policy (and no report asked for) only ``pytest_addoption`` and
``pytest_configure`` run: the per-test hooks live on ``RateBatchSession``, which is
registered only when there is something to enforce.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .clock import MONOTONIC
from .policy import (
    COMMAND_LINE,
    OPTIONS,
    ExecutionPolicy,
    PolicyError,
    RawValue,
    build_policy,
    format_duration,
    parse_value,
)
from .report import (
    CANCELLED_PREFIX,
    TestRecord,
    describe_summary,
    merge_outcome,
    summarize,
    write_report,
)
from .scheduler import TaskScheduler

if TYPE_CHECKING:
    from _pytest.terminal import TerminalReporter

__all__ = ["SESSION_KEY", "RateBatchSession"]

#: Waits shorter than this are not announced on the terminal.
ANNOUNCE_WAITS_FROM = 1.0
REPORT_OPTION = "ratebatch_report"


def _dest(name: str) -> str:
    return name if name.startswith("ratebatch_") else f"ratebatch_{name}"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(
        "ratebatch", "rate limit, batches and stop conditions (pytest-ratebatch)"
    )
    for spec in OPTIONS:
        group.addoption(
            spec.flag, dest=_dest(spec.name), metavar=spec.metavar, default=None, help=spec.help
        )
        parser.addini(spec.name, help=spec.help, default=None)


def read_raw_options(config: pytest.Config) -> dict[str, RawValue]:
    """Each option the user set, as written: the command line wins over the ini file."""
    overrides = {entry.split("=", 1)[0].strip() for entry in (config.option.override_ini or ())}
    ini_source = f"ini file {config.inipath}"
    raw: dict[str, RawValue] = {}
    for spec in OPTIONS:
        value = config.getoption(_dest(spec.name))
        if value is not None:
            raw[spec.name] = RawValue(str(value), COMMAND_LINE)
            continue
        try:
            ini_value = config.getini(spec.name)
        except (TypeError, ValueError) as error:
            raise pytest.UsageError(
                f"ratebatch: {spec.name} ({ini_source}): {error}; "
                f'write the value as a string, e.g. {spec.name} = "60"'
            ) from None
        if ini_value not in (None, ""):
            source = "-o/--override-ini" if spec.name in overrides else ini_source
            raw[spec.name] = RawValue(str(ini_value), source)
    return raw


def load_policy(config: pytest.Config) -> tuple[ExecutionPolicy, Path | None]:
    """The validated policy and report path, or ``pytest.UsageError`` naming the bad value."""
    raw = read_raw_options(config)
    report = raw.pop(REPORT_OPTION, None)
    try:
        policy = build_policy(raw)
        report_text = None if report is None else parse_value(REPORT_OPTION, report)
    except PolicyError as error:
        raise pytest.UsageError(str(error)) from None
    report_path = None
    if report_text is not None:
        assert report is not None
        base = config.invocation_params.dir if report.source == COMMAND_LINE else config.rootpath
        report_path = base / Path(report_text).expanduser()
    return policy, report_path


SESSION_KEY = pytest.StashKey["RateBatchSession"]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ratebatch(cost=1): tokens this test takes at its start (0 exempts it)."
    )
    if config.option.help or config.option.version:
        return
    policy, report_path = load_policy(config)
    if not policy.is_active and report_path is None:
        return
    session = RateBatchSession(config, policy, report_path)
    config.stash[SESSION_KEY] = session
    config.pluginmanager.register(session, "ratebatch-session")


class RateBatchSession:
    """The active plugin: one per pytest process that runs or reports tests."""

    def __init__(
        self, config: pytest.Config, policy: ExecutionPolicy, report_path: Path | None
    ) -> None:
        self.config = config
        self.policy = policy
        self.report_path = report_path
        self.records: dict[str, TestRecord] = {}
        self.start_ns = MONOTONIC.now_ns()
        self.start_wall = time.time()
        self.scheduler = TaskScheduler(
            policy, session_start_ns=self.start_ns, on_wait=self._announce_wait
        )
        self._terminal: TerminalReporter | None = None
        self.interrupted = False

    # --- the session -----------------------------------------------------------------

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self._terminal = self.config.pluginmanager.get_plugin("terminalreporter")

    def pytest_report_header(self, config: pytest.Config) -> str:
        store = self.scheduler.limiter.store.describe() if self.scheduler.limiter else "memory"
        return f"ratebatch: {self.policy.describe()}; store: {store}"

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        # Every collected test gets a record, so the report accounts for tests never reached.
        for item in items:
            self.records.setdefault(item.nodeid, TestRecord(item.nodeid, outcome="not run"))

    # --- each test ---------------------------------------------------------------------

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, object, object]:
        # Outermost wrapper: waits happen before the test's own timers (pytest-timeout) start.
        ticket = self.scheduler.admit(1)
        record = self.records.get(item.nodeid)
        if record is None:
            record = self.records[item.nodeid] = TestRecord(item.nodeid)
        record.outcome = ""
        record.waited_ns = ticket.waited_ns
        if ticket.cancelled:
            record.reason = f"{CANCELLED_PREFIX} ({ticket.cancelled})"
            item.add_marker(pytest.mark.skip(reason=record.reason))
        else:
            record.batch = ticket.batch
            record.tokens = ticket.tokens
            record.start_ns = ticket.start_ns - self.start_ns
        try:
            return (yield)
        finally:
            if not ticket.cancelled:
                record.finish_ns = MONOTONIC.now_ns() - self.start_ns
                self.scheduler.finish(ticket, record.failed)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        record = self.records.get(report.nodeid)
        if record is None:
            return
        if record.reason and report.skipped:
            record.outcome = "cancelled"
            return
        record.outcome = merge_outcome(
            record.outcome, report.when, report.outcome, hasattr(report, "wasxfail")
        )

    def _announce_wait(self, what: str, seconds: float) -> None:
        terminal = self._terminal
        if terminal is not None and seconds >= ANNOUNCE_WAITS_FROM:
            terminal.write_line(
                f"ratebatch: waiting {format_duration(round(seconds, 1))} for {what}"
            )

    # --- the end -----------------------------------------------------------------------

    def pytest_keyboard_interrupt(self) -> None:
        self.interrupted = True

    @property
    def cancelled(self) -> int:
        return sum(record.outcome == "cancelled" for record in self.records.values())

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.cancelled and session.exitstatus == pytest.ExitCode.OK:
            # Tests that never ran are not a success, even if nothing failed.
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if self.report_path is not None:
            write_report(
                self.report_path,
                self.policy,
                list(self.records.values()),
                stop_reason="interrupted" if self.interrupted else self.scheduler.stop_reason,
                store=self._store_name(),
                session_wall=self.start_wall,
                duration_ns=MONOTONIC.now_ns() - self.start_ns,
            )

    def _store_name(self) -> str:
        limiter = self.scheduler.limiter
        return limiter.store.describe() if limiter is not None else "memory"

    def pytest_terminal_summary(self, terminalreporter: TerminalReporter) -> None:
        terminalreporter.section("ratebatch")
        summary = summarize(self.records.values())
        stop_reason = "interrupted" if self.interrupted else self.scheduler.stop_reason
        for line in describe_summary(self.policy, summary, stop_reason):
            terminalreporter.line(line)
        if self.report_path is not None:
            terminalreporter.line(f"report: {self.report_path}")
