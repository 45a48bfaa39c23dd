"""Throttles handled, not failed: a throttled test pauses everyone sharing the bucket, and
runs again.

``Throttles`` runs each test's protocol itself, like pytest's own ``runtestprotocol``, logging
each phase's report at once, until a phase is throttled (``throttle.detect``, seen through
``pytest_exception_interact`` before the report is logged): that report and the rest are held
back, the bucket is paused for the server's wait (and its rate adapted), and the pacer admits
the test again (after the pause, taking tokens like any start) and runs it once more. Only
the last attempt's outcome is logged, so every test ends with one; one still throttled
after its retries fails with a message that says so.

Tests that pytest-rerunfailures reruns are run by it, and its reruns are the retries: a
throttle seen in one of its attempts pauses the bucket (and adapts the rate) at once, and the
rerun that follows is admitted like a retry, after the pause and taking the test's tokens, or
cancelled if the session stopped meanwhile (``_Reruns``). A server that asks to wait longer
than allowed fails the test without a rerun, as it does without pytest-rerunfailures.
"""

from __future__ import annotations

import importlib
import os
import time
from typing import TYPE_CHECKING, Any, Protocol

import pytest
from _pytest.runner import call_and_report, show_test_item

from ..engine.limiter import RateLimiter
from ..engine.scheduler import TaskScheduler
from ..limits.policy import NANOS_PER_SECOND, ThrottlePolicy, format_duration
from .backoff import BACKOFF_CAP, BACKOFF_FIRST, backoff

if TYPE_CHECKING:
    from .detect import Throttle

__all__ = ["BACKOFF_CAP", "BACKOFF_FIRST", "Retrier", "Throttles", "load_exception_types"]


def load_exception_types(names: tuple[str, ...]) -> tuple[type[BaseException], ...]:
    """The classes named ``module:Class``; ``ValueError`` naming the entry that fails."""
    types = []
    for name in names:
        module_name, _, attribute = name.partition(":")
        try:
            value: Any = importlib.import_module(module_name)
            for part in attribute.split("."):
                value = getattr(value, part)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"{name!r} cannot be loaded: {error}") from None
        if not (isinstance(value, type) and issubclass(value, BaseException)):
            raise ValueError(f"{name!r} is not an exception class")
        types.append(value)
    return tuple(types)


class Retrier(Protocol):
    """Who admits the retries that pytest-rerunfailures runs (the pacer)."""

    def admit_rerun(self, item: pytest.Item) -> bool:
        """Admit the rerun of a throttled ``item`` like a retry; ``False`` if the session
        stopped (the rerun is then cancelled: it does not start)."""
        ...

    def rerun_failed(self) -> None:
        """A test run again after a throttle failed in the end."""
        ...


