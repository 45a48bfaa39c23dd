"""Where outcomes are reported (a plain session, or the xdist controller).

The session's totals, the header, wait announcements, the summary section, the JSON report
(with a record per collected test) and the exit status. The xdist controller's reporter
builds on this one, in ``xdist``.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ..engine.scheduler import Ticket
from ..limits.clock import MONOTONIC
from ..limits.policy import ExecutionPolicy
from ..stores.base import BucketStore, Ledger
from ..views.forecast import Forecast, describe_forecast, forecast_json, forecast_policy
from ..views.report import (
    CANCELLED_PREFIX,
    Tally,
    TestRecord,
    build_report,
    describe_summary,
    merge_outcome,
    write_json,
)

if TYPE_CHECKING:
    from _pytest.terminal import TerminalReporter

    from ..views.calls import CallsSummary
    from ..views.terminal import ProgressLine

__all__ = [
    "ANNOUNCE_WAITS_FROM",
    "OutcomeRecorder",
    "Reporter",
    "TestsRun",
    "wants_forecast",
]

#: Waits shorter than this (seconds) are not announced on the terminal.
ANNOUNCE_WAITS_FROM = 1.0


def wants_forecast(policy: ExecutionPolicy) -> bool:
    """Whether the policy bounds the pace (a rate, or windows), so a forecast says something."""
    return forecast_policy(policy, []) is not None


class Reporter:
    """Where outcomes are reported: totals, header, waits, summary, JSON, exit status.

    The totals are kept as tests start, whatever the suite size; per-test records only when
    a JSON report is asked for.
    """

    def __init__(
        self,
        config: pytest.Config,
        policy: ExecutionPolicy,
        report_path: Path | None,
        store: BucketStore,
        ledger: Ledger,
        start_ns: int,
        timeline_path: Path | None = None,
    ) -> None:
        self.config = config
        self.policy = policy
        self.report_path = report_path
        self.timeline_path = timeline_path
        self.store = store
        self.ledger = ledger
        self.start_ns = start_ns
        self.start_wall = time.time() - (MONOTONIC.now_ns() - start_ns) / 1e9
        self.tally = Tally()
        #: Throttles and pauses (``throttle.retrying``), for the summary and the JSON report.
        self.events: list[dict[str, Any]] = []
        #: Per-test records, kept only for the JSON report (or the timeline drawn from it).
        drawn = report_path is not None or timeline_path is not None
        self.records: dict[str, TestRecord] | None = {} if drawn else None
        self.interrupted = False
        #: Why pytest itself stopped the session (``-x``, ``--maxfail``, ...), if it did.
        self.stopped_by_pytest = ""
        #: Our files that could not be written (``report``, ``timeline``): a line for each,
        #: naming the path and why.
        self.output_errors: dict[str, str] = {}
        self._terminal: TerminalReporter | None = None
        #: The least time the policy imposes on the collected tests (``None``: no rate, no
        #: windows, or not known yet).
        self.forecast: Forecast | None = None
        self.wants_forecast = wants_forecast(policy)
        self._forecast_line = ""
        self.progress: ProgressLine | None = None
        self.output_lock = threading.RLock()
        self._warned: set[str] = set()
        #: The calls to limited hosts (``None``: no call limit), and what fills it in as
        #: the session ends (this process's calls; the controller's arrive from workers).
        self.calls: CallsSummary | None = None
        self._fill_calls: Callable[[CallsSummary], None] | None = None
        #: With call limits and pytest's cache: the tests that ran, whose calls the cache
        #: then keeps for the next run's forecast (``views.call_forecast``).
        self._tests_run: TestsRun | None = None
        self._call_forecast: list[str] = []  # the calls' forecast lines, until printed
        self._calls_planned = False

    def add_calls(self, fill: Callable[[CallsSummary], None] | None) -> CallsSummary:
        """Report the calls to limited hosts, which ``fill`` hands over at the end."""
        from ..views.calls import CallsSummary

        self.calls = CallsSummary(self.policy.call_limits, keep_calls=self.records is not None)
        self._fill_calls = fill
        if getattr(self.config, "cache", None) is not None:  # not with -p no:cacheprovider
            from .registry import register_hooks

            self._tests_run = TestsRun()
            register_hooks(self.config.pluginmanager, "ratebatch-tests-run", self._tests_run)
        return self.calls

    def _record(self, nodeid: str) -> TestRecord:
        assert self.records is not None
        record = self.records.get(nodeid)
        if record is None:
            record = self.records[nodeid] = TestRecord(nodeid)
        return record

    # --- the session -----------------------------------------------------------------

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self._terminal = self.config.pluginmanager.get_plugin("terminalreporter")

    def pytest_report_header(self, config: pytest.Config) -> str:
        return f"ratebatch: {self.policy.describe()}; store: {self.store.describe()}"

    def collected(
        self,
        items: list[pytest.Item],
        priorities: dict[str, int],
        resources: dict[str, dict[str, float]],
    ) -> None:
        """The session's final items (from the pacer, after every collection hook), the
        priorities that are not 0 and the resources declared."""
        self.tally.collected = len(items)
        if self.records is not None:
            # Every collected test gets a record, so the report accounts for tests never reached.
            self.add_records([item.nodeid for item in items], priorities, resources)

    def add_records(
        self,
        nodeids: Sequence[str],
        priorities: dict[str, int],
        resources: dict[str, dict[str, float]],
    ) -> None:
        assert self.records is not None
        records = self.records
        for nodeid in nodeids:
            record = records.get(nodeid)
            if record is None:
                record = records[nodeid] = TestRecord(nodeid, outcome="not run")
            record.priority = priorities.get(nodeid, 0)
            record.resources = resources.get(nodeid, {})

    def plan(
        self, costs: list[int], costs_known: bool = True, priorities: list[int] | None = None
    ) -> None:
        """The collected tests' costs (and priorities, ``None``: all 0), in run order:
        forecast what the policy imposes."""
        if self.forecast is not None:
            return
        forecast = forecast_policy(self.policy, costs)
        if forecast is not None:
            self.forecast = forecast
            text = describe_forecast(forecast, self.policy.total_timeout, costs_known, priorities)
            self._forecast_line = f"forecast: {text}"

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if self._tests_run is not None:
            self._plan_calls([item.nodeid for item in session.items])
        self._print_forecast()

    def _plan_calls(self, nodeids: Sequence[str], repeat: int = 1) -> None:
        """Forecast the calls of the collected tests (``repeat``: how often each runs) from
        the counts of the last run in pytest's cache; once."""
        cache = getattr(self.config, "cache", None)
        if self._calls_planned or self._tests_run is None or cache is None:
            return
        self._calls_planned = True
        from ..views.call_forecast import CACHE_KEY, call_forecast_lines, read_counts

        known = read_counts(cache.get(CACHE_KEY, None))
        lines = call_forecast_lines(self.policy.call_limits, nodeids, known, repeat)
        self._call_forecast = [f"forecast: {line}" for line in lines]

    def _print_forecast(self) -> None:
        if self.config.option.collectonly:
            return  # not inside the list of tests: the summary section says it
        if self.config.get_verbosity() < -1:
            return
        if self._forecast_line:
            self._write_announcement(self._forecast_line)
            self._forecast_line = ""
        for line in self._call_forecast:
            self._write_announcement(line)
        self._call_forecast = []

    # --- each test ---------------------------------------------------------------------

    def started(self, nodeid: str, ticket: Ticket, start_offset: int, retry: bool = False) -> None:
        """Record a test's admission or cancellation (the pacer keeps the tally)."""
        record = self._record(nodeid)
        if retry:
            if not ticket.cancelled:
                record.retries.append([start_offset, ticket.tokens, ticket.store_ns])
            return
        record.outcome = ""
        record.waited_ns = ticket.waited_ns
        if ticket.cancelled:
            record.reason = f"{CANCELLED_PREFIX} ({ticket.cancelled})"
        else:
            record.batch = ticket.batch
            record.tokens = ticket.tokens
            record.start_ns = start_offset
            record.store_ns = ticket.store_ns
            record.limit = ticket.limit

    def finished(self, nodeid: str, finish_offset: int) -> None:
        self._record(nodeid).finish_ns = finish_offset

    def cancelled(self, nodeid: str, reason: str) -> None:
        """A running test the session's stop cancelled (its skip report follows)."""
        self._record(nodeid).reason = f"{CANCELLED_PREFIX} ({reason})"

    def acquired(self, nodeid: str, acquisition: list[int | None]) -> None:
        """A test took tokens while running."""
        if self.records is not None:
            self._record(nodeid).acquired.append(acquisition)

    def note_outcome(self, report: pytest.TestReport) -> None:
        """Fold one phase's report into the test's record."""
        record = self._record(report.nodeid)
        if record.reason and report.skipped:
            record.outcome = "cancelled"
            return
        record.outcome = merge_outcome(
            record.outcome if record.outcome != "not run" else "",
            report.when,
            report.outcome,
            hasattr(report, "wasxfail"),
        )

    def announce_wait(self, what: str, seconds: float, worker: str = "") -> None:
        """A wait for the limiter begins: show it with the run's progress (long ones only)."""
        if seconds < ANNOUNCE_WAITS_FROM:
            return
        progress = self.progress
        if progress is None:
            terminal = self._terminal
            if terminal is None or self.config.get_verbosity() < -1:
                return
            progress = self.progress = self._progress_line(terminal)
        progress.waiting(what, seconds, worker)
        progress.start()

    def _progress_line(self, terminal: TerminalReporter) -> ProgressLine:
        from ..views.terminal import ProgressLine, TerminalGuard  # on the first wait, if any

        tty = bool(getattr(terminal, "isatty", False))
        line = ProgressLine(terminal, self.output_lock, self._status, tty)
        TerminalGuard(self.output_lock, line.clear if tty else None).install(terminal)
        return line

    def _status(self, now_ns: int) -> tuple[str, int | None]:
        """Where the run stands: tests started of all, rate; and the time left."""
        total = self.tally.collected
        forecast = self.forecast
        if forecast is not None and forecast.tests != total:
            forecast = None
        from ..views.progress import Progress

        rate = self.policy.rate_limit
        burst = rate.burst if rate is not None else 0
        progress = Progress(total, forecast, self.start_ns, burst)
        return progress.describe_parts(self.started_count, now_ns, self._paused_ns(now_ns))

    @property
    def started_count(self) -> int:
        """Tests started (or cancelled) so far."""
        return self.tally.run + self.tally.cancelled

    def _paused_ns(self, now_ns: int) -> int:
        """The time the server's pauses took from the run so far (their union)."""
        paused = 0
        reach = 0
        for start, end in sorted(
            (event["at_ns"], event["paused_until_ns"])
            for event in self.events
            if event.get("paused_until_ns") is not None and event.get("at_ns") is not None
        ):
            until = min(end, now_ns - self.start_ns)
            since = max(start, reach)
            if until > since:
                paused += until - since
                reach = until
        return paused

    def warn_once(self, text: str) -> None:
        """A warning line for the session, printed once however many processes send it."""
        with self.output_lock:
            if text in self._warned:
                return
            self._warned.add(text)
        self._write_announcement(text)

    def _write_announcement(self, text: str) -> None:
        terminal = self._terminal
        if terminal is None:
            return
        with self.output_lock:
            if self.progress is not None:
                self.progress.clear()
            from ..views.terminal import write_between_progress  # waits of a second or more

            write_between_progress(terminal, f"ratebatch: {text}")

    # --- the end -----------------------------------------------------------------------

    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo[BaseException]) -> None:
        if excinfo.type is KeyboardInterrupt:
            self.interrupted = True  # Ctrl-C
        else:  # a stop raised as an interrupt: xdist's after -x, pytest.exit(), ...
            self.stopped_by_pytest = str(excinfo.value)

    @property
    def stop_reason(self) -> str:
        return self.ledger.snapshot().stop_reason or self.stopped_otherwise()

    def stopped_otherwise(self) -> str:
        """A stop that is not the plugin's: pytest's own (``-x``, ...), or Ctrl-C."""
        if self.stopped_by_pytest:
            return f"pytest stopped the session ({self.stopped_by_pytest})"
        return "interrupted" if self.interrupted else ""

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.progress is not None:
            self.progress.close()
        stopped = session.shouldfail or session.shouldstop  # -x, --maxfail, ...
        if stopped and not self.stopped_by_pytest:
            self.stopped_by_pytest = str(stopped)
        if self.calls is not None and self._fill_calls is not None:
            self._fill_calls(self.calls)
            self._fill_calls = None
        if self._tests_run is not None:
            self._save_call_counts()
        if self.tally.cancelled and session.exitstatus == pytest.ExitCode.OK:
            # Tests that never ran are not a success, even if nothing failed.
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if self.records is None:
            return
        forecast = self.forecast
        data = build_report(
            self.policy,
            list(self.records.values()),
            self.tally,
            events=self.events,
            stop_reason=self.stop_reason,
            store=self.store.describe(),
            session_wall=self.start_wall,
            duration_ns=MONOTONIC.now_ns() - self.start_ns,
            forecast=None if forecast is None else forecast_json(forecast),
        )
        if self.calls is not None:
            data["calls"] = self.calls.to_json()
            by_test = self.calls.by_test()
            for test in data["tests"]:
                test["calls"] = by_test.get(test["nodeid"], [])
        self._write_outputs(data)
        if self.output_errors:
            if session.exitstatus == pytest.ExitCode.OK:
                # Something other than the tests went wrong; tests that failed or an
                # interrupt keep their status (the error line is printed either way).
                session.exitstatus = pytest.ExitCode.INTERNAL_ERROR
            if self._terminal is None:  # no terminal summary to print them in
                for line in self.output_errors.values():
                    sys.stderr.write(f"{line}\n")

    def _save_call_counts(self) -> None:
        """Keep each test's calls (``CallsSummary.counts``, every process's) in pytest's
        cache for the next run's forecast: the tests that ran replace their previous counts
        (with none if they made no call), the others keep theirs."""
        from ..views.call_forecast import CACHE_KEY, merge_counts

        cache = getattr(self.config, "cache", None)
        if self.calls is None or cache is None or self._tests_run is None:
            return
        runs = self._tests_run.runs(self._unreported())
        if runs:
            previous = cache.get(CACHE_KEY, None)
            cache.set(CACHE_KEY, merge_counts(previous, runs, self.calls.counts))

    def _unreported(self) -> list[str]:
        """The processes whose totals never came (xdist workers that crashed)."""
        return []

    def _write_outputs(self, data: dict[str, Any]) -> None:
        """The JSON report and the timeline; a file that cannot be written costs nothing
        else (pytest's JUnit XML and summary come after this hook): one line says why."""
        from ..views.output import OutputError

        if self.report_path is not None:
            try:
                write_json(self.report_path, data)
            except OutputError as error:
                self.output_errors["report"] = f"ERROR: ratebatch: report {error}"
        if self.timeline_path is not None:
            from ..views.timeline import write_timeline

            try:
                write_timeline(self.timeline_path, [data])
            except OutputError as error:
                self.output_errors["timeline"] = f"ERROR: ratebatch: timeline {error}"

    def summary_lines(self) -> list[str]:
        lines = describe_summary(self.policy, self.tally, self.stop_reason, self.events)
        if self.calls is not None:
            lines += self.calls.lines()
        return lines

    def attention_line(self) -> str:
        """What needs attention, in one line (a stop, cancelled tests, throttles); empty
        when the run went as planned."""
        parts = []
        if self.stop_reason:
            parts.append(f"stop: {self.stop_reason}")
        if self.tally.cancelled:
            parts.append(f"{self.tally.cancelled} cancelled")
        throttles = sum(event.get("event") == "throttle" for event in self.events)
        if throttles:
            parts.append(f"throttled {throttles} times" if throttles > 1 else "throttled once")
        if self.calls is not None and self.calls.attention():
            parts.append(self.calls.attention())
        return "; ".join(parts)

    def pytest_terminal_summary(self, terminalreporter: TerminalReporter) -> None:
        if self.config.get_verbosity() < -1:  # -qq: quiet, unless something needs attention
            line = self.attention_line()
            if line:
                terminalreporter.line(f"ratebatch: {line}")
            for message in self.output_errors.values():  # a file of ours not written
                terminalreporter.line(message, red=True, bold=True)
            return
        terminalreporter.section("ratebatch")
        if self.config.option.collectonly:
            lines = [f"policy: {self.policy.describe()}"]
            if self._forecast_line:
                lines.append(self._forecast_line)
            lines += self._call_forecast
            lines.append("collect-only: no test was run")
        else:
            lines = self.summary_lines()
        for line in lines:
            terminalreporter.line(line)
        for kind, path in (("report", self.report_path), ("timeline", self.timeline_path)):
            error = self.output_errors.get(kind)
            if error is not None:
                terminalreporter.line(error, red=True, bold=True)
            elif path is not None:
                terminalreporter.line(f"{kind}: {path}")


