"""Window limits ("N per window", sliding) beside the GCRA bucket, in integer nanoseconds.

A limit of ``count`` starts per ``window`` holds over every window when a start of ``cost``
at ``t`` finds its ``cost``-th oldest of the last ``count`` starts at ``t - window`` or
earlier: then at most ``count - cost`` earlier starts fall inside ``(t - window, t]``. So
the whole state of a limit is a ring of its last ``count`` starts (a start of cost ``c``
is ``c`` entries), whatever the number of calls, and each check reads one entry.

Like the bucket (``gcra``), each limit keeps two logs:

``reserved``
    the planned start of every reservation, in arrival order; it orders waiters (FIFO) and
    tells each one how long to sleep;
``admitted``
    the actual admissions, on the store's clock when each is made; a waiter that wakes
    late is checked against them, so the admissions obey every window whatever the
    wake-up jitter.

A start is due at the latest of: the bucket's conforming time, every window's earliest
start, and the previous reservation (first come, first served). The functions here are
pure and take the ring entries the store read; stores make each call atomic and keep the
rings (lists in memory that grow with the entries pushed, fixed-size records in the file
store, read and written entry by entry, lists in Redis).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from . import gcra
from .bucket import UNSET, BucketState, current_interval
from .gcra import ADMITTED, OVERTAKEN, REFUSED, RESERVED, WAIT

__all__ = [
    "EMPTY",
    "RATE",
    "Log",
    "Ring",
    "WindowLog",
    "WindowedOutcome",
    "Windows",
    "commit",
    "commit_state",
    "take",
    "take_state",
]

#: A ring entry no start has filled yet: infinitely long ago.
EMPTY = -(2**62)

#: The ``bound`` of an outcome set by the bucket; window ``k`` (of the policy) is ``k + 1``.
RATE = 0

#: The limits as the stores get them: ``(count, window_ns)`` pairs, in the policy's order.
Windows = tuple[tuple[int, int], ...]

#: ``(status, now_ns, wait_ns, bound)``: ``gcra.Outcome`` and the limit that set the wait.
WindowedOutcome = tuple[int, int, int, int]


class Log(Protocol):
    """One limit's logs as a store keeps them (``WindowLog`` in memory, records in a file)."""

    def earliest_start(self, cost: int) -> int: ...
    def earliest_admission(self, cost: int) -> int: ...
    def last_reserved(self) -> int: ...
    def reserve(self, at: int, cost: int) -> None: ...
    def admit(self, at: int, cost: int) -> None: ...
    def save(self) -> None:
        """After ``reserve``/``admit``, once per operation: whatever the store keeps apart."""


def take(
    reserved: int,
    admitted: int,
    now: int,
    cost: int,
    interval: int,
    burst: int,
    max_wait: int | None,
    admit: bool,
    earliest: Sequence[int],
    last: int,
) -> tuple[int, int, int, int, int]:
    """``gcra.take`` with window limits: ``earliest[k]`` is the first start window ``k``
    allows (from both its logs), ``last`` the newest reservation.

    Returns ``(reserved, admitted, status, wait_ns, bound)``; ``start = now + wait_ns`` is
    the reservation's planned start, which the store logs (and, if admitted, the admission).
    """
    base = max(reserved, admitted, now)
    rate_start = base + (cost - burst) * interval
    start, bound = max(rate_start, last), RATE
    latest, latest_bound = start, RATE  # the most binding window, even if FIFO binds more
    for index, window_start in enumerate(earliest, 1):
        if latest_bound == RATE or window_start > latest:
            latest, latest_bound = window_start, index
    if latest > start or (latest_bound != RATE and last >= rate_start):
        # A window holds it, or it queues behind earlier starts that windows hold.
        start, bound = max(start, latest), latest_bound
    wait = start - now
    if wait > 0:
        if max_wait is not None and wait > max_wait:
            return reserved, admitted, REFUSED, wait, bound
        return max(base, start) + cost * interval, admitted, RESERVED, wait, bound
    if admit:
        return base + cost * interval, max(admitted, now) + cost * interval, ADMITTED, 0, bound
    return base + cost * interval, admitted, RESERVED, 0, bound


def commit(
    reserved: int,
    admitted: int,
    now: int,
    cost: int,
    interval: int,
    burst: int,
    slot: int | None,
    earliest: Sequence[int],
) -> tuple[int, int, int, int, int]:
    """``gcra.commit`` with window limits: ``earliest[k]`` is the first start window ``k``'s
    admissions allow. Returns ``(reserved, admitted, status, wait_ns, bound)``."""
    rate_wait = admitted + (cost - burst) * interval - now
    wait, bound = rate_wait, RATE
    for index, window_start in enumerate(earliest, 1):
        if window_start - now > wait:
            wait, bound = window_start - now, index
    if wait > 0:
        # Only the bucket hands a slot to a later waiter; a window refuses everyone alike.
        if slot is not None and rate_wait > 0 and gcra.overtaken(slot, now, interval):
            return reserved, admitted, OVERTAKEN, wait, bound
        return reserved, admitted, WAIT, wait, bound
    return reserved, max(admitted, now) + cost * interval, ADMITTED, 0, bound


