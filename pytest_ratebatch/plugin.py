"""The pytest glue: options, roles, pacing each test's start, reporting.

Without any policy (and no report asked for) only ``pytest_addoption`` and
``pytest_configure`` run. Otherwise ``pytest_configure`` registers the parts this process
needs: a ``Pacer`` where tests run (a plain session, or a pytest-xdist worker) and a
``Reporter`` where outcomes are reported (a plain session, or the xdist controller).
Under xdist the controller creates the session's shared directory and hands it to the
workers through ``workerinput`` (see ``distributed``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import pytest

from .clock import MONOTONIC
from .distributed import SessionDirectory, SharedSession, is_distributing, worker_session
from .ledger import Ledger, MemoryLedger
from .limiter import RateLimiter
from .policy import (
    COMMAND_LINE,
    OPTIONS,
    ExecutionPolicy,
    PolicyError,
    RawValue,
    build_policy,
    format_duration,
    parse_cost,
    parse_value,
)
from .redis_store import DEFAULT_KEY, RedisBucketStore
from .report import (
    CANCELLED_PREFIX,
    TestRecord,
    describe_summary,
    merge_outcome,
    summarize,
    write_report,
)
from .scheduler import TaskScheduler, Ticket
from .stores import BucketStore, MemoryBucketStore, StoreError

if TYPE_CHECKING:
    from _pytest.terminal import TerminalReporter

__all__ = ["Pacer", "RateBatch", "Reporter", "TerminalGuard", "WorkerPacer", "ratebatch"]

#: Waits shorter than this are not announced on the terminal.
ANNOUNCE_WAITS_FROM = 1.0
REPORT_OPTION = "ratebatch_report"
STORE_OPTION = "ratebatch_store"
KEY_OPTION = "ratebatch_key"
#: The attribute of a TestReport that carries a test's ticket from a worker to the controller.
REPORT_ATTRIBUTE = "ratebatch"


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


class Settings(NamedTuple):
    policy: ExecutionPolicy
    report_path: Path | None
    store: RawValue | None  # as written; None: the default for this kind of session
    key: str


def load_settings(config: pytest.Config) -> Settings:
    """The validated settings, or ``pytest.UsageError`` naming the bad value."""
    raw = read_raw_options(config)
    extra = {
        name: raw.pop(name) for name in (REPORT_OPTION, STORE_OPTION, KEY_OPTION) if name in raw
    }
    try:
        policy = build_policy(raw)
        values = {name: parse_value(name, value) for name, value in extra.items()}
    except PolicyError as error:
        raise pytest.UsageError(str(error)) from None
    report_path = None
    if REPORT_OPTION in values:
        from_cli = extra[REPORT_OPTION].source == COMMAND_LINE
        base = config.invocation_params.dir if from_cli else config.rootpath
        report_path = base / Path(values[REPORT_OPTION]).expanduser()
    return Settings(
        policy, report_path, extra.get(STORE_OPTION), values.get(KEY_OPTION, DEFAULT_KEY)
    )


def open_store(
    config: pytest.Config, settings: Settings, shared: SessionDirectory | None
) -> BucketStore:
    """The bucket the settings name; a ``pytest.UsageError`` if it cannot be used."""
    raw = settings.store
    choice = raw.text.strip() if raw is not None else ("file" if shared is not None else "memory")
    if choice == "memory":
        if shared is not None:
            assert raw is not None
            raise pytest.UsageError(
                f"ratebatch: {raw.describe(STORE_OPTION)}: the memory store cannot be shared by "
                "pytest-xdist workers; use file (the default under xdist) or redis://"
            )
        return MemoryBucketStore()
    if choice == "file":
        if shared is None:
            shared = SharedSession.create()  # a file store for this process alone
            config.add_cleanup(shared.close)
        return shared.bucket()
    try:
        store = RedisBucketStore(choice, settings.key)
        config.add_cleanup(store.close)
        if shared is None or isinstance(shared, SharedSession):
            store.check()  # once per session, before any test: the workers trust it
    except StoreError as error:
        raise pytest.UsageError(f"ratebatch: the store cannot be used: {error}") from None
    return store


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "ratebatch(cost=1): tokens this test takes at its start; cost=0 exempts it from the "
        "rate and from batches (pytest-ratebatch).",
    )
    if config.option.help or config.option.version:
        return
    settings = load_settings(config)
    policy = settings.policy
    if not policy.is_active and settings.report_path is None:
        return
    worker = worker_session(config)
    if worker is not None:
        store = open_store(config, settings, worker)
        scheduler = _scheduler(policy, store, worker.ledger(), worker.start_ns, worker.announce)
        pacer: Pacer = WorkerPacer(scheduler, worker.start_ns)
        config.stash[PACER_KEY] = pacer
        config.pluginmanager.register(pacer, "ratebatch-pacer")
        return
    shared = SharedSession.create() if is_distributing(config) else None
    if shared is not None:
        config.add_cleanup(shared.close)
        config.pluginmanager.register(TerminalGuard(shared.output_lock), "ratebatch-guard")
    store = open_store(config, settings, shared)
    ledger: Ledger = shared.ledger() if shared is not None else MemoryLedger()
    start_ns = shared.start_ns if shared is not None else MONOTONIC.now_ns()
    reporter = Reporter(config, policy, settings.report_path, shared, store, ledger, start_ns)
    config.pluginmanager.register(reporter, "ratebatch-reporter")
    if shared is None:
        scheduler = _scheduler(policy, store, ledger, start_ns, reporter.announce_wait)
        pacer = Pacer(scheduler, start_ns, reporter)
        config.stash[PACER_KEY] = pacer
        config.pluginmanager.register(pacer, "ratebatch-pacer")


def _scheduler(
    policy: ExecutionPolicy,
    store: BucketStore,
    ledger: Ledger,
    start_ns: int,
    on_wait: Callable[[str, float], None],
) -> TaskScheduler:
    limiter = RateLimiter(policy.rate_limit, store) if policy.rate_limit is not None else None
    return TaskScheduler(
        policy, limiter=limiter, ledger=ledger, session_start_ns=start_ns, on_wait=on_wait
    )


def ticket_data(ticket: Ticket, start_offset: int) -> dict[str, Any]:
    return {
        "batch": ticket.batch,
        "tokens": ticket.tokens,
        "start_ns": start_offset if not ticket.cancelled else None,
        "store_ns": ticket.store_ns,
        "waited_ns": ticket.waited_ns,
        "cancelled": ticket.cancelled,
        "acquired": [],
    }


PACER_KEY = pytest.StashKey["Pacer"]()


class RateBatch:
    """What the ``ratebatch`` fixture gives a test: tokens from the session's own bucket."""

    def __init__(self, pacer: Pacer | None, nodeid: str) -> None:
        self._pacer = pacer
        self._nodeid = nodeid

    @property
    def active(self) -> bool:
        """Whether a policy is in force (else ``acquire`` returns at once)."""
        return self._pacer is not None

    def acquire(self, cost: int = 1) -> None:
        """Take ``cost`` tokens from the bucket the session's tests start from, waiting as
        long as the rate requires; a cost above the burst is taken a burst at a time.

        If the session has stopped (max failures, total timeout, store lost) the test is
        skipped as cancelled instead, like the tests that did not start.
        """
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
            raise ValueError(f"cost must be a whole number >= 0, not {cost!r}")
        if self._pacer is not None and cost:
            self._pacer.acquire(self._nodeid, cost)


