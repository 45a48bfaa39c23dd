"""Where tests run (a plain session, or an xdist worker): each test is admitted at its start.

Also the ``ratebatch`` fixture's object, for tokens taken inside a running test.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from .clock import MONOTONIC
from .policy import parse_cost
from .report import CANCELLED_PREFIX
from .reporting import REPORT_ATTRIBUTE, Reporter, ticket_start
from .scheduler import TaskScheduler, Ticket

__all__ = ["Pacer", "RateBatch", "WorkerPacer"]


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
    """A pytest-xdist worker's pacer: each test's ticket travels to the controller on its reports.

    The start rides on the set-up report (so a test whose worker dies later still shows when
    it started), the finish and in-test tokens on the teardown report; the call report
    carries nothing, which keeps the per-test traffic small.
    """

    def __init__(self, scheduler: TaskScheduler, start_ns: int) -> None:
        super().__init__(scheduler, start_ns)
        self._starts: dict[str, list[Any]] = {}
        self._acquired: dict[str, list[list[int | None]]] = {}
        self._failed: set[str] = set()

    def started(self, nodeid: str, ticket: Ticket) -> None:
        self._starts[nodeid] = ticket_start(ticket, ticket.start_ns - self.start_ns)
        self._acquired[nodeid] = []

    def finished(self, nodeid: str, finish_offset: int) -> bool:
        self._starts.pop(nodeid, None)
        self._acquired.pop(nodeid, None)
        failed = nodeid in self._failed
        self._failed.discard(nodeid)
        return failed

    def acquired(self, nodeid: str, acquisition: list[int | None]) -> None:
        acquisitions = self._acquired.get(nodeid)
        if acquisitions is not None:
            acquisitions.append(acquisition)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        nodeid = item.nodeid
        start = self._starts.get(nodeid)
        if start is None:
            return report
        if report.failed:
            self._failed.add(nodeid)
        if call.when == "setup":
            setattr(report, REPORT_ATTRIBUTE, start)
        elif call.when == "teardown":
            if start[1]:  # cancelled: no admission to finish, just forget it
                self.finished(nodeid, 0)
            else:
                finish = [MONOTONIC.now_ns() - self.start_ns, list(self._acquired[nodeid])]
                setattr(report, REPORT_ATTRIBUTE, finish)
        return report
