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
rings (lists in memory, fixed-size records in the file store, lists in Redis).
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

    __slots__ = ("admitted", "admitted_head", "count", "reserved", "reserved_head", "window")

    def __init__(self, count: int, window: int) -> None:
        self.count = count
        self.window = window
        self.reserved = [EMPTY] * count
        self.reserved_head = 0  # the oldest entry, where the next one goes
        self.admitted = [EMPTY] * count
        self.admitted_head = 0

    def earliest_start(self, cost: int) -> int:
        """The first start of ``cost`` this limit allows, by reservations and admissions."""
        reserved = self.reserved[(self.reserved_head + cost - 1) % self.count]
        admitted = self.admitted[(self.admitted_head + cost - 1) % self.count]
        return max(reserved, admitted) + self.window

    def earliest_admission(self, cost: int) -> int:
        """The first admission of ``cost`` the admissions so far allow."""
        return self.admitted[(self.admitted_head + cost - 1) % self.count] + self.window

    def last_reserved(self) -> int:
        return self.reserved[self.reserved_head - 1]

    def reserve(self, at: int, cost: int) -> None:
        self.reserved_head = _push(self.reserved, self.reserved_head, at, cost)

    def admit(self, at: int, cost: int) -> None:
        self.admitted_head = _push(self.admitted, self.admitted_head, at, cost)

    def save(self) -> None:
        pass  # nothing kept apart in memory

    def free(self, now: int) -> int:
        """How much could start at ``now`` by this limit alone."""
        since = now - self.window
        used = max(
            sum(entry > since for entry in self.reserved),
            sum(entry > since for entry in self.admitted),
        )
        return max(0, self.count - used)


def _push(ring: list[int], head: int, at: int, cost: int) -> int:
    size = len(ring)
    for _ in range(min(cost, size)):
        ring[head] = at
        head = (head + 1) % size
    return head