@pytest.fixture
def ratebatch(request: pytest.FixtureRequest) -> RateBatch:
    """Take tokens inside a test, from the same bucket as the session (``acquire(cost=1)``)."""
    return RateBatch(request.config.stash.get(PACER_KEY, None), request.node.nodeid)


class Pacer:
    """Where tests run: admit each test at its start, or cancel it."""

    def __init__(
        self, scheduler: TaskScheduler, start_ns: int, reporter: Reporter | None = None
    ) -> None:
        self.scheduler = scheduler
        self.start_ns = start_ns
        self.reporter = reporter  # in the same process (no xdist), else None
        rate = scheduler.policy.rate_limit
        self._burst = rate.burst if rate is not None else None
        self._costs: dict[str, int] = {}  # tests whose cost is not 1
        self._batch_costs: dict[str, int] = {}  # the cost of the batch a test would open

    @pytest.hookimpl(wrapper=True)
    def pytest_pycollect_makeitem(
        self, collector: pytest.Collector, name: str, obj: object
    ) -> Generator[None, Any, Any]:
        # A bad marker is a collection error that names the test, before anything runs.
        result = yield
        items = result if isinstance(result, list) else [result]
        for item in items:
            if not isinstance(item, pytest.Item):
                continue
            mark = item.get_closest_marker("ratebatch")
            if mark is None:
                continue
            try:
                cost = parse_cost(mark.args, mark.kwargs, self._burst)
            except ValueError as error:
                raise collector.CollectError(
                    f"ratebatch: {item.nodeid}: @pytest.mark.ratebatch: {error}"
                ) from None
            if cost != 1:
                self._costs[item.nodeid] = cost
        return result

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        batch_size = self.scheduler.policy.batch_size
        if batch_size is None or not self._costs or self.reporter is None:
            return
        # In one process the run order is known: a batch's cost is that of the next
        # batch_size tests that take tokens (exempt tests join no batch).
        costs = [self._costs.get(item.nodeid, 1) for item in items]
        paced = [index for index, cost in enumerate(costs) if cost]
        running = [0]
        for index in paced:
            running.append(running[-1] + costs[index])
        first = 0  # the first paced test at or after the current one
        for index, item in enumerate(items):
            while first < len(paced) and paced[first] < index:
                first += 1
            last = min(first + batch_size, len(paced))
            self._batch_costs[item.nodeid] = running[last] - running[first]

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, object, object]:
        # Outermost wrapper: waits happen before the test's own timers (pytest-timeout) start.
        nodeid = item.nodeid
        ticket = self.scheduler.admit(self._costs.get(nodeid, 1), self._batch_costs.get(nodeid))
        if ticket.cancelled:
            item.add_marker(pytest.mark.skip(reason=f"{CANCELLED_PREFIX} ({ticket.cancelled})"))
        self.started(nodeid, ticket)
        try:
            return (yield)
        finally:
            if not ticket.cancelled:
                failed = self.finished(nodeid, MONOTONIC.now_ns() - self.start_ns)
                self.scheduler.finish(ticket, failed)

    def started(self, nodeid: str, ticket: Ticket) -> None:
        assert self.reporter is not None
        self.reporter.started(nodeid, ticket, ticket.start_ns - self.start_ns)

    def finished(self, nodeid: str, finish_offset: int) -> bool:
        """Note the end of a test; whether it failed or errored."""
        assert self.reporter is not None
        return self.reporter.finished(nodeid, finish_offset)

    def acquire(self, nodeid: str, cost: int) -> None:
        """Tokens taken inside a running test (the ``ratebatch`` fixture), a burst at a time."""
        burst = self._burst or cost
        while cost > 0:
            chunk = min(cost, burst)
            taken = self.scheduler.acquire(chunk)
            if taken.cancelled:
                pytest.skip(f"{CANCELLED_PREFIX} ({taken.cancelled})")
            self.acquired(nodeid, [taken.start_ns - self.start_ns, chunk, taken.store_ns])
            cost -= chunk

    def acquired(self, nodeid: str, acquisition: list[int | None]) -> None:
        assert self.reporter is not None
        self.reporter.acquired(nodeid, acquisition)


