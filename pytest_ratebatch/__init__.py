"""pytest-ratebatch: a global token-bucket rate, batches and stop conditions for pytest.

pytest imports this package on every run, so it holds nothing: the public API lives in
``pytest_ratebatch.api`` and is imported from there on first use.

PYTEST_DONT_REWRITE
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

# Spelled out (and checked against ``api.__all__`` by the tests) so that other names, such as
# a submodule's in ``from . import gcra``, never import the API midway through its own import.
__all__ = [
    "MONOTONIC",
    "UNLIMITED",
    "Admission",
    "BucketStore",
    "Clock",
    "ExecutionPolicy",
    "FileBucketStore",
    "FileLedger",
    "FileSlotPool",
    "Ledger",
    "MemoryBucketStore",
    "MemoryLedger",
    "MemorySlotPool",
    "MonotonicClock",
    "PolicyError",
    "RateLimit",
    "RateLimiter",
    "RedisBucketStore",
    "RedisSlotPool",
    "Slot",
    "SlotPool",
    "StoreError",
    "TaskScheduler",
    "Ticket",
    "WindowLimit",
    "format_duration",
    "parse_duration",
    "parse_windows",
    "worst_excess",
]


def __getattr__(name: str) -> object:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.api"), name)
    globals()[name] = value
    return value
