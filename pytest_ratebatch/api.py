"""The public API of pytest-ratebatch, usable without pytest: ``from pytest_ratebatch import ...``.

The package imports this module on first use of one of these names.
"""

from __future__ import annotations

from .clock import MONOTONIC, Clock, MonotonicClock
from .ledger import Ledger, MemoryLedger
from .limiter import UNLIMITED, Admission, RateLimiter
from .policy import (
    ExecutionPolicy,
    PolicyError,
    RateLimit,
    WindowLimit,
    format_duration,
    parse_duration,
    parse_windows,
)
from .redis_store import RedisBucketStore
from .report import worst_excess
from .scheduler import TaskScheduler, Ticket
from .shared import FileBucketStore, FileLedger
from .slots.files import FileSlotPool
from .slots.pool import MemorySlotPool, Slot, SlotPool
from .slots.redis_pool import RedisSlotPool
from .stores import BucketStore, MemoryBucketStore, StoreError

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