class Throttles:
    """Where tests run: notices throttles, pauses the shared bucket, holds a throttled
    attempt's reports back for a retry, and keeps the events for the report."""

    def __init__(
        self,
        config: pytest.Config,
        policy: ThrottlePolicy,
        scheduler: TaskScheduler,
        limiter: RateLimiter,
        start_ns: int,
        extra: tuple[type[BaseException], ...],
        adapt: bool,
    ) -> None:
        self.policy = policy
        self.adapt = adapt  # the policy's wish, and a rate (or auto) to adapt
        self.scheduler = scheduler
        self.limiter = limiter
        self.start_ns = start_ns
        self.extra = extra
        #: The throttled attempt of the running test, waiting for its retry (reports, why).
        self.held: tuple[list[pytest.TestReport], Throttle] | None = None
        #: Everything that happened, for the JSON report and the summary.
        self.events: list[dict[str, Any]] = []
        self._seen: Throttle | None = None  # a throttle seen in the running attempt
        self._running: pytest.Item | None = None
        self._attempts: dict[str, int] = {}  # throttled attempts so far, per test
        # Read once, not for every test as pytest's own protocol does: they never change.
        self._setup_only = bool(config.getoption("setuponly", False))
        self._setup_show = bool(config.getoption("setupshow", False))
        self._config = config
        #: pytest-rerunfailures (its module), if it is in this session.
        self._rerunfailures: Any = config.pluginmanager.get_plugin("rerunfailures")
        #: Who admits the reruns it runs after a throttle (the pacer).
        self.retrier: Retrier | None = None
        self._rerun_item: pytest.Item | None = None  # the test it runs now
        #: The test whose throttled attempt it may rerun, and the throttle's event.
        self.rerun_due: tuple[str, dict[str, Any]] | None = None
        self._reruns: _Reruns | None = None  # its attempts' hooks, once a throttle needs them
        # Without a count for every test, only its marker makes it rerun one: looked up first.
        self._marked_only = self._rerunfailures is not None and not _global_reruns(config)

    # --- the protocol ---------------------------------------------------------------------

    def _reruns_of(self, item: pytest.Item) -> int:
        """How often pytest-rerunfailures reruns ``item`` (0: it leaves the test to us)."""
        if self._marked_only and item.get_closest_marker("flaky") is None:
            return 0
        count = getattr(self._rerunfailures, "get_reruns_count", None)
        if count is None:  # not the version this was written against: its marker at least
            mark = item.get_closest_marker("flaky")
            return 0 if mark is None else int(mark.kwargs.get("reruns", 1))
        reruns = count(item)
        return reruns if isinstance(reruns, int) else 0

    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> Any:
        if self._rerunfailures is not None and self._reruns_of(item) > 0:
            # pytest-rerunfailures runs this test, and its reruns are the retries.
            self._running = self._rerun_item = item
            self._seen = None
            return None
        ihook = item.ihook  # once: each lookup costs a path hash and a set difference
        nodeid = item.nodeid
        attempt = self._attempts.get(nodeid, 0)
        if not attempt:
            ihook.pytest_runtest_logstart(nodeid=nodeid, location=item.location)
        self._running = item
        self._seen = None
        try:
            held = self._run_phases(item, nextitem, ihook)
        finally:
            self._running = None
        seen = self._seen
        if seen is not None:
            retry, note = self._handle(nodeid, seen, attempt + 1)
            if retry:
                self._attempts[nodeid] = attempt + 1
                self.held = (held, seen)
                _forget_failed_fixtures(item)
                return True
            self._annotate(held, note)
        if attempt:
            del self._attempts[nodeid]
        for report in held:
            ihook.pytest_runtest_logreport(report=report)
        ihook.pytest_runtest_logfinish(nodeid=nodeid, location=item.location)
        return True

    def _run_phases(
        self, item: pytest.Item, nextitem: pytest.Item | None, ihook: Any
    ) -> list[pytest.TestReport]:
        """pytest's ``runtestprotocol`` (8.0 to 9.x), but each phase's report is logged at once
        only until a phase is throttled: that one and the rest are returned, held back.
        (Logging as it goes keeps a test's start on its set-up report, which reaches the
        xdist controller even if the worker dies in the test.)"""
        held: list[pytest.TestReport] = []
        log = ihook.pytest_runtest_logreport
        hasrequest = hasattr(item, "_request")
        if hasrequest and not item._request:  # type: ignore[attr-defined]
            item._initrequest()  # type: ignore[attr-defined]  # run again, as rerunfailures does
        # Each report is logged at once unless this attempt was throttled: then held back.
        # (Written out for each phase: a helper would cost a call per phase of every test.)
        try:
            report = call_and_report(item, "setup", log=False)
            if self._seen is None:
                log(report=report)
            else:
                held.append(report)
            if report.passed:
                if self._setup_show:
                    _show_test_item(item, add_space=not self._setup_only)
                if not self._setup_only:
                    report = call_and_report(item, "call", log=False)
                    if not held and self._seen is None:
                        log(report=report)
                    else:
                        held.append(report)
            if item.session.shouldfail or item.session.shouldstop:
                nextitem = None  # tear everything down (pytest #11706)
            report = call_and_report(item, "teardown", log=False, nextitem=nextitem)
            if not held and self._seen is None:
                log(report=report)
            else:
                held.append(report)
        finally:
            if hasrequest:
                item._request = False  # type: ignore[attr-defined]
                item.funcargs = None  # type: ignore[attr-defined]
        return held

    def pytest_exception_interact(
        self, node: pytest.Item, call: pytest.CallInfo[Any], report: pytest.TestReport
    ) -> None:
        # Called for each failed phase (set-up, call, teardown), before anything is logged.
        if node is not self._running or self._seen is not None or call.excinfo is None:
            return
        # Imported on the first failure: a session that never fails need not load it.
        from .detect import find_throttle

        seen = self._seen = find_throttle(call.excinfo.value, self.extra)
        if seen is not None and node is self._rerun_item:
            self._rerun_throttled(node, seen, report)

    def _rerun_throttled(
        self, item: pytest.Item, seen: Throttle, report: pytest.TestReport
    ) -> None:
        """A throttle in an attempt that pytest-rerunfailures runs: pause (and adapt) now;
        its rerun, if it comes, is the retry (``_Reruns`` admits it)."""
        nodeid = item.nodeid
        attempt = getattr(item, "execution_count", 1)  # its attempts so far, this one included
        wait, source = (seen.wait, seen.wait_source) if seen.wait is not None else (None, "")
        if wait is None:
            wait, source = backoff(attempt), "backoff"
        reason = self._too_long(wait, source)
        if reason:
            self.scheduler.ledger.stop(reason)
            self._record(nodeid, seen, wait, source, None, retried=False)
            self._annotate([report], self._refused(seen, reason))
            # Not to be rerun: pytest-rerunfailures does not rerun an attempt whose error it
            # counts as terminal (as with its --rerun-except). In a teardown it is too late
            # for that: the rerun is then cancelled, the session having stopped.
            terminal = getattr(item, "_terminal_errors", None)
            if report.when != "teardown" and isinstance(terminal, dict):
                terminal[report.when] = True
            return
        paused = self.pause(wait)
        event = self._record(nodeid, seen, wait, source, paused, retried=False)
        reruns = self._reruns_of(item)
        if attempt > reruns:  # its last attempt: pytest-rerunfailures gives up on it
            times = "once" if reruns == 1 else f"{reruns} times"
            self._annotate(
                [report],
                f"still throttled ({seen.describe()}) after running {attempt} times; "
                f"rerun {times} by pytest-rerunfailures",
            )
            return
        self.rerun_due = (nodeid, event)
        if self._reruns is None:
            self._reruns = _Reruns(self)
            self._config.pluginmanager.register(self._reruns, "ratebatch-reruns")

    def give_up(self, item: pytest.Item, skip_reason: str) -> None:
        """The held attempt will not run again: the session stopped first. A throttled
        attempt is no failure, so the test is cancelled: its failed reports become the skip
        of a cancelled test (``skip_reason``), at the test's location."""
        held, self.held = self.held, None
        if held is None:
            return
        reports, seen = held
        attempts = self._attempts.pop(item.nodeid, 0)
        note = f"throttled ({seen.describe()}) on attempt {attempts}, not run again"
        for event in reversed(self.events):  # its throttle, recorded as to be retried
            if event["test"] == item.nodeid and event["event"] == "throttle":
                event["retried"] = False
                break
        path, line = _location(item)
        for report in reports:
            if report.failed:
                report.outcome = "skipped"
                report.longrepr = (path, line, f"Skipped: {skip_reason}")
                report.sections.append(("ratebatch", note))
            item.ihook.pytest_runtest_logreport(report=report)
        item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)

    # --- a throttle -----------------------------------------------------------------------

    def _handle(self, nodeid: str, seen: Throttle, attempt: int) -> tuple[bool, str]:
        """Pause (and adapt) for a throttle of ``nodeid``'s attempt; whether to retry it,
        and what to say if not."""
        wait, source = (seen.wait, seen.wait_source) if seen.wait is not None else (None, "")
        if wait is None:
            wait, source = backoff(attempt), "backoff"
        reason = self._too_long(wait, source)
        if reason:
            self.scheduler.ledger.stop(reason)
            self._record(nodeid, seen, wait, source, None, retried=False)
            return False, self._refused(seen, reason)
        paused = self.pause(wait)
        retry = attempt <= self.policy.retries
        self._record(nodeid, seen, wait, source, paused, retried=retry)
        if retry:
            return True, ""
        retries = self.policy.retries
        times = "once" if retries == 1 else f"{retries} times"
        what = f"retried {times}" if retries else "not retried (throttle_retries = 0)"
        return False, f"still throttled ({seen.describe()}) after running {attempt} times; {what}"

    @staticmethod
    def _refused(seen: Throttle, reason: str) -> str:
        """Why a test fails whose server asked for a wait longer than allowed."""
        return (
            f"refused by the server for longer than allowed ({seen.describe()}): {reason}; "
            "the session stopped"
        )

    def _too_long(self, wait: float, source: str) -> str:
        limit = self.policy.max_wait
        asked = f"the server asked to wait {format_duration(round(wait, 3))} ({source})"
        if wait > limit:
            return f"{asked}, more than throttle_max_wait ({format_duration(limit)})"
        deadline = self.scheduler.deadline_ns
        if deadline is not None and time.monotonic_ns() + int(wait * NANOS_PER_SECOND) > deadline:
            return f"{asked}, past the total timeout"
        return ""

    def pause(self, wait: float, adapt: bool | None = None) -> tuple[int, int, int, int]:
        """Pause everyone sharing the bucket for ``wait`` seconds; with ``adapt`` (default:
        the policy's, if it has a rate) lower the rate. Returns the store's clock, the
        intervals before and after, and the pause's end."""
        learn = self.adapt if adapt is None else adapt
        return self.limiter.throttle(wait, learn)

    def _record(
        self,
        nodeid: str,
        seen: Throttle,
        wait: float,
        source: str,
        paused: tuple[int, int, int, int] | None,
        retried: bool,
    ) -> dict[str, Any]:
        event: dict[str, Any] = {
            "event": "throttle",
            "test": nodeid,
            "status": seen.status,
            "recognised": seen.source,
            "wait": wait,
            "wait_source": source,
            "retried": retried,
        }
        if paused is not None:
            at, before, after, until = paused
            event.update(rate_before=_per_minute(before), rate_after=_per_minute(after))
            self._timed(event, at, until)
        self.events.append(event)
        return event

    def _timed(self, event: dict[str, Any], at: int, until: int) -> dict[str, Any]:
        """When, on the store's clock, and (for a store on this machine's clock) as times
        since the session started, like the tests' ``start_ns``."""
        event.update(store_ns=at, paused_until_store_ns=until)
        if self.limiter.store.local_clock:
            event.update(at_ns=at - self.start_ns, paused_until_ns=until - self.start_ns)
        return event

    def observe(self, nodeid: str, response: Any) -> None:
        """A response the test saw: a throttle pauses (and adapts) as above; a published
        budget at 0 pauses until its reset, so the server never has to refuse."""
        from .detect import find_throttle, response_status
        from .headers import remaining

        status, headers = response_status(response)
        if status == 429 or (status == 503 and headers is not None):
            error = _ObservedResponse(response)
            seen = find_throttle(error)
            if seen is not None:
                wait = seen.wait if seen.wait is not None else backoff(1)
                source = seen.wait_source or "backoff"
                reason = self._too_long(wait, source)
                if reason:
                    self.scheduler.ledger.stop(reason)
                    return
                paused = self.pause(wait)
                self._record(nodeid, seen, wait, source, paused, retried=False)
                return
        budget = remaining(headers, time.time())
        if budget is None or budget.remaining > 0 or not budget.reset:
            return
        if self._too_long(budget.reset, budget.source):
            return  # a budget reset far away: the next request will tell (a 429 with a wait)
        at, _, _, until = self.pause(budget.reset, adapt=False)
        event = {"event": "budget", "test": nodeid, "source": budget.source, "wait": budget.reset}
        self.events.append(self._timed(event, at, until))

    @staticmethod
    def _annotate(reports: list[pytest.TestReport], note: str) -> None:
        for report in reports:
            if not report.failed:
                continue
            report.sections.append(("ratebatch", note))
            crash = getattr(report.longrepr, "reprcrash", None)
            if crash is not None and hasattr(crash, "message"):
                crash.message = f"ratebatch: {note}: {crash.message}"


