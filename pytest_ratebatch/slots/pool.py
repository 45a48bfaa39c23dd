"""A pool of N slots: the interface every pool follows, and the pool of one process.

``acquire`` blocks until a slot is free and returns a handle, or ``None`` if ``max_wait_ns``
passed first; ``release`` gives the slot back. Slots go to waiters in the order they asked
(FIFO): a slot freed while others wait goes to the longest waiter, never to a newcomer.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Protocol

from ..policy import NANOS_PER_SECOND

__all__ = ["MemorySlotPool", "Slot", "SlotPool"]


class Slot:
    """A held slot: what ``acquire`` returns and ``release`` takes back (once).

    ``index`` numbers the pool's slots (0 to N - 1) where the pool has fixed slots (-1
    otherwise); ``token`` names a lease where the pool has leases (Redis).
    """

    __slots__ = ("index", "live", "token")

    def __init__(self, index: int, token: str = "") -> None:
        self.index = index
        self.token = token
        self.live = True  # False once released: a second release does nothing

    def __repr__(self) -> str:
        return f"Slot({self.index!r}, {self.token!r}, live={self.live!r})"


class SlotPool(Protocol):
    """At most ``capacity`` slots held at once, by every user of the pool together."""

    capacity: int

    def acquire(self, max_wait_ns: int | None = None) -> Slot | None:
        """Block until a slot is free, in arrival order; ``None`` (holding nothing) once
        ``max_wait_ns`` passed first (``0``: only if one is free now and nobody waits).

        May raise ``StoreError`` if a shared pool cannot be reached."""
        ...

    def release(self, slot: Slot) -> None:
        """Give ``slot`` back (to the longest waiter, if any). Never raises for a store that
        cannot be reached: a shared pool's slots come back by themselves then."""
        ...

    def describe(self) -> str:
        """A name safe to print (no credentials)."""
        ...

    def close(self) -> None: ...


class _Waiter:
    __slots__ = ("event", "slot")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.slot: Slot | None = None


class MemorySlotPool:
    """Slots shared by the threads of one process.

    A freed slot is handed straight to the longest waiter (it is never free in between), so
    a newcomer cannot overtake a waiter. Waits block on a ``threading.Event``.
    """

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, not {capacity!r}")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._free = list(range(capacity - 1, -1, -1))  # a stack: slot 0 is taken first
        self._waiters: deque[_Waiter] = deque()

    def acquire(self, max_wait_ns: int | None = None) -> Slot | None:
        with self._lock:
            if self._free and not self._waiters:
                return Slot(self._free.pop())
            if max_wait_ns is not None and max_wait_ns <= 0:
                return None
            waiter = _Waiter()
            self._waiters.append(waiter)
        timeout = None if max_wait_ns is None else max_wait_ns / NANOS_PER_SECOND
        try:
            waiter.event.wait(timeout)
        except BaseException:  # interrupted (Ctrl-C): leave the line, pass on a slot handed over
            handed = self._leave(waiter)
            if handed is not None:
                self.release(handed)
            raise
        return self._leave(waiter)  # a slot handed over just as the wait timed out is kept

    def _leave(self, waiter: _Waiter) -> Slot | None:
        """The slot handed to ``waiter``; if none, take the waiter out of the line."""
        with self._lock:
            if waiter.slot is None:
                self._waiters.remove(waiter)
            return waiter.slot

    def release(self, slot: Slot) -> None:
        with self._lock:
            if not slot.live:
                return
            slot.live = False
            if self._waiters:
                waiter = self._waiters.popleft()
                waiter.slot = Slot(slot.index)
                waiter.event.set()
            else:
                self._free.append(slot.index)

    def in_use(self) -> int:
        """Slots held right now."""
        with self._lock:
            return self.capacity - len(self._free)

    def describe(self) -> str:
        return f"memory, {self.capacity} slots"

    def close(self) -> None:
        pass