class TestsRun:
    """Hook: the tests that ran to their teardown, by the process that ran them (an xdist
    worker's id, ``""`` in a plain session); a test the session's stop cancelled did not
    run, nor one cut short (an interrupt, a worker's crash)."""

    __test__ = False  # not a test class, whatever its name

    def __init__(self) -> None:
        self.by_process: dict[str, set[str]] = {}
        self.cancelled: set[str] = set()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and CANCELLED_PREFIX in str(report.longrepr):
            self.cancelled.add(report.nodeid)
            return
        if report.when != "teardown":
            return
        node = getattr(report, "node", None)  # the worker, on the xdist controller
        process = str(node.gateway.id) if node is not None else ""
        tests = self.by_process.get(process)
        if tests is None:
            tests = self.by_process[process] = set()
        tests.add(report.nodeid)

    def runs(self, lost: Iterable[str] = ()) -> dict[str, int]:
        """Each test that ran: in how many processes (several with ``--dist each``), but
        the ``lost`` ones (whose counts never came); a test cancelled is left out."""
        lost = set(lost)
        runs: dict[str, int] = {}
        for process, tests in self.by_process.items():
            if process not in lost:
                for nodeid in tests:
                    runs[nodeid] = runs.get(nodeid, 0) + 1
        for nodeid in self.cancelled:
            runs.pop(nodeid, None)
        return runs


class OutcomeRecorder:
    """One process, with a JSON report: each test's outcome, from its reports."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.reporter.note_outcome(report)