class _Reruns:
    """The attempts of the tests pytest-rerunfailures runs, watched once a throttle in one
    of them was seen (until then they cost nothing more): the rerun of a throttled attempt
    is admitted like a retry, or cancelled if the session stopped."""

    def __init__(self, throttles: Throttles) -> None:
        self.throttles = throttles
        self._retried: set[str] = set()  # tests run again after a throttle, until they end

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logstart(self, nodeid: str, location: object) -> None:
        # pytest-rerunfailures starts each attempt so, before its set-up.
        throttles = self.throttles
        due, throttles.rerun_due = throttles.rerun_due, None
        item = throttles._rerun_item
        if item is None or item.nodeid != nodeid:
            return
        throttles._seen = None  # a new attempt
        retrier = throttles.retrier
        if due is None or due[0] != nodeid or retrier is None:
            return
        if retrier.admit_rerun(item):
            due[1]["retried"] = True
            self._retried.add(nodeid)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # A failed report is final: pytest-rerunfailures labels the ones it reruns "rerun".
        if report.failed and report.nodeid in self._retried:
            self._retried.discard(report.nodeid)
            retrier = self.throttles.retrier
            if retrier is not None:
                retrier.rerun_failed()


class _ObservedResponse(Exception):
    """A response handed to ``observe``, in the shape ``find_throttle`` reads."""

    def __init__(self, response: Any) -> None:
        super().__init__("observed response")
        self.response = response


