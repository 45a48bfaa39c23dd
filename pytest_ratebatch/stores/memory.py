"""The stores of one process: the bucket, the ledger and the slots, shared by its threads.

Each operation takes one ``threading.Lock`` around the pure arithmetic of ``limits``;
blocking waits (the barrier between batches, a slot) wait on a condition or an event.
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..limits import gcra
from ..limits.batches import (
    Entry,
    SessionState,
    StopRule,
    check_stop,
    enter,
    finish,
    leave,
    release,
    stop,
)
from ..limits.bucket import UNSET, BucketState, current_interval, throttle
from ..limits.clock import MONOTONIC, Clock
from ..limits.gcra import ADMITTED, Outcome
from ..limits.policy import NANOS_PER_SECOND
from .base import Slot

if TYPE_CHECKING:  # loaded with the first window limit: a session without one never needs it
    from ..limits.windows import WindowedOutcome, WindowLog, Windows

__all__ = ["MemoryBucketStore", "MemoryLedger", "MemoryResourcePool", "MemorySlotPool"]


class MemoryBucketStore:
    """A bucket in this process, safe to share between threads."""

    local_clock = True

    def __init__(self, clock: Clock = MONOTONIC) -> None:
        self._now = clock.now_ns
        self._lock = threading.Lock()
        self._state = BucketState()
        self._windows: dict[Windows, list[WindowLog]] = {}

    def take(
        self, cost: int, interval_ns: int, burst: int, max_wait_ns: int | None, admit: bool
    ) -> Outcome:
        with self._lock:
            now = self._now()
            state = self._state
            if state.interval != UNSET:
                interval_ns = current_interval(state, now, interval_ns)
            state.reserved, state.admitted, status, wait = gcra.take(
                state.reserved, state.admitted, now, cost, interval_ns, burst, max_wait_ns, admit
            )
            if status == ADMITTED:
                state.count += cost
        return status, now, wait

    def commit(
        self, cost: int, interval_ns: int, burst: int, slot_ns: int | None = None
    ) -> Outcome:
        with self._lock:
            now = self._now()
            state = self._state
            if state.interval != UNSET:
                interval_ns = current_interval(state, now, interval_ns)
            state.reserved, state.admitted, status, wait = gcra.commit(
                state.reserved, state.admitted, now, cost, interval_ns, burst, slot_ns
            )
            if status == ADMITTED:
                state.count += cost
        return status, now, wait

    def _logs(self, windows: Windows) -> list[WindowLog]:
        logs = self._windows.get(windows)
        if logs is None:
            from ..limits.windows import WindowLog

            logs = self._windows[windows] = [WindowLog(*window) for window in windows]
        return logs

    def take_windowed(
        self,
        cost: int,
        interval_ns: int,
        burst: int,
        max_wait_ns: int | None,
        admit: bool,
        windows: Windows,
    ) -> WindowedOutcome:
        from ..limits.windows import take_state

        with self._lock:
            return take_state(
                self._state, self._logs(windows), self._now(), cost, interval_ns, burst,
                max_wait_ns, admit,
            )  # fmt: skip

    def commit_windowed(
        self, cost: int, interval_ns: int, burst: int, slot_ns: int | None, windows: Windows
    ) -> WindowedOutcome:
        from ..limits.windows import commit_state

        with self._lock:
            return commit_state(
                self._state, self._logs(windows), self._now(), cost, interval_ns, burst, slot_ns
            )

    def level(self, interval_ns: int, burst: int, windows: Windows = ()) -> float:
        with self._lock:
            state = self._state
            now = self._now()
            interval_ns = current_interval(state, now, interval_ns)
            tokens = gcra.level(state.reserved, state.admitted, now, interval_ns, burst)
            for log in self._logs(windows) if windows else ():
                tokens = min(tokens, log.free(now))
            return tokens

    def throttle(
        self, wait_ns: int, interval_ns: int, burst: int, adapt: bool
    ) -> tuple[int, int, int, int]:
        with self._lock:
            now = self._now()
            return (now, *throttle(self._state, now, wait_ns, interval_ns, burst, adapt))

    def describe(self) -> str:
        return "memory"


class MemoryLedger:
    """The ledger of a single process; thread-safe, so threads may share a scheduler."""

    def __init__(self) -> None:
        self._state = SessionState()
        # Updates take the lock directly (a C call); only the blocking waits need the condition.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # Threads blocked in a wait: notifying costs a few Python calls, spared when none is
        # (always, in a plain session, whose one thread never waits on itself).
        self._waiting = 0

    def _notify(self) -> None:
        """Under the lock: wake the waiters, if any."""
        if self._waiting:
            self._changed.notify_all()

    def enter(self, now: int, rule: StopRule, batch_size: int | None) -> Entry:
        with self._lock:
            return enter(self._state, now, rule, batch_size)

    def release(self, batch: int) -> None:
        with self._lock:
            release(self._state, batch)
            self._notify()

    def finish(self, batch: int, failed: bool, now: int) -> None:
        with self._lock:
            finish(self._state, batch, failed, now)
            if self._waiting:  # ``_notify``, one call less: every batched test finishes here
                self._changed.notify_all()

    def leave(self, batch: int) -> None:
        with self._lock:
            leave(self._state, batch)
            self._notify()

    def stop(self, reason: str) -> str:
        with self._lock:
            result = stop(self._state, reason)
            self._notify()
            return result

    def check_stop(self, now: int, rule: StopRule) -> str:
        if rule.max_failures is None and rule.deadline_ns is None:
            # Nothing to decide here, only a stop to read (before every test: no lock).
            return self._state.stop_reason
        with self._lock:
            return check_stop(self._state, now, rule)

    def wait_drained(self, batch: int) -> int:
        state = self._state
        with self._changed:
            self._waiting += 1
            try:
                self._changed.wait_for(lambda: state.batch > batch + 1 or state.draining <= 0)
            finally:
                self._waiting -= 1
            return state.drained_ns

    def wait_released(self, batch: int) -> None:
        state = self._state
        with self._changed:
            self._waiting += 1
            try:
                self._changed.wait_for(
                    lambda: state.batch != batch or state.released or bool(state.stop_reason)
                )
            finally:
                self._waiting -= 1

    def snapshot(self) -> SessionState:
        with self._lock:
            return self._state.copy()

    def sleep(self, seconds: float, clock: Clock) -> None:
        # A plain session runs one test at a time: no other test can stop it while this one
        # waits. (Threads sharing a scheduler see a stop when their sleep ends: the caller
        # checks it then.)
        clock.sleep(seconds)


class _Waiter:
    __slots__ = ("event", "slot")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.slot: Slot | None = None


class MemorySlotPool:
    """Slots shared by the threads of one process.

    A freed slot is handed straight to the longest waiter (it is never free in between), so
    a newcomer cannot overtake a waiter. Waits block on a ``threading.Event``. Slots are
    numbered as they are first taken, so a cap of a million costs what a cap of two does.
    """

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, not {capacity!r}")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._free: list[int] = []  # a stack of slots given back: the last one is taken first
        self._fresh = 0  # slots from here on were never taken
        self._waiters: deque[_Waiter] = deque()

    def acquire(self, max_wait_ns: int | None = None) -> Slot | None:
        with self._lock:
            if not self._waiters:
                if self._free:
                    return Slot(self._free.pop())
                if self._fresh < self.capacity:
                    self._fresh += 1
                    return Slot(self._fresh - 1)
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
            return self._fresh - len(self._free)

    def describe(self) -> str:
        return f"memory, {self.capacity} slots"

    def close(self) -> None:
        pass


class _ResourceWaiter:
    __slots__ = ("amounts", "event", "order", "slot")

    def __init__(self, amounts: dict[str, float], order: tuple[int, int]) -> None:
        self.amounts = amounts
        self.order = order  # (-priority, arrival): the line's sort key
        self.event = threading.Event()
        self.slot: Slot | None = None


class MemoryResourcePool:
    """Declared resources shared by the threads of one process.

    Waiters stand in a line sorted by priority, then arrival. Whoever frees amounts (a
    release, a waiter leaving the line) hands them to the head of the line while it fits,
    under the pool's lock, so a newcomer never takes what a waiter ahead of it is owed.
    Waits block on a ``threading.Event``.
    """

    def __init__(self, capacity: Mapping[str, float]) -> None:
        from ..limits.resources import parse_request

        self.capacity = parse_request(capacity)
        self._lock = threading.Lock()
        self._held: dict[str, dict[str, float]] = {}  # by the slot's token
        self._line: list[_ResourceWaiter] = []  # sorted by ``order``
        self._numbers = itertools.count()  # tokens, and arrival order in the line

    def acquire(
        self, amounts: Mapping[str, float], max_wait_ns: int | None = None, priority: int = 0
    ) -> Slot | None:
        from ..limits.resources import check_request, fits, parse_request, total_amounts

        wanted = parse_request(amounts)
        if not wanted:
            return Slot(-1)
        problem = check_request(wanted, self.capacity)
        if problem:
            raise ValueError(problem)
        with self._lock:
            line = self._line
            # Ahead of it: any waiter of its priority or higher (the line's head is the first).
            nobody_ahead = not line or line[0].order[0] > -priority
            if nobody_ahead and fits(wanted, total_amounts(self._held.values()), self.capacity):
                return self._hold(wanted)
            if max_wait_ns is not None and max_wait_ns <= 0:
                return None
            waiter = _ResourceWaiter(wanted, (-priority, next(self._numbers)))
            bisect.insort(line, waiter, key=lambda entry: entry.order)
        timeout = None if max_wait_ns is None else max_wait_ns / NANOS_PER_SECOND
        try:
            waiter.event.wait(timeout)
        except BaseException:  # interrupted (Ctrl-C): leave the line, give back what came
            handed = self._leave(waiter)
            if handed is not None:
                self.release(handed)
            raise
        return self._leave(waiter)  # amounts handed over just as the wait timed out are kept

    def _hold(self, amounts: dict[str, float]) -> Slot:
        """Under the lock: ``amounts`` held, under a new slot."""
        token = str(next(self._numbers))
        self._held[token] = amounts
        return Slot(-1, token)

    def _leave(self, waiter: _ResourceWaiter) -> Slot | None:
        """The slot handed to ``waiter``; if none, take the waiter out of the line (which may
        let the waiters behind it start: it no longer holds them up)."""
        with self._lock:
            if waiter.slot is None:
                self._line.remove(waiter)
                self._admit()
            return waiter.slot

    def _admit(self) -> None:
        """Under the lock: start the waiters at the head of the line while they fit."""
        from ..limits.resources import admissible, total_amounts

        line = self._line
        if not line:
            return
        count = admissible(
            [waiter.amounts for waiter in line], total_amounts(self._held.values()), self.capacity
        )
        for waiter in line[:count]:
            waiter.slot = self._hold(waiter.amounts)
            waiter.event.set()
        del line[:count]

    def release(self, slot: Slot) -> None:
        with self._lock:
            if not slot.live:
                return
            slot.live = False
            if self._held.pop(slot.token, None) is not None:
                self._admit()

    def in_use(self) -> dict[str, float]:
        from ..limits.resources import total_amounts

        with self._lock:
            return total_amounts(self._held.values())

    def first_waiting(self) -> int | None:
        with self._lock:
            return -self._line[0].order[0] if self._line else None

    def describe(self) -> str:
        from ..limits.resources import describe_amounts

        return f"memory, resources {describe_amounts(self.capacity)}"

    def close(self) -> None:
        pass