class WorkerPacer(Pacer):
    """A pytest-xdist worker's pacer: tickets travel to the controller on the test's reports."""

    def __init__(self, scheduler: TaskScheduler, start_ns: int) -> None:
        super().__init__(scheduler, start_ns)
        self._tickets: dict[str, dict[str, Any]] = {}

    def started(self, nodeid: str, ticket: Ticket) -> None:
        self._tickets[nodeid] = ticket_data(ticket, ticket.start_ns - self.start_ns)

    def finished(self, nodeid: str, finish_offset: int) -> bool:
        return bool(self._tickets.pop(nodeid, {}).get("failed"))

    def acquired(self, nodeid: str, acquisition: list[int | None]) -> None:
        data = self._tickets.get(nodeid)
        if data is not None:
            data["acquired"].append(acquisition)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        data = self._tickets.get(item.nodeid)
        if data is not None:
            if report.failed:
                data["failed"] = True
            if call.when == "teardown" and data["start_ns"] is not None:
                data["finish_ns"] = MONOTONIC.now_ns() - self.start_ns
            setattr(report, REPORT_ATTRIBUTE, {**data, "acquired": list(data["acquired"])})
        return report


class TerminalGuard:
    """xdist controller: the hooks that print hold the lock the announcer thread prints under."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_logstart(self) -> Generator[None, object, object]:
        with self.lock:
            return (yield)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_logreport(self) -> Generator[None, object, object]:
        with self.lock:
            return (yield)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_logfinish(self) -> Generator[None, object, object]:
        with self.lock:
            return (yield)


class Reporter:
    """Where outcomes are reported: records, header, waits, summary, JSON, exit status."""

    def __init__(
        self,
        config: pytest.Config,
        policy: ExecutionPolicy,
        report_path: Path | None,
        shared: SharedSession | None,
        store: BucketStore,
        ledger: Ledger,
        start_ns: int,
    ) -> None:
        self.config = config
        self.policy = policy
        self.report_path = report_path
        self.shared = shared
        self.store = store
        self.ledger = ledger
        self.start_ns = start_ns
        self.start_wall = time.time() - (MONOTONIC.now_ns() - start_ns) / 1e9
        self.records: dict[str, TestRecord] = {}
        self.interrupted = False
        self._terminal: TerminalReporter | None = None

    def _record(self, nodeid: str) -> TestRecord:
        record = self.records.get(nodeid)
        if record is None:
            record = self.records[nodeid] = TestRecord(nodeid)
        return record

    # --- the session -----------------------------------------------------------------

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self._terminal = self.config.pluginmanager.get_plugin("terminalreporter")
        if self.shared is not None:
            self.shared.start_announcer(self._write_announcement)

    def pytest_report_header(self, config: pytest.Config) -> str:
        return f"ratebatch: {self.policy.describe()}; store: {self.store.describe()}"

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """xdist hook (controller): hand the shared session to each worker."""
        assert self.shared is not None
        node.workerinput.update(self.shared.workerinput())

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        # Every collected test gets a record, so the report accounts for tests never reached.
        for item in items:
            self.records.setdefault(item.nodeid, TestRecord(item.nodeid, outcome="not run"))

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        for nodeid in ids:
            self.records.setdefault(nodeid, TestRecord(nodeid, outcome="not run"))

    # --- each test ---------------------------------------------------------------------

    def started(self, nodeid: str, ticket: Ticket, start_offset: int) -> None:
        """A test was admitted or cancelled in this process."""
        record = self._record(nodeid)
        record.outcome = ""
        record.waited_ns = ticket.waited_ns
        if ticket.cancelled:
            record.reason = f"{CANCELLED_PREFIX} ({ticket.cancelled})"
        else:
            record.batch = ticket.batch
            record.tokens = ticket.tokens
            record.start_ns = start_offset
            record.store_ns = ticket.store_ns

    def finished(self, nodeid: str, finish_offset: int) -> bool:
        """A test of this process finished: note when, and say whether it failed."""
        record = self._record(nodeid)
        record.finish_ns = finish_offset
        return record.failed

    def acquired(self, nodeid: str, acquisition: list[int | None]) -> None:
        """A test of this process took tokens while running."""
        self._record(nodeid).acquired.append(acquisition)

    def _apply(self, record: TestRecord, data: dict[str, Any]) -> None:
        """A worker's ticket, as it travelled on a report."""
        record.waited_ns = data["waited_ns"]
        if data["cancelled"]:
            record.reason = f"{CANCELLED_PREFIX} ({data['cancelled']})"
        else:
            record.batch = data["batch"]
            record.tokens = data["tokens"]
            record.start_ns = data["start_ns"]
            record.store_ns = data["store_ns"]
        if data.get("finish_ns") is not None:
            record.finish_ns = data["finish_ns"]
        if data["acquired"]:
            record.acquired = data["acquired"]

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = getattr(report, REPORT_ATTRIBUTE, None)
        if data is None and report.passed and report.when != "call":
            return  # a set-up or teardown that passed changes no outcome: keep this path short
        record = self._record(report.nodeid)
        if data is not None:  # from a worker
            if record.outcome == "not run":
                record.outcome = ""
            self._apply(record, data)
        worker = getattr(report, "node", None)
        if worker is not None:
            record.worker = str(getattr(getattr(worker, "gateway", None), "id", ""))
        if report.failed and report.when not in ("setup", "call", "teardown"):
            # xdist's report for a test whose worker crashed: it counts as a failure.
            self.ledger.finish(0, failed=True, now=MONOTONIC.now_ns())
        if record.reason and report.skipped:
            record.outcome = "cancelled"
            return
        record.outcome = merge_outcome(
            record.outcome if record.outcome != "not run" else "",
            report.when,
            report.outcome,
            hasattr(report, "wasxfail"),
        )

    def announce_wait(self, what: str, seconds: float) -> None:
        if seconds >= ANNOUNCE_WAITS_FROM:
            self._write_announcement(f"waiting {format_duration(round(seconds, 1))} for {what}")

    def _write_announcement(self, text: str) -> None:
        terminal = self._terminal
        if terminal is None:
            return
        terminal.ensure_newline()
        writer = getattr(terminal, "_tw", None)
        if getattr(writer, "width_of_current_line", 0):
            terminal.write("\n")  # xdist prints progress letters without tracking the line
        terminal.write_line(f"ratebatch: {text}")

    # --- the end -----------------------------------------------------------------------

    def pytest_keyboard_interrupt(self) -> None:
        self.interrupted = True

    @property
    def stop_reason(self) -> str:
        return "interrupted" if self.interrupted else self.ledger.snapshot().stop_reason

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.shared is not None:
            self.shared.stop_announcer()
        cancelled = any(record.outcome == "cancelled" for record in self.records.values())
        if cancelled and session.exitstatus == pytest.ExitCode.OK:
            # Tests that never ran are not a success, even if nothing failed.
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if self.report_path is not None:
            write_report(
                self.report_path,
                self.policy,
                list(self.records.values()),
                stop_reason=self.stop_reason,
                store=self.store.describe(),
                session_wall=self.start_wall,
                duration_ns=MONOTONIC.now_ns() - self.start_ns,
            )

    def pytest_terminal_summary(self, terminalreporter: TerminalReporter) -> None:
        terminalreporter.section("ratebatch")
        summary = summarize(self.records.values())
        for line in describe_summary(self.policy, summary, self.stop_reason):
            terminalreporter.line(line)
        if self.report_path is not None:
            terminalreporter.line(f"report: {self.report_path}")
