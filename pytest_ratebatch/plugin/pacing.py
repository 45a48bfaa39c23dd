"""Where tests run (a plain session, or an xdist worker): each test is admitted at its start.

The workers' own pacers live in ``xdist``, loaded only under pytest-xdist."""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pytest

from ..engine.scheduler import TaskScheduler, Ticket
from ..limits.clock import MONOTONIC
from ..limits.policy import parse_cost, parse_priority
from ..views.report import CANCELLED_PREFIX, Tally
from .registry import register_hooks

if TYPE_CHECKING:
    from ..stores.base import ResourcePool
    from ..throttle.retrying import Throttles
    from .reporter import Reporter

__all__ = [
    "MARKER",
    "Pacer",
    "ProtocolPacing",
    "SessionPacer",
    "StartLineOpener",
    "by_priority",
    "read_markers",
]

MARKER = "ratebatch"


#: What ``read_markers`` finds: costs, priorities, resources (by node id), bad markers.
Markers = tuple[dict[str, int], dict[str, int], dict[str, dict[str, float]], list[tuple[str, str]]]


def read_markers(
    items: Sequence[pytest.Item],
    largest: tuple[int, str] | None,
    capacity: Mapping[str, float] | None = None,
) -> Markers:
    """Each test's cost from its closest ``ratebatch`` marker, as pytest resolves it, and its
    priority from the closest marker that states one (a class's ``priority`` holds for a
    method whose own marker states only a cost).

    ``largest`` is the most one start may cost and the limit that says so (``None``: any).

    With ``capacity`` (``--resources``), the resources each test declares (closest marker
    that states them), which must fit in it; without, they are not read.

    Returns the costs that are not 1, the priorities that are not 0 and the resources
    declared, by node id, and ``(nodeid, problem)`` for each bad marker. Read from the final
    items, so markers that conftest hooks add and those of any item type (unittest, doctest,
    plugins' items) count. A parent's closest marker is looked up once, not once per test.
    """
    costs: dict[str, int] = {}
    priorities: dict[str, int] = {}
    resources: dict[str, dict[str, float]] = {}
    errors: list[tuple[str, str]] = []
    closest_above: dict[pytest.Collector | None, Any] = {None: None}
    most, bound = largest if largest is not None else (None, "")
    for item in items:
        mark = None
        for own in item.own_markers:
            if own.name == MARKER:
                mark = own
                break
        if mark is None:
            parent = item.parent
            if parent in closest_above:
                mark = closest_above[parent]
            else:
                assert isinstance(parent, pytest.Collector)
                mark = closest_above[parent] = parent.get_closest_marker(MARKER)
            if mark is None:
                continue
        try:
            cost = parse_cost(mark.args, mark.kwargs, most, bound)
            priority = _stated(item, mark, "priority")
            if priority is not None:
                priority = parse_priority(priority)
            request = None
            if capacity:
                stated = _stated(item, mark, "resources")
                if stated is not None:
                    request = _resources(stated, capacity)
        except ValueError as error:
            errors.append((item.nodeid, f"@pytest.mark.ratebatch: {error}"))
            continue
        if cost != 1:
            costs[item.nodeid] = cost
        if priority:
            priorities[item.nodeid] = priority
        if request:
            resources[item.nodeid] = request
    return costs, priorities, resources, errors


def _resources(value: object, capacity: Mapping[str, float]) -> dict[str, float]:
    from ..limits.resources import check_request, parse_request

    request = parse_request(value)
    problem = check_request(request, capacity)
    if problem:
        raise ValueError(problem)
    return request


def _stated(item: pytest.Item, closest: Any, keyword: str) -> object:
    """The value of ``keyword`` in the closest ``ratebatch`` marker that states it."""
    if keyword in closest.kwargs:
        return closest.kwargs[keyword]
    for mark in item.iter_markers(MARKER):
        if keyword in mark.kwargs:
            return mark.kwargs[keyword]
    return None


