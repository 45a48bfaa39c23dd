"""Call limits in a session: the pacer of this process, its stores, the patched clients,
and the calls' totals for the reporter (from xdist workers through ``workeroutput``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from ..calls.install import install
from ..calls.pacer import CallPacer
from ..engine.limiter import UNLIMITED, RateLimiter
from ..limits.calls import CallLimit
from ..limits.policy import RateLimit
from ..stores.base import BucketStore, SlotPool, StoreError
from ..views.calls import CallsSummary
from .pacing import MARKER

if TYPE_CHECKING:
    from .session import Settings
    from .session_dir import SessionDirectory

__all__ = [
    "CALL_WINDOW_MARGIN_NS",
    "WORKEROUTPUT_KEY",
    "CallTracking",
    "CallsCollector",
    "open_call_pacer",
    "track_calls",
]

#: What travels from a worker to the controller: each host's totals and, for a report, calls.
WORKEROUTPUT_KEY = "ratebatch_calls"
#: How much longer than stated a call limit's windows are kept. A call is admitted as it is
#: sent, on an open connection, so it reaches the server sooner after its admission than a
#: test's first request does after the test's (``engine.limiter.WINDOW_MARGIN_NS``).
CALL_WINDOW_MARGIN_NS = 20_000_000
#: An auto limit's bucket: no rate until the server's throttles teach one, then one call at
#: a time at that rate.
AUTO = RateLimit(math.inf, 1)


def _store_part(
    config: pytest.Config,
    settings: Settings,
    shared: SessionDirectory | None,
    index: int,
    limit: CallLimit,
) -> tuple[BucketStore, SlotPool | None]:
    """The bucket (and slots, with a concurrency) of one call limit, where the test rate's
    bucket lives: this process's memory, the session directory, or Redis."""
    from .session import _create_shared, store_choice

    choice = store_choice(settings, shared)
    capacity = limit.concurrency
    if choice == "memory":
        from ..stores.memory import MemoryBucketStore, MemorySlotPool

        return MemoryBucketStore(), MemorySlotPool(capacity) if capacity else None
    if choice == "file":
        from ..stores.files import FileBucketStore, FileSlotPool

        if shared is None:
            shared = _create_shared()
            config.add_cleanup(shared.close)
        directory = shared.directory / f"calls-{index}"
        try:
            directory.mkdir(exist_ok=True)
        except OSError as error:
            raise StoreError(f"the session directory {directory}: {error.strerror}") from None
        pool = FileSlotPool(directory, capacity) if capacity else None
        if pool is not None:
            config.add_cleanup(pool.close)
        return FileBucketStore(directory), pool
    from ..stores.redis import DEFAULT_KEY, RedisBucketStore, RedisSlotPool

    key = f"{settings.key or DEFAULT_KEY}:calls:{limit.pattern}"
    store = RedisBucketStore(choice, key)
    config.add_cleanup(store.close)
    redis_pool = RedisSlotPool(choice, key, capacity) if capacity else None
    if redis_pool is not None:
        config.add_cleanup(redis_pool.close)
    return store, redis_pool


def open_call_pacer(
    config: pytest.Config,
    settings: Settings,
    shared: SessionDirectory | None,
    start_ns: int,
    keep_records: bool,
) -> CallPacer:
    """This process's pacer of calls; a host's store is opened at its first call."""
    policy = settings.policy

    def open_host(index: int, limit: CallLimit) -> tuple[RateLimiter, SlotPool | None]:
        store, slots = _store_part(config, settings, shared, index, limit)
        rate = AUTO if limit.auto else UNLIMITED
        limiter = RateLimiter(
            rate, store, windows=limit.windows, window_margin_ns=CALL_WINDOW_MARGIN_NS
        )
        return limiter, slots

    return CallPacer(
        policy.call_limits, open_host, policy.throttling, start_ns, keep_records=keep_records
    )


class CallTracking:
    """Hooks: the clients patched for the session, each call attributed to the running
    test (``@pytest.mark.ratebatch(pace_calls=False)`` opts a test out), the totals kept for
    the summary or sent to the controller."""

    def __init__(self, pacer: CallPacer) -> None:
        self.pacer = pacer
        self._uninstall: Callable[[], None] | None = install(pacer)

    def uninstall(self) -> None:
        if self._uninstall is not None:
            self._uninstall()
            self._uninstall = None

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        pacer = self.pacer
        pacer.nodeid = item.nodeid
        pacer.enabled = True
        for mark in item.iter_markers(MARKER):
            if "pace_calls" in mark.kwargs:
                pacer.enabled = mark.kwargs["pace_calls"] is not False
                break

    def pytest_runtest_logfinish(self, nodeid: str, location: object) -> None:
        self.pacer.nodeid = ""
        self.pacer.enabled = True

    def collect(
        self,
    ) -> tuple[dict[str, list[Any]], list[list[Any]], dict[str, dict[str, int]]]:
        """This process's totals by limit, its calls (none without a report), and each
        test's number of calls per limit."""
        pacer = self.pacer
        hosts = {pattern: stats.to_list() for pattern, stats in pacer.stats().items()}
        calls = [call.to_list() for call in pacer.records or ()]
        return hosts, calls, pacer.counts

    def add_to(self, summary: CallsSummary) -> None:
        """Hand this process's calls to the summary (the reporter, as the session ends)."""
        self.uninstall()
        summary.add(*self.collect())

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.uninstall()
        workeroutput = getattr(session.config, "workeroutput", None)
        if workeroutput is not None:  # before xdist's wrapper sends it to the controller
            hosts, calls, counts = self.collect()
            workeroutput[WORKEROUTPUT_KEY] = {"hosts": hosts, "calls": calls, "counts": counts}


class CallsCollector:
    """The xdist controller's side: each worker's calls, as it finishes."""

    def __init__(self, summary: CallsSummary) -> None:
        self.summary = summary

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object | None) -> None:
        output = getattr(node, "workeroutput", {}).get(WORKEROUTPUT_KEY)
        if output is not None:
            self.summary.add(output["hosts"], output["calls"], output.get("counts", {}))


def track_calls(
    config: pytest.Config,
    settings: Settings,
    shared: SessionDirectory | None,
    start_ns: int,
    keep_records: bool,
) -> CallTracking:
    """The call limits' pacer of this process, its clients patched until the session ends."""
    pacer = open_call_pacer(config, settings, shared, start_ns, keep_records)
    tracking = CallTracking(pacer)
    config.add_cleanup(tracking.uninstall)
    return tracking