def _per_minute(interval_ns: int) -> float | None:
    """A rate from an interval; ``None`` for no rate (0)."""
    return None if interval_ns <= 0 else 60 * NANOS_PER_SECOND / interval_ns


def _global_reruns(config: pytest.Config) -> bool:
    """Whether pytest-rerunfailures is told to rerun every test (its options or ini key)."""
    if config.getoption("force_reruns", None) or config.getoption("reruns", None):
        return True
    try:
        return bool(str(config.getini("reruns")).strip())
    except ValueError:  # no such ini key: not the version this was written against
        return False


def _location(item: pytest.Item) -> tuple[str, int]:
    """Where a skip of ``item`` points, as pytest's own skips do: the test (line from 1)."""
    path, line = item.reportinfo()[:2]
    if line is None:
        return item.location[0], (item.location[1] or 0) + 1
    return os.fspath(path), line + 1


def _show_test_item(item: pytest.Item, add_space: bool) -> None:
    """``--setup-show``'s line, in the form of whichever pytest runs."""
    try:
        show_test_item(item, add_space=add_space)  # type: ignore[call-arg,unused-ignore]
    except TypeError:  # pytest before 9.1
        show_test_item(item)  # type: ignore[call-arg,unused-ignore]


def _forget_failed_fixtures(item: pytest.Item) -> None:
    """Let a retry set up again the fixtures whose set-up raised (pytest caches a fixture's
    exception for its scope, so a module-scoped fixture throttled once would fail every
    retry without calling the server again)."""
    info = getattr(item, "_fixtureinfo", None)
    for definitions in getattr(info, "name2fixturedefs", {}).values():
        for definition in definitions:
            cached = getattr(definition, "cached_result", None)
            if cached is not None and cached[2] is not None:
                definition.cached_result = None
