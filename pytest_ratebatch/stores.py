"""Where the bucket lives. A store is one atomic operation on the two GCRA numbers.

The limiter never knows which store it has: the in-memory store serves one process, the
file store the workers of one pytest-xdist session, the Redis store several sessions.
Each store reads its own clock, so a shared store can use a clock all its clients share.
"""

from __future__ import annotations

import threading
from typing import Protocol

from . import gcra
from .clock import MONOTONIC, Clock
from .gcra import Outcome

__all__ = ["BucketStore", "MemoryBucketStore", "StoreError"]


class StoreError(RuntimeError):
    """The store cannot be reached or used; the message says which store and why."""


class BucketStore(Protocol):
    """Atomic operations on one token bucket (see ``gcra`` for their meaning).

    Operations may raise ``StoreError`` when the store cannot be used.
    """

    #: Whether the times in outcomes are this machine's monotonic clock (else the store's own).
    local_clock: bool

    def take(
        self, cost: int, interval_ns: int, burst: int, max_wait_ns: int | None, admit: bool
    ) -> Outcome: ...

    def commit(self, cost: int, interval_ns: int, burst: int) -> Outcome: ...

    def level(self, interval_ns: int, burst: int) -> float: ...

    def describe(self) -> str:
        """A name safe to print (no credentials)."""
        ...


class MemoryBucketStore:
    """A bucket in this process, safe to share between threads."""

    local_clock = True

    def __init__(self, clock: Clock = MONOTONIC) -> None:
        self._now = clock.now_ns
        self._lock = threading.Lock()
        self._reserved = 0
        self._admitted = 0

    def take(
        self, cost: int, interval_ns: int, burst: int, max_wait_ns: int | None, admit: bool
    ) -> Outcome:
        with self._lock:
            now = self._now()
            self._reserved, self._admitted, status, wait = gcra.take(
                self._reserved, self._admitted, now, cost, interval_ns, burst, max_wait_ns, admit
            )
        return status, now, wait

    def commit(self, cost: int, interval_ns: int, burst: int) -> Outcome:
        with self._lock:
            now = self._now()
            self._reserved, self._admitted, status, wait = gcra.commit(
                self._reserved, self._admitted, now, cost, interval_ns, burst
            )
        return status, now, wait

    def level(self, interval_ns: int, burst: int) -> float:
        with self._lock:
            return gcra.level(self._reserved, self._admitted, self._now(), interval_ns, burst)

    def describe(self) -> str:
        return "memory"
