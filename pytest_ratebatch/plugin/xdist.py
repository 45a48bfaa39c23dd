"""The pytest-xdist side: the controller's reporter and the workers' pacers.

Imported only under pytest-xdist (``session`` wires them), so a plain session loads none of
it. A worker sends its totals to the controller when it finishes, and (with a JSON report)
each test's account on its reports; the controller merges them.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ..engine.scheduler import TaskScheduler, Ticket
from ..limits.clock import MONOTONIC
from ..views.report import CANCELLED_PREFIX, Tally, describe_summary
from .pacing import Pacer
from .reporter import Reporter
from .session_dir import WARNING

if TYPE_CHECKING:
    from .session_dir import SharedSession

__all__ = [
    "COSTS_FILE",
    "REPORT_ATTRIBUTE",
    "WORKEROUTPUT_KEY",
    "ControllerReporter",
    "RecordingWorkerPacer",
    "WorkerPacer",
    "WorkerRecords",
    "read_worker_costs",
    "ticket_start",
    "write_worker_costs",
]

#: The attribute of a TestReport that carries a test's ticket from a worker to the controller.
REPORT_ATTRIBUTE = "ratebatch"
#: The key of a worker's totals in what it sends its controller at the end (``workeroutput``).
WORKEROUTPUT_KEY = "ratebatch"


def ticket_start(ticket: Ticket, start_offset: int) -> list[Any]:
    """What a worker sends the controller about a test's start, on its set-up report.

    A list, not a dict: it travels with every test, and a list is smaller on the wire.
    """
    if ticket.cancelled:
        return [ticket.waited_ns, ticket.cancelled]
    admission = [ticket.waited_ns, "", ticket.batch, ticket.tokens, start_offset, ticket.store_ns]
    if ticket.limit:
        admission.append(ticket.limit)
    return admission


#: The file in which a worker leaves its collection's costs other than 1 for the controller.
COSTS_FILE = "costs-{worker}.json"


#: What a worker's markers say, by node id: costs other than 1, priorities other than 0,
#: resources declared (``write_worker_costs``).
WorkerMarkers = tuple[dict[str, int], dict[str, int], dict[str, dict[str, float]]]


def write_worker_costs(directory: Path, worker: str, markers: WorkerMarkers) -> bool:
    """What a worker's markers say, written whole before its collection ends; ``False`` if
    it cannot be (the session directory failed: the forecast then counts 1 a test, and the
    store's own failure stops the session with the reason)."""
    path = directory / COSTS_FILE.format(worker=worker)
    partial = path.with_name(f".{path.name}.partial")
    costs, priorities, resources = markers
    try:
        data = {"costs": costs, "priorities": priorities, "resources": resources}
        partial.write_text(json.dumps(data), encoding="utf-8")
        os.replace(partial, path)
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink()
        return False
    return True


def read_worker_costs(directory: Path, worker: str) -> WorkerMarkers | None:
    """What ``write_worker_costs`` wrote; ``None`` if the worker wrote nothing (bad
    markers)."""
    try:
        data = json.loads((directory / COSTS_FILE.format(worker=worker)).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    markers = (data.get("costs"), data.get("priorities"), data.get("resources"))
    if not all(isinstance(part, dict) for part in markers):
        return None
    return markers  # type: ignore[return-value]  # as written by this version


class ControllerReporter(Reporter):
    """The xdist controller's reporter: each worker's totals arrive when it finishes, its
    announcements on the shared session's socket; it reads no per-test report unless a
    JSON report is asked for (``WorkerRecords``)."""

    def __init__(self, shared: SharedSession, *args: Any) -> None:
        super().__init__(*args)
        self.shared = shared
        self._collected: dict[str, int] = {}  # worker -> tests it collected
        self._lost: list[str] = []  # workers that died before sending their totals
        self._reported: set[str] = set()  # workers whose totals arrived
        self._worker_stop = ""  # a stop a worker saw that the shared ledger may not hold
        self._started = 0  # tests the workers started (for the progress line)
        self.output_lock = shared.output_lock

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        super().pytest_sessionstart(session)
        terminal = self._terminal
        if terminal is not None and self.config.get_verbosity() >= -1:
            # The announcer thread writes too: the lock is installed from the start.
            self.progress = self._progress_line(terminal)
        self.shared.start_announcer(self._announced)

    def _announced(self, message: str) -> None:
        """A worker's announcement: ``worker<TAB>seconds<TAB>what``, a wait it begins, or
        ``worker<TAB>warning<TAB>text``."""
        try:
            worker, seconds, what = message.split("\t", 2)
            if seconds == WARNING:
                self.warn_once(what)
                return
            self.announce_wait(what, float(seconds), worker)
        except ValueError:  # not from this version's workers: show it as it came
            self._write_announcement(message)

    @property
    def started_count(self) -> int:
        return self._started

    @pytest.hookimpl(optionalhook=True)
    def pytest_runtest_logstart(self, nodeid: str, location: object) -> None:
        self._started += 1

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """xdist hook: hand the shared session to each worker."""
        node.workerinput.update(self.shared.workerinput(send_records=self.records is not None))

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        pass  # the controller collects nothing: the workers' collections tell

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        # Every worker collects the whole suite; with --dist each, every worker runs it.
        worker = str(node.gateway.id)
        self._collected[worker] = len(ids)
        each = self.config.getoption("dist", "load") == "each"
        counts = self._collected.values()
        self.tally.collected = sum(counts) if each else max(counts)
        # The worker wrote its costs other than 1 and priorities other than 0 before it
        # reported its collection (when a forecast or a report wants them).
        known = None
        if self.records is not None or (self.forecast is None and self.wants_forecast):
            known = read_worker_costs(self.shared.directory, worker)
        priorities = {} if known is None else known[1]
        if self.records is not None:
            self.add_records(ids, priorities, {} if known is None else known[2])
        repeat = max(1, len(getattr(self.config.option, "tx", None) or ())) if each else 1
        self._plan_calls(ids, repeat)  # at the first collection, from the last run's counts
        if self.forecast is None and self.wants_forecast:
            costs = [1] * len(ids) if known is None else [known[0].get(id, 1) for id in ids]
            ordered = [priorities.get(id, 0) for id in ids] if priorities else None
            self.plan(
                costs * repeat,
                costs_known=known is not None,
                priorities=None if ordered is None else ordered * repeat,
            )
        self._print_forecast()

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object | None) -> None:
        output = getattr(node, "workeroutput", {}).get(WORKEROUTPUT_KEY)
        worker = str(node.gateway.id)
        if output is not None:
            self.tally.merge(output["tally"])
            self.events.extend(output["events"])
            self._reported.add(worker)
            self._worker_stop = self._worker_stop or output.get("stop", "")
        else:
            self._lost.append(worker)

    def _unreported(self) -> list[str]:
        """Workers whose totals never came: crashed, or interrupted before they sent them."""
        return sorted(set(self._lost) | (set(self._collected) - self._reported))

    @property
    def stop_reason(self) -> str:
        # A worker whose session directory failed may have stopped alone (``FileLedger``).
        reason = self.ledger.snapshot().stop_reason or self._worker_stop
        return reason or self.stopped_otherwise()

    @pytest.hookimpl(optionalhook=True)
    def pytest_handlecrashitem(self, crashitem: str, report: pytest.TestReport) -> None:
        # A test whose worker crashed counts as a failure.
        self.ledger.finish(0, failed=True, now=MONOTONIC.now_ns())

    def summary_lines(self) -> list[str]:
        unreported = self._unreported()
        if not unreported or self.records is not None:
            return super().summary_lines()  # complete, or counted again from the records
        # Without records the tests of these workers are not counted, nor claimed "not run".
        lines = describe_summary(
            self.policy, self.tally, self.stop_reason, self.events, count_not_run=False
        )
        lost = [worker for worker in unreported if worker in self._lost]
        if lost:
            lines.insert(-1, f"(without the tests of {', '.join(lost)}, which crashed)")
        silent = [worker for worker in unreported if worker not in self._lost]
        if silent:
            workers = ", ".join(silent)
            lines.insert(-1, f"(without the tests of {workers}, which did not send their totals)")
        return lines

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.shared.stop_announcer()
        if self.records is not None and self._unreported():
            # Some workers' totals never came; each test's record did, with its report.
            self.tally.recount(self.records.values())
        super().pytest_sessionfinish(session)


class WorkerRecords:
    """xdist controller, with a JSON report: each test's record, from the accounts its
    worker sends on the set-up and teardown reports, and its outcome."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        reporter = self.reporter
        record = reporter._record(report.nodeid)
        data = getattr(report, REPORT_ATTRIBUTE, None)
        if data is not None:
            if record.outcome == "not run":
                record.outcome = ""
            if report.when == "setup":
                record.waited_ns, cancelled, *admission = data
                if cancelled:
                    record.reason = f"{CANCELLED_PREFIX} ({cancelled})"
                else:
                    record.batch, record.tokens, record.start_ns, record.store_ns = admission[:4]
                    record.limit = admission[4] if len(admission) > 4 else ""
            elif report.when == "teardown":
                record.finish_ns, record.acquired, record.retries, *cancelled = data
                if cancelled:  # the session's stop caught the test while it ran
                    record.reason = f"{CANCELLED_PREFIX} ({cancelled[0]})"
                    if record.outcome == "skipped":
                        record.outcome = "cancelled"
        worker = getattr(report, "node", None)
        if worker is not None:
            record.worker = str(getattr(getattr(worker, "gateway", None), "id", ""))
        reporter.note_outcome(report)


class WorkerPacer(Pacer):
    """A pytest-xdist worker's pacer: it sends its totals to the controller when it finishes."""

    def __init__(self, scheduler: TaskScheduler, start_ns: int) -> None:
        super().__init__(scheduler, start_ns, Tally())
        #: Where to leave the costs for the controller's forecast (``None``: no forecast).
        self.costs_to: tuple[Path, str] | None = None

    def plan(self, items: list[pytest.Item]) -> None:
        if self.costs_to is not None:
            directory, worker = self.costs_to
            markers = (self._costs, self._priorities, self._resources)
            write_worker_costs(directory, worker, markers)

    def acquired(self, nodeid: str, acquisition: list[int | None]) -> None:
        pass  # only a JSON report lists them

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        # Before xdist's wrapper sends workeroutput to the controller.
        workeroutput = getattr(session.config, "workeroutput", None)
        if workeroutput is not None:
            events = self.throttles.events if self.throttles is not None else []
            workeroutput[WORKEROUTPUT_KEY] = {
                "tally": self._tally.to_list(),
                "events": events,
                "stop": self.scheduler.ledger.snapshot().stop_reason,
            }


class RecordingWorkerPacer(WorkerPacer):
    """A worker's pacer when the controller writes a JSON report: each test's account
    travels on its reports. The start rides on the first set-up report logged (so a test
    whose worker dies later still shows when it started); the finish, in-test tokens and
    retries on the teardown report. Other reports carry nothing.
    """

    def __init__(self, scheduler: TaskScheduler, start_ns: int) -> None:
        super().__init__(scheduler, start_ns)
        self._start: list[Any] | None = None  # the running test's start, until sent
        self._admitted = False  # whether the running test was admitted (not cancelled)
        self._acquired: list[list[int | None]] = []  # the running test's in-test tokens
        self._retries: list[list[int | None]] = []  # its retries' admissions
        self._cancelled = ""  # why the session's stop cancelled it while it ran, if it did

    def started(self, nodeid: str, ticket: Ticket, retry: bool = False) -> None:
        super().started(nodeid, ticket, retry)
        start_offset = ticket.start_ns - self.start_ns
        if retry:
            if not ticket.cancelled:
                self._retries.append([start_offset, ticket.tokens, ticket.store_ns])
            return
        self._start = ticket_start(ticket, start_offset)
        self._admitted = not ticket.cancelled
        self._acquired = []
        self._retries = []
        self._cancelled = ""

    def cancelled_while_running(self, nodeid: str, reason: str) -> None:
        super().cancelled_while_running(nodeid, reason)
        self._cancelled = reason  # sent on the teardown report

    def acquired(self, nodeid: str, acquisition: list[int | None]) -> None:
        self._acquired.append(acquisition)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # Before xdist's own implementation, which sends the report with these attributes.
        if report.when == "setup":
            if self._start is not None:
                setattr(report, REPORT_ATTRIBUTE, self._start)
                self._start = None  # once: pytest-rerunfailures sets up again for a rerun
        elif report.when == "teardown" and self._admitted:
            finish = [MONOTONIC.now_ns() - self.start_ns, self._acquired, self._retries]
            if self._cancelled:
                finish.append(self._cancelled)
            setattr(report, REPORT_ATTRIBUTE, finish)