def take_state(
    state: BucketState,
    logs: Sequence[Log],
    now: int,
    cost: int,
    interval: int,
    burst: int,
    max_wait: int | None,
    admit: bool,
) -> WindowedOutcome:
    """``take`` on a store's state and logs, updating them: the body of a store's atomic
    operation (memory and file stores)."""
    if state.interval != UNSET:
        interval = current_interval(state, now, interval)
    earliest = [log.earliest_start(cost) for log in logs]
    state.reserved, state.admitted, status, wait, bound = take(
        state.reserved, state.admitted, now, cost, interval, burst, max_wait, admit,
        earliest, logs[0].last_reserved(),
    )  # fmt: skip
    if status != REFUSED:
        admitted = status == ADMITTED
        if admitted:
            state.count += cost
        for log in logs:
            log.reserve(now + wait, cost)
            if admitted:
                log.admit(now, cost)
            log.save()
    return status, now, wait, bound


def commit_state(
    state: BucketState,
    logs: Sequence[Log],
    now: int,
    cost: int,
    interval: int,
    burst: int,
    slot: int | None,
) -> WindowedOutcome:
    """``commit`` on a store's state and logs, updating them."""
    if state.interval != UNSET:
        interval = current_interval(state, now, interval)
    earliest = [log.earliest_admission(cost) for log in logs]
    state.reserved, state.admitted, status, wait, bound = commit(
        state.reserved, state.admitted, now, cost, interval, burst, slot, earliest
    )
    if status == ADMITTED:
        state.count += cost
        for log in logs:
            log.admit(now, cost)
            log.save()
    return status, now, wait, bound


class WindowLog:
    """One limit's two rings, in memory (the memory store's, and the file store's model)."""

    __slots__ = ("admitted", "count", "reserved", "window")

    def __init__(self, count: int, window: int) -> None:
        self.count = count
        self.window = window
        self.reserved = Ring(count)
        self.admitted = Ring(count)

    def earliest_start(self, cost: int) -> int:
        """The first start of ``cost`` this limit allows, by reservations and admissions."""
        return max(self.reserved.oldest(cost), self.admitted.oldest(cost)) + self.window

    def earliest_admission(self, cost: int) -> int:
        """The first admission of ``cost`` the admissions so far allow."""
        return self.admitted.oldest(cost) + self.window

    def last_reserved(self) -> int:
        return self.reserved.newest()

    def reserve(self, at: int, cost: int) -> None:
        self.reserved.push(at, cost)

    def admit(self, at: int, cost: int) -> None:
        self.admitted.push(at, cost)

    def save(self) -> None:
        pass  # nothing kept apart in memory

    def free(self, now: int) -> int:
        """How much could start at ``now`` by this limit alone."""
        since = now - self.window
        used = max(self.reserved.newer_than(since), self.admitted.newer_than(since))
        return max(0, self.count - used)


class Ring:
    """The last ``count`` entries pushed, as a ring that grows with what was pushed (up to
    ``count``), not allocated at ``count``: a limit of 10,000,000 per day that saw three
    starts holds three entries. Entries never pushed count as ``EMPTY``."""

    __slots__ = ("count", "entries", "head")

    def __init__(self, count: int) -> None:
        self.count = count
        self.entries: list[int] = []
        self.head = 0  # once full, the oldest entry, where the next one goes

    def oldest(self, rank: int) -> int:
        """The ``rank``-th oldest (from 1) of the last ``count`` entries."""
        entries = self.entries
        missing = self.count - len(entries)
        if rank <= missing:
            return EMPTY
        return entries[(self.head + rank - missing - 1) % len(entries)]

    def newest(self) -> int:
        entries = self.entries
        return entries[self.head - 1] if entries else EMPTY

    def push(self, at: int, cost: int) -> None:
        entries = self.entries
        cost = min(cost, self.count)
        grow = min(cost, self.count - len(entries))
        if grow:
            entries.extend([at] * grow)  # still filling: the oldest stays first
            cost -= grow
        head = self.head
        for _ in range(cost):
            entries[head] = at
            head = (head + 1) % self.count
        self.head = head

    def newer_than(self, since: int) -> int:
        return sum(entry > since for entry in self.entries)