def by_priority(items: list[pytest.Item], priorities: dict[str, int]) -> None:
    """Reorder ``items`` in place: higher priorities first, and within a priority the order
    they had (pytest's, and the reorderings of plugins before this one)."""
    if priorities:
        items.sort(key=lambda item: -priorities.get(item.nodeid, 0))


def batch_costs(
    items: Sequence[pytest.Item], costs: dict[str, int], batch_size: int
) -> dict[str, int]:
    """In one process the run order is known: the cost of the batch each test would open is
    that of the next ``batch_size`` tests that take tokens (exempt tests join no batch)."""
    ordered = [costs.get(item.nodeid, 1) for item in items]
    paced = [index for index, cost in enumerate(ordered) if cost]
    running = [0]
    for index in paced:
        running.append(running[-1] + ordered[index])
    result: dict[str, int] = {}
    first = 0  # the first paced test at or after the current one
    for index, item in enumerate(items):
        while first < len(paced) and paced[first] < index:
            first += 1
        last = min(first + batch_size, len(paced))
        result[item.nodeid] = running[last] - running[first]
    return result


class StartLineOpener:
    """Opens the start line (``engine.scheduler``) where other processes take tokens from the
    bucket too. The starts of a session stand in it when it states priorities, or ``always``
    where sessions that do may share the bucket (a Redis key): a start of theirs must not find
    the tokens it waits for reserved ahead by one of this session."""

    __slots__ = ("always", "open")

    def __init__(self, open_line: Callable[[], ResourcePool], always: bool) -> None:
        self.open = open_line
        self.always = always


