"""pytest-ratebatch: a global token-bucket rate, batches and stop conditions for pytest.

The public names below are imported on first use, so that pytest, which imports this
package on every run, pays only for what a session uses.

PYTEST_DONT_REWRITE
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .clock import MONOTONIC, Clock, MonotonicClock
    from .ledger import Ledger, MemoryLedger
    from .limiter import Admission, RateLimiter
    from .policy import ExecutionPolicy, PolicyError, RateLimit, format_duration, parse_duration
    from .redis_store import RedisBucketStore
    from .report import worst_excess
    from .scheduler import TaskScheduler, Ticket
    from .shared import FileBucketStore, FileLedger
    from .stores import BucketStore, MemoryBucketStore, StoreError

__all__ = [
    "MONOTONIC",
    "Admission",
    "BucketStore",
    "Clock",
    "ExecutionPolicy",
    "FileBucketStore",
    "FileLedger",
    "Ledger",
    "MemoryBucketStore",
    "MemoryLedger",
    "MonotonicClock",
    "PolicyError",
    "RateLimit",
    "RateLimiter",
    "RedisBucketStore",
    "StoreError",
    "TaskScheduler",
    "Ticket",
    "format_duration",
    "parse_duration",
    "worst_excess",
]

__version__ = "0.1.0"

_HOMES = {
    "clock": ("MONOTONIC", "Clock", "MonotonicClock"),
    "ledger": ("Ledger", "MemoryLedger"),
    "limiter": ("Admission", "RateLimiter"),
    "policy": ("ExecutionPolicy", "PolicyError", "RateLimit", "format_duration", "parse_duration"),
    "redis_store": ("RedisBucketStore",),
    "report": ("worst_excess",),
    "scheduler": ("TaskScheduler", "Ticket"),
    "shared": ("FileBucketStore", "FileLedger"),
    "stores": ("BucketStore", "MemoryBucketStore", "StoreError"),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
