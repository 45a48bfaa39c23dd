"""The public API of pytest-ratebatch, usable without pytest: ``from pytest_ratebatch import ...``.

The package imports this module on first use of one of these names.
"""

from __future__ import annotations

from .engine.limiter import UNLIMITED, Admission, RateLimiter
from .engine.scheduler import TaskScheduler, Ticket
from .limits.clock import MONOTONIC, Clock, MonotonicClock
from .limits.policy import (
    ExecutionPolicy,
    PolicyError,
    RateLimit,
    WindowLimit,
    format_duration,
    parse_duration,
    parse_windows,
)
from .stores.base import BucketStore, Ledger, Slot, SlotPool, StoreError
from .stores.files import FileBucketStore, FileLedger, FileSlotPool
from .stores.memory import MemoryBucketStore, MemoryLedger, MemorySlotPool
from .stores.redis import RedisBucketStore, RedisSlotPool
from .views.report import worst_excess

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