class Pacer:
    """Where tests run: admit each test at its start, or cancel it."""

    def __init__(
        self,
        scheduler: TaskScheduler,
        start_ns: int,
        tally: Tally,
        reporter: Reporter | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.start_ns = start_ns
        self.reporter = reporter  # in the same process (no xdist), else None
        #: The most one start may cost, and the limit that says so (``None``: no bound).
        self._largest = scheduler.policy.largest_cost
        self._costs: dict[str, int] = {}  # tests whose cost is not 1
        self._batch_costs: dict[str, int] = {}  # the cost of the batch a test would open
        self._priorities: dict[str, int] = {}  # tests whose priority is not 0
        self._resources: dict[str, dict[str, float]] = {}  # tests that declare resources
        #: The gates a start passes (``engine.gates``), told each test's request.
        self._gates = scheduler.gates
        self._tally = tally
        scheduler.waited_by_limit = tally.waited_by_limit  # the scheduler accounts its waits
        self._keeps_records = reporter is not None and reporter.records is not None
        #: Throttle handling, where tests run (``throttle.retrying``); ``None`` if off.
        self.throttles: Throttles | None = None
        #: A retry runs: its admission was made by the call that runs it.
        self.retrying = False
        self._direct = scheduler.direct  # unbatched and uncapped: tokens only
        self._by_nodeid = self._keeps_records  # whether a test's node id is needed
        # Whether a start only counts in the tally (no record, no subclass's own account).
        self._plain_starts = not self._keeps_records and type(self).started is Pacer.started
        self._cancelled_running = ""  # the running test a stop cancelled, if any
        self._rerun_counted = ""  # the last test pytest-rerunfailures ran again after a throttle
        #: Opens the start line, where other processes share the bucket (``None``: none do).
        self.start_line: StartLineOpener | None = None
        self._ranked = False  # starts stand in the start line by their priorities

    # tryfirst and registered after pytest's cacheprovider: the outermost wrapper, so the
    # priorities order what --ff, --nf, pytest-randomly and pytest-order ordered.
    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_collection_modifyitems(
        self, session: pytest.Session, items: list[pytest.Item]
    ) -> Generator[None, None, None]:
        yield  # every other plugin's and conftest's hook first: the items are final after
        capacity = dict(self.scheduler.policy.resources)
        self._costs, priorities, resources, errors = read_markers(items, self._largest, capacity)
        self._resources = resources
        by_priority(items, priorities)
        self._priorities = priorities
        if self.reporter is not None:
            self.reporter.collected(items, priorities, resources)
        if errors:
            self._refuse(session, errors)
        else:
            line = self.start_line
            if line is not None and (priorities or line.always):
                self._rank_starts(line.open, ranked=bool(priorities))
            self.plan(items)
        self._by_nodeid = (
            bool(self._costs) or self._keeps_records or self._gates is not None or self._ranked
        )
        batch_size = self.scheduler.policy.batch_size
        if batch_size is not None and self._costs and self.reporter is not None:
            self._batch_costs = batch_costs(items, self._costs, batch_size)

    def _rank_starts(self, open_line: Callable[[], ResourcePool], ranked: bool) -> None:
        """Starts of this process that must wait for tokens wait in the line shared with the
        other processes, by priority (``engine.scheduler``); ``ranked``: priorities stated
        here (else all of its starts stand in it at priority 0)."""
        self.scheduler.open_start_line = open_line
        self._ranked = ranked
        self._direct = False  # a start goes through ``admit``, which knows the line

    def plan(self, items: list[pytest.Item]) -> None:
        """Hand the run's costs to the forecast (where outcomes are reported)."""
        if self.reporter is not None and self.reporter.wants_forecast:
            costs = self._costs
            priorities = self._priorities
            self.reporter.plan(
                [costs.get(item.nodeid, 1) for item in items] if costs else [1] * len(items),
                priorities=[priorities.get(item.nodeid, 0) for item in items]
                if priorities
                else None,
            )

    def _refuse(self, session: pytest.Session, errors: list[tuple[str, str]]) -> None:
        """A bad marker stops the session before any test runs: a collection error naming
        the test (pytest then runs nothing) and a stop (for xdist, which runs on)."""
        for nodeid, problem in errors:
            report = pytest.CollectReport(nodeid, "failed", f"ratebatch: {nodeid}: {problem}", [])
            session.ihook.pytest_collectreport(report=report)
        first, problem = errors[0]
        self.scheduler.ledger.stop(f"bad marker on {first}: {problem}")

    def start(self, item: pytest.Item) -> Ticket:
        """Admit ``item``, waiting as the limits require, and account its start; a cancelled
        test is marked skipped (its protocol then reports it so)."""
        nodeid = item.nodeid if self._by_nodeid else ""
        if self._gates is not None:
            self._gates.request = (
                self._resources.get(nodeid, {}),
                self._priorities.get(nodeid, 0),
            )
        if self._ranked:
            self.scheduler.priority = self._priorities.get(nodeid, 0)
        costs = self._costs
        if not costs:
            ticket = self.scheduler.acquire(1) if self._direct else self.scheduler.admit()
        else:
            ticket = self.scheduler.admit(costs.get(nodeid, 1), self._batch_costs.get(nodeid))
        if self._plain_starts and not ticket.cancelled:  # ``started``, one call less
            start = ticket.start_ns - self.start_ns
            self._tally.admitted(ticket.batch, ticket.tokens, start, ticket.waited_ns)
        else:
            self.started(nodeid, ticket)
        if ticket.cancelled:
            item.add_marker(pytest.mark.skip(reason=f"{CANCELLED_PREFIX} ({ticket.cancelled})"))
        return ticket

    def run(self, item: pytest.Item, nextitem: pytest.Item | None, protocol: Any) -> None:
        """One test's turn in the session's loop: its admission, then its protocol (the
        pytest hook ``protocol``), then its finish; run again while a throttle asks."""
        ticket = self.start(item)
        if ticket.cancelled:
            protocol(item=item, nextitem=nextitem)
            return
        # pytest counts the reports that failed; pytest-rerunfailures relabels an attempt it
        # reruns "rerun" first, so only final outcomes count.
        session = item.session
        failed_before = session.testsfailed
        try:
            protocol(item=item, nextitem=nextitem)
        finally:  # ``finish``, written out: a call less for every test
            if self._keeps_records:
                self.finished(item.nodeid)
            self.scheduler.finish(ticket, session.testsfailed > failed_before)
        throttles = self.throttles
        if throttles is not None and throttles.held is not None:
            self.retry(item, nextitem, throttles, failed_before)

    def retry(
        self,
        item: pytest.Item,
        nextitem: pytest.Item | None,
        throttles: Throttles,
        failed_before: int,
    ) -> object:
        """Run a throttled test again, admitted like any start: after the server's pause,
        taking tokens; as often as ``throttle_retries`` allows (``Throttles`` decides).
        Returns the last protocol's result."""
        nodeid = item.nodeid
        cost = self._costs.get(nodeid, 1)
        batch_cost = self._batch_costs.get(nodeid)
        session = item.session
        result: object = True
        ran_again = False
        while throttles.held is not None:
            ticket = self.scheduler.admit(cost, batch_cost)
            self.started(nodeid, ticket, retry=True)
            if ticket.cancelled:
                # The session stopped before the test could run again: a cancelled test.
                self.cancelled_while_running(nodeid, ticket.cancelled)
                throttles.give_up(item, f"{CANCELLED_PREFIX} ({ticket.cancelled})")
                break
            ran_again = True
            throttles.held = None  # this attempt's reports are dropped: it runs again
            attempt_failed = session.testsfailed
            self.retrying = True
            try:
                result = item.ihook.pytest_runtest_protocol(item=item, nextitem=nextitem)
            finally:
                self.retrying = False
                self.finish(item, ticket, attempt_failed)
        if ran_again:
            self._tally.retried += 1
            if session.testsfailed > failed_before:
                self._tally.retried_failed += 1
        return result

    def admit_rerun(self, item: pytest.Item) -> bool:
        """pytest-rerunfailures runs a throttled test again: that rerun is the test's retry,
        admitted like one (after the server's pause, taking the test's tokens; it keeps its
        batch and its slot). ``False`` if the session stopped: the rerun is cancelled."""
        nodeid = item.nodeid
        ticket = self.scheduler.acquire(self._costs.get(nodeid, 1))
        self.started(nodeid, ticket, retry=True)
        if ticket.cancelled:
            self.cancelled_while_running(nodeid, ticket.cancelled)
            item.add_marker(pytest.mark.skip(reason=f"{CANCELLED_PREFIX} ({ticket.cancelled})"))
            return False
        if nodeid != self._rerun_counted:  # once per test, however often it runs again
            self._rerun_counted = nodeid
            self._tally.retried += 1
        return True

    def rerun_failed(self) -> None:
        self._tally.retried_failed += 1

    def finish(self, item: pytest.Item, ticket: Ticket, failed_before: int) -> None:
        """An admitted test's protocol ended: it failed if pytest counted a failure since."""
        if self._keeps_records:
            self.finished(item.nodeid)
        self.scheduler.finish(ticket, item.session.testsfailed > failed_before)

    def started(self, nodeid: str, ticket: Ticket, retry: bool = False) -> None:
        tally = self._tally
        start_offset = ticket.start_ns - self.start_ns
        if ticket.cancelled:
            if not retry:
                tally.cancel(ticket.waited_ns)
        else:
            tally.admitted(ticket.batch, ticket.tokens, start_offset, ticket.waited_ns, retry)
        if self._keeps_records:
            assert self.reporter is not None
            self.reporter.started(nodeid, ticket, start_offset, retry)

    def finished(self, nodeid: str) -> None:
        assert self.reporter is not None
        self.reporter.finished(nodeid, MONOTONIC.now_ns() - self.start_ns)

    def cancelled_while_running(self, nodeid: str, reason: str) -> None:
        """A test admitted earlier that the session's stop caught before it could go on (its
        in-test tokens, its retry after a throttle): it counts as cancelled, not as run."""
        if nodeid == self._cancelled_running:
            return  # counted already (a test that went on asking for tokens)
        self._cancelled_running = nodeid
        self._tally.run -= 1
        self._tally.cancelled += 1
        if self._keeps_records:
            assert self.reporter is not None
            self.reporter.cancelled(nodeid, reason)

    def acquire(self, nodeid: str, cost: int) -> None:
        """Tokens taken inside a running test (the ``ratebatch`` fixture), at most what one
        start may take (the burst, or the smallest window) at a time. If the session stopped
        the test is cancelled: skipped as such, at its own location."""
        most = self._largest[0] if self._largest is not None else cost
        while cost > 0:
            chunk = min(cost, most)
            taken = self.scheduler.acquire(chunk)
            self._took(nodeid, taken, chunk)
            cost -= chunk

    async def acquire_async(self, nodeid: str, cost: int) -> None:
        """``acquire`` for a coroutine (``await ratebatch.acquire_async()``)."""
        most = self._largest[0] if self._largest is not None else cost
        while cost > 0:
            chunk = min(cost, most)
            taken = await self.scheduler.acquire_async(chunk)
            self._took(nodeid, taken, chunk)
            cost -= chunk

    def _took(self, nodeid: str, taken: Ticket, chunk: int) -> None:
        if taken.cancelled:
            self.cancelled_while_running(nodeid, taken.cancelled)
            raise pytest.skip.Exception(
                f"{CANCELLED_PREFIX} ({taken.cancelled})", _use_item_location=True
            )
        self.acquired(nodeid, [taken.start_ns - self.start_ns, chunk, taken.store_ns])

    def acquired(self, nodeid: str, acquisition: list[int | None]) -> None:
        assert self.reporter is not None
        self.reporter.acquired(nodeid, acquisition)

    def observe(self, nodeid: str, response: object) -> None:
        """A response a running test saw (the ``ratebatch`` fixture's ``observe``)."""
        if self.throttles is not None:
            self.throttles.observe(nodeid, response)


class SessionPacer(Pacer):
    """A plain session's pacer: it runs the session's loop, pytest's own with each test
    admitted before its protocol, so that waits come before every wrapper of the protocol
    (pytest-timeout's timer, pytest's warning capture) at no cost per test. If another
    plugin runs the loop, pacing falls back to a wrapper of the protocol."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool | None:
        config = session.config
        if config.option.collectonly or (
            session.testsfailed and not config.option.continue_on_collection_errors
        ):
            return None  # no test runs: pytest's own loop says why
        if another_test_loop(config, self):
            register_hooks(config.pluginmanager, "ratebatch-protocol", ProtocolPacing(self))
            return None
        # pytest's ``pytest_runtestloop`` (8.0 to 9.x), each test run through ``run``.
        protocol = config.hook.pytest_runtest_protocol
        items = session.items
        last = len(items) - 1
        for index, item in enumerate(items):
            self.run(item, items[index + 1] if index < last else None, protocol)
            if session.shouldfail:
                raise session.Failed(session.shouldfail)
            if session.shouldstop:
                raise session.Interrupted(session.shouldstop)
        return True


def another_test_loop(config: pytest.Config, ours: object) -> bool:
    """Whether a plugin other than pytest's ``main`` (and ``ours``, the object whose method
    implements the hook) runs the test loop."""
    main = config.pluginmanager.get_plugin("main")
    for impl in config.hook.pytest_runtestloop.get_hookimpls():
        if impl.wrapper or impl.hookwrapper or impl.plugin is main:
            continue
        if getattr(impl.function, "__self__", None) is not ours:  # a bound method of ours
            return True
    return False


class ProtocolPacing:
    """Pacing as the outermost wrapper of each test's protocol, where the session's loop is
    not this plugin's: a pytest-xdist worker's, or another plugin's."""

    def __init__(self, pacer: Pacer) -> None:
        self.pacer = pacer

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_protocol(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, object, object]:
        # Outermost wrapper: waits happen before the test's own timers (pytest-timeout) start.
        pacer = self.pacer
        if pacer.retrying:
            return (yield)
        ticket = pacer.start(item)
        if ticket.cancelled:
            return (yield)
        failed_before = item.session.testsfailed
        try:
            result = yield
        finally:
            pacer.finish(item, ticket, failed_before)
        throttles = pacer.throttles
        if throttles is not None and throttles.held is not None:
            result = pacer.retry(item, nextitem, throttles, failed_before)
        return result
