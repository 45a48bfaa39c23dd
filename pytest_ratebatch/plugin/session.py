"""An active session's parts, wired for this process once an option is set.

A ``Pacer`` where tests run (a plain session, or a pytest-xdist worker) and a ``Reporter``
where outcomes are reported (a plain session, or the xdist controller). Under xdist the
controller creates the session's shared directory and hands it to the workers through
``workerinput`` (see ``session_dir``). Only what this kind of process needs is imported:
a plain session never loads the xdist or Redis parts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ..engine.limiter import UNLIMITED, RateLimiter
from ..engine.scheduler import START_TURN, TaskScheduler
from ..limits.clock import MONOTONIC
from ..limits.policy import ExecutionPolicy, PolicyError, build_policy, parse_value
from ..limits.values import Value
from ..stores.base import BucketStore, Ledger, StoreError
from ..stores.memory import MemoryBucketStore, MemoryLedger
from ..throttle.retrying import Throttles, load_exception_types
from .options import (
    COMMAND_LINE,
    KEY_OPTION,
    REPORT_OPTION,
    STORE_OPTION,
    THROTTLE_EXCEPTIONS_OPTION,
    TIMELINE_OPTION,
    RawValue,
)
from .pacing import Pacer, ProtocolPacing, SessionPacer, StartLineOpener
from .registry import register_hooks
from .reporter import OutcomeRecorder, Reporter, wants_forecast

if TYPE_CHECKING:
    from ..engine.gates import Gates
    from ..engine.machine import MachineGate
    from ..stores.base import ResourcePool, SlotPool
    from ..stores.redis import RedisBucketStore
    from .session_dir import SessionDirectory, SharedSession

__all__ = [
    "Settings",
    "configure",
    "is_distributing",
    "load_settings",
    "open_slots",
    "open_store",
    "parse_settings",
    "start_line_opener",
    "store_choice",
]


class Settings(Value):
    """The validated options: the policy, and where the report, the timeline and the bucket
    go."""

    __slots__ = ("key", "policy", "raw", "report_path", "store", "timeline_path")
    policy: ExecutionPolicy
    report_path: Path | None
    timeline_path: Path | None
    store: RawValue | None  # as written; None: the default for this kind of session
    key: str | None  # the Redis key; None: the default
    raw: dict[str, RawValue]  # every option as written, for messages

    def __init__(
        self,
        policy: ExecutionPolicy,
        report_path: Path | None,
        store: RawValue | None,
        key: str | None,
        raw: dict[str, RawValue],
        timeline_path: Path | None = None,
    ) -> None:
        self._set(
            policy=policy,
            report_path=report_path,
            store=store,
            key=key,
            raw=raw,
            timeline_path=timeline_path,
        )


def load_settings(config: pytest.Config, raw: dict[str, RawValue]) -> Settings:
    """The validated settings, or ``pytest.UsageError`` naming the bad value."""
    try:
        return parse_settings(raw, config.invocation_params.dir, config.rootpath)
    except PolicyError as error:
        raise pytest.UsageError(str(error)) from None


def parse_settings(raw: dict[str, RawValue], invocation_dir: Path, rootpath: Path) -> Settings:
    """The validated settings, or ``PolicyError`` naming the bad value: paths on the command
    line are relative to ``invocation_dir``, in the ini file to ``rootpath``."""
    written = raw
    raw = dict(raw)
    extra = {
        name: raw.pop(name)
        for name in (REPORT_OPTION, TIMELINE_OPTION, STORE_OPTION, KEY_OPTION)
        if name in raw
    }
    policy = build_policy(raw)
    values = {name: parse_value(name, value) for name, value in extra.items()}
    paths: dict[str, Path] = {}
    for name in (REPORT_OPTION, TIMELINE_OPTION):
        if name in values:
            base = invocation_dir if extra[name].source == COMMAND_LINE else rootpath
            try:
                path = paths[name] = base / Path(values[name]).expanduser()
            except RuntimeError as error:  # ~user of no such user: no home to expand
                raise PolicyError(f"ratebatch: {extra[name].describe(name)}: {error}") from None
            # Known before any test runs (pytest refuses --junitxml=DIR too); any other
            # problem shows when the file is written (os.path, unlike pathlib, never raises).
            if os.path.isdir(path):
                raise PolicyError(
                    f"ratebatch: {extra[name].describe(name)}: a directory; name a file in it"
                )
    return Settings(
        policy,
        paths.get(REPORT_OPTION),
        extra.get(STORE_OPTION),
        values.get(KEY_OPTION),
        written,
        paths.get(TIMELINE_OPTION),
    )


def is_distributing(config: pytest.Config) -> bool:
    """Whether this process is an xdist controller that will start workers (with
    ``--collect-only`` xdist starts none: this process collects, as without ``-n``)."""
    option = config.option
    return (
        getattr(option, "dist", "no") != "no"
        and bool(getattr(option, "tx", None))
        and not option.collectonly
    )


def store_choice(settings: Settings, shared: SessionDirectory | None) -> str:
    """``memory``, ``file`` or the Redis URL: where the bucket (and the slots) live."""
    raw = settings.store
    return raw.text.strip() if raw is not None else ("file" if shared is not None else "memory")


def open_store(
    config: pytest.Config, settings: Settings, shared: SessionDirectory | None
) -> BucketStore:
    """The bucket the settings name; a ``pytest.UsageError`` if it cannot be used."""
    raw = settings.store
    choice = store_choice(settings, shared)
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
            shared = _create_shared()  # a file store for this process alone
            config.add_cleanup(shared.close)
        return shared.bucket()
    from ..stores.redis import DEFAULT_KEY, PolicyConflict, RedisBucketStore
    from .session_dir import SharedSession

    try:
        store = RedisBucketStore(choice, settings.key or DEFAULT_KEY)
        config.add_cleanup(store.close)
        if shared is None or isinstance(shared, SharedSession):
            # Once per session, before any test (the workers trust it): the server answers,
            # and the key is not in use with other limits.
            store.check()
            store.claim(*settings.policy.shared_limits())
    except PolicyConflict as conflict:
        raise pytest.UsageError(
            f"ratebatch: the Redis key {conflict.key!r} is in use by another session with "
            f"other limits: it holds {conflict.theirs}, this session states {conflict.ours}. "
            "A key names one limit: give every session on it the same --rate-per-minute, "
            "--burst, --rate-limit and --max-concurrency, or another --ratebatch-key"
        ) from None
    except StoreError as error:
        raise pytest.UsageError(f"ratebatch: the store cannot be used: {error}") from None
    return store


def open_slots(
    config: pytest.Config,
    settings: Settings,
    shared: SessionDirectory | None,
    machine: MachineGate | None = None,
) -> tuple[SlotPool | None, Gates | None]:
    """The concurrency cap's slots, beside the bucket (``None``: no cap), and the gates
    (``engine.gates``: the cap, the declared resources, the machine's ``machine``) when
    resources or a machine gate are set. Imported only when one is."""
    slots = _open_cap(config, settings, shared)
    if not settings.policy.gated:
        return slots, None
    from ..engine.gates import Gates

    return slots, Gates(slots, _open_resources(config, settings, shared), machine)


def machine_gate(settings: Settings) -> MachineGate | None:
    """The machine's gates (``None``: neither is set); a usage error naming the option if
    this machine cannot read what it needs, or can never pass (a floor above its memory)."""
    policy = settings.policy
    if policy.min_free_memory is None and policy.max_load is None:
        return None
    from ..engine.machine import MachineGate, SystemReadings

    readings = SystemReadings()
    gate = MachineGate(policy.min_free_memory, policy.max_load, readings, MONOTONIC)
    problems = {
        "min_free_memory": policy.min_free_memory is not None
        and (readings.supported(True, False) or gate.unreachable()),
        "max_load": policy.max_load is not None and readings.supported(False, True),
    }
    for name, problem in problems.items():
        if problem:
            raise pytest.UsageError(f"ratebatch: {settings.raw[name].describe(name)}: {problem}")
    return gate


def _open_resources(
    config: pytest.Config, settings: Settings, shared: SessionDirectory | None
) -> ResourcePool | None:
    """The declared resources' pool, where the cap's slots live."""
    capacity = dict(settings.policy.resources)
    if not capacity:
        return None
    choice = store_choice(settings, shared)
    if choice in ("memory", "file") and shared is None:
        from ..stores.memory import MemoryResourcePool

        return MemoryResourcePool(capacity)
    try:
        pool = _shared_pool(choice, settings, shared, capacity, "resources")
    except StoreError as error:
        raise pytest.UsageError(f"ratebatch: the store cannot be used: {error}") from None
    config.add_cleanup(pool.close)
    return pool


def _shared_pool(
    choice: str,
    settings: Settings,
    shared: SessionDirectory | None,
    capacity: dict[str, float],
    name: str,
) -> ResourcePool:
    """A ``ResourcePool`` shared by the session's workers (the session directory's
    ``name``) or by every session on the Redis key (under ``name``)."""
    if choice == "file":
        from ..stores.files import FileResourcePool

        assert shared is not None
        directory = shared.directory if name == "resources" else shared.directory / name
        try:
            directory.mkdir(exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot create {directory}: {error.strerror or error}") from None
        return FileResourcePool(directory, capacity)
    from ..stores.redis import DEFAULT_KEY, RedisResourcePool

    return RedisResourcePool(choice, settings.key or DEFAULT_KEY, capacity, name=name)


def start_line_opener(
    config: pytest.Config, settings: Settings, shared: SessionDirectory | None
) -> StartLineOpener | None:
    """What opens the start line (``engine.scheduler``) where starts of other processes take
    tokens from the same bucket: the session directory under xdist (whose workers see the
    same priorities), a Redis key (always: other sessions may state priorities). ``None``
    where this process alone takes them, or nothing is paced."""
    policy = settings.policy
    choice = store_choice(settings, shared)
    if (policy.rate_limit is None and not policy.windows) or (
        choice in ("memory", "file") and shared is None
    ):
        return None

    def open_line() -> ResourcePool:
        pool = _shared_pool(choice, settings, shared, dict(START_TURN), "start-line")
        config.add_cleanup(pool.close)
        return pool

    return StartLineOpener(open_line, always=choice != "file")


def _open_cap(
    config: pytest.Config, settings: Settings, shared: SessionDirectory | None
) -> SlotPool | None:
    capacity = settings.policy.max_concurrency
    if capacity is None:
        return None
    choice = store_choice(settings, shared)
    pool: SlotPool
    if choice == "file" and shared is not None:
        from ..stores.files import FileSlotPool

        pool = FileSlotPool(shared.directory, capacity)
    elif choice in ("memory", "file"):
        from ..stores.memory import MemorySlotPool

        return MemorySlotPool(capacity)  # one process: its threads are all the sharers
    else:
        from ..stores.redis import DEFAULT_KEY, RedisSlotPool

        try:
            pool = RedisSlotPool(choice, settings.key or DEFAULT_KEY, capacity)
        except StoreError as error:
            raise pytest.UsageError(f"ratebatch: the store cannot be used: {error}") from None
    config.add_cleanup(pool.close)
    return pool


def configure(
    config: pytest.Config, raw: dict[str, RawValue], pacer_key: pytest.StashKey[Pacer]
) -> None:
    """Validate the options and register what this process needs."""
    settings = load_settings(config, raw)
    policy = settings.policy
    throttling_set = any(name.startswith("throttle_") for name in raw) or (
        THROTTLE_EXCEPTIONS_OPTION in raw
    )
    drawn = settings.report_path is not None or settings.timeline_path is not None
    if not (policy.is_active or throttling_set or drawn):
        return
    machine = machine_gate(settings)  # checked in every process, the xdist controller's first
    if hasattr(config, "workerinput"):
        from .session_dir import worker_session
        from .xdist import RecordingWorkerPacer, WorkerPacer

        worker = worker_session(config)
        if worker is not None:
            store = open_store(config, settings, worker)
            slots, gates = open_slots(config, settings, worker, machine)
            scheduler = _scheduler(
                policy, store, worker.ledger(), worker.start_ns, worker.announce, slots, gates
            )
            kind = RecordingWorkerPacer if worker.send_records else WorkerPacer
            worker_pacer = kind(scheduler, worker.start_ns)
            worker_pacer.start_line = start_line_opener(config, settings, worker)
            if wants_forecast(policy) or worker.send_records:  # the forecast, the report
                worker_pacer.costs_to = (worker.directory, worker.worker_id)
            config.stash[pacer_key] = worker_pacer
            throttles = _throttles(config, worker_pacer, settings)
            _watch_for_loss(store, policy, throttles.events, worker.start_ns, worker.warn)
            # xdist runs the worker's loop: pacing wraps each test's protocol instead.
            protocol = ProtocolPacing(worker_pacer)
            parts: list[object] = [worker_pacer, protocol, throttles]
            if policy.call_limits:
                from .calls import track_calls

                parts.append(
                    track_calls(config, settings, worker, worker.start_ns, worker.send_records)
                )
            register_hooks(config.pluginmanager, "ratebatch-session", *parts)
            return
    if is_distributing(config):
        _configure_controller(config, settings)
        return
    store = open_store(config, settings, None)
    ledger = MemoryLedger()
    start_ns = MONOTONIC.now_ns()
    reporter = Reporter(
        config, policy, settings.report_path, store, ledger, start_ns, settings.timeline_path
    )
    slots, gates = open_slots(config, settings, None, machine)
    scheduler = _scheduler(policy, store, ledger, start_ns, reporter.announce_wait, slots, gates)
    pacer = SessionPacer(scheduler, start_ns, reporter.tally, reporter)
    pacer.start_line = start_line_opener(config, settings, None)
    config.stash[pacer_key] = pacer
    throttles = _throttles(config, pacer, settings)
    reporter.events = throttles.events
    _watch_for_loss(store, policy, throttles.events, start_ns, reporter.warn_once)
    _watch_for_conflicts(store, reporter.warn_once)
    parts = [reporter, pacer, throttles]
    if reporter.records is not None:
        parts.append(OutcomeRecorder(reporter))
    if policy.call_limits:
        from .calls import track_calls

        tracking = track_calls(config, settings, None, start_ns, reporter.records is not None)
        reporter.add_calls(tracking.add_to)
        parts.append(tracking)
    register_hooks(config.pluginmanager, "ratebatch-session", *parts)


#: The warning line when a shared store is found to have lost its state.
STORE_LOST = "the Redis store lost its state (restarted?); resuming as if the bucket were empty"


def _redis_store(store: BucketStore) -> RedisBucketStore | None:
    """The store if it is a Redis one (memory and file stores live and die with the session,
    and need no watching)."""
    if store.local_clock:
        return None
    from ..stores.redis import RedisBucketStore

    return store if isinstance(store, RedisBucketStore) else None


def _watch_for_loss(
    store: BucketStore,
    policy: ExecutionPolicy,
    events: list[dict[str, Any]],
    start_ns: int,
    warn: Callable[[str], None],
) -> None:
    """A Redis store that finds its state lost (a restart) warns once and leaves an event
    for the report."""
    redis_store = _redis_store(store)
    if redis_store is None:
        return
    text = STORE_LOST + (" and every window full" if policy.windows else "")

    def lost(store_ns: int) -> None:
        at = MONOTONIC.now_ns() - start_ns
        events.append({"event": "store_lost", "store_ns": store_ns, "at_ns": at})
        warn(text)

    redis_store.on_lost = lost


def _watch_for_conflicts(store: BucketStore, warn: Callable[[str], None]) -> None:
    """Where the session claimed its Redis key: another policy found on it later (after the
    server lost the claims) is a warning; the session already runs."""
    redis_store = _redis_store(store)
    if redis_store is None:
        return
    key = redis_store.name

    def conflict(theirs: str) -> None:
        warn(f"the Redis key {key!r} is also in use with other limits ({theirs})")

    redis_store.on_conflict = conflict


def _throttles(config: pytest.Config, pacer: Pacer, settings: Settings) -> Throttles:
    """The handling of throttled tests beside the pacer."""
    throttling = settings.policy.throttling
    try:
        extra = load_exception_types(throttling.exceptions)
    except ValueError as error:
        raw = settings.raw[THROTTLE_EXCEPTIONS_OPTION]
        raise pytest.UsageError(
            f"ratebatch: {raw.describe(THROTTLE_EXCEPTIONS_OPTION)}: {error}"
        ) from None
    limiter = pacer.scheduler.limiter
    assert limiter is not None  # every active session has a bucket, if only for pauses
    start_ns = pacer.start_ns
    # Without a rate (nor auto) a throttle pauses everyone, but there is no rate to adapt.
    adapt = throttling.adapt and settings.policy.rate_limit is not None
    throttles = Throttles(config, throttling, pacer.scheduler, limiter, start_ns, extra, adapt)
    pacer.throttles = throttles
    throttles.retrier = pacer  # pytest-rerunfailures' reruns after a throttle are retries
    return throttles


def _configure_controller(config: pytest.Config, settings: Settings) -> None:
    """The xdist controller runs no test: it shares the session and reports."""
    from .xdist import ControllerReporter, WorkerRecords

    shared = _create_shared()
    config.add_cleanup(shared.close)
    store = open_store(config, settings, shared)
    reporter = ControllerReporter(
        shared, config, settings.policy, settings.report_path, store, shared.ledger(),
        shared.start_ns, settings.timeline_path,
    )  # fmt: skip
    _watch_for_conflicts(store, reporter.warn_once)
    parts: list[object] = [reporter]
    if reporter.records is not None:
        parts.append(WorkerRecords(reporter))
    if settings.policy.call_limits:
        from .calls import CallsCollector

        parts.append(CallsCollector(reporter.add_calls(None)))
    register_hooks(config.pluginmanager, "ratebatch-session", *parts)


def _create_shared() -> SharedSession:
    """A new session directory, or a usage error saying why there can be none."""
    from .session_dir import SharedSession

    try:
        return SharedSession.create()
    except StoreError as error:
        raise pytest.UsageError(f"ratebatch: the store cannot be used: {error}") from None


def _scheduler(
    policy: ExecutionPolicy,
    store: BucketStore,
    ledger: Ledger,
    start_ns: int,
    on_wait: Callable[[str, float], None],
    slots: SlotPool | None = None,
    gates: Gates | None = None,
) -> TaskScheduler:
    limiter = RateLimiter(policy.rate_limit or UNLIMITED, store, windows=policy.windows)
    return TaskScheduler(
        policy,
        limiter=limiter,
        ledger=ledger,
        session_start_ns=start_ns,
        on_wait=on_wait,
        slots=slots,
        gates=gates,
    )
