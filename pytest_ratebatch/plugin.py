"""The pytest entry point: options, and the parts each process needs.

Without any policy (and no report asked for) only ``pytest_addoption`` and
``pytest_configure`` run. Otherwise ``pytest_configure`` registers a ``Pacer`` where tests
run (a plain session, or a pytest-xdist worker) and a ``Reporter`` where outcomes are
reported (a plain session, or the xdist controller). Under xdist the controller creates the
session's shared directory and hands it to the workers through ``workerinput`` (see
``distributed``).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from .clock import MONOTONIC
from .distributed import SessionDirectory, SharedSession, is_distributing, worker_session
from .ledger import Ledger, MemoryLedger
from .limiter import RateLimiter
from .options import STORE_OPTION, Settings, add_options, load_settings
from .pacing import Pacer, RateBatch, WorkerPacer
from .policy import ExecutionPolicy
from .redis_store import RedisBucketStore
from .reporting import Reporter, TerminalGuard
from .scheduler import TaskScheduler
from .stores import BucketStore, MemoryBucketStore, StoreError

__all__ = ["PACER_KEY", "ratebatch"]


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


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


PACER_KEY = pytest.StashKey["Pacer"]()


@pytest.fixture
def ratebatch(request: pytest.FixtureRequest) -> RateBatch:
    """Take tokens inside a test, from the same bucket as the session (``acquire(cost=1)``)."""
    return RateBatch(request.config.stash.get(PACER_KEY, None), request.node.nodeid)
