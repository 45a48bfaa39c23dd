"""The token bucket as GCRA arithmetic on two numbers, in integer nanoseconds.

GCRA keeps a bucket in one number, the *theoretical arrival time* (TAT): the bucket is full
when TAT <= now, and every token pushes TAT one ``interval`` into the future. A request of
``cost`` tokens conforms at ``now`` when ``TAT + (cost - burst) * interval <= now``.

Two TATs make waiting exact without polling:

``reserved``
    advanced when a request reserves its slot; it orders waiters (FIFO) and tells each one
    how long to sleep.
``admitted``
    advanced when a request is admitted, at the clock reading of its admission. A waiter
    that wakes late is checked against it again, so the admissions themselves obey the bound
    ``cost(window) <= burst + window / interval`` whatever the wake-up jitter; one woken so
    late that it was overtaken queues again (``overtaken``).

A request admitted without waiting updates both in one step. Integers keep the arithmetic
exact. Everything here is pure and allocation-light (it runs once per test); stores wrap it
in their own atomicity (a lock, a file lock, a Lua script).
"""

from __future__ import annotations

__all__ = [
    "ADMITTED",
    "OVERTAKEN",
    "REFUSED",
    "RESERVED",
    "WAIT",
    "Outcome",
    "commit",
    "level",
    "overtaken",
    "take",
]

# Outcome status codes: plain ints, because this is the per-test hot path.
ADMITTED = 0  # tokens taken: the request may start now
RESERVED = 1  # slot reserved: sleep ``wait_ns``, then commit (unless reserve-only)
WAIT = 2  # commit not possible yet: sleep ``wait_ns`` and commit again
REFUSED = 3  # the slot is later than the caller accepts; nothing changed
OVERTAKEN = 4  # commit not possible: a later waiter took this slot; reserve a new one

#: ``(status, now_ns, wait_ns)``: the store's clock reading is the admission time if admitted.
Outcome = tuple[int, int, int]


def take(
    reserved: int,
    admitted: int,
    now: int,
    cost: int,
    interval: int,
    burst: int,
    max_wait: int | None = None,
    admit: bool = True,
) -> tuple[int, int, int, int]:
    """Reserve ``cost`` tokens behind every earlier reservation; admit too if no wait is needed.

    Returns ``(reserved, admitted, status, wait_ns)``. With ``admit=False`` (a batch holding
    its place) the tokens are only reserved; each test commits its own cost when it starts.
    """
    # Comparisons, not max(): this runs for every test, and a builtin call costs more.
    base = reserved if reserved > admitted else admitted
    if now > base:  # noqa: PLR1730
        base = now
    wait = base + (cost - burst) * interval - now
    if wait > 0:
        if max_wait is not None and wait > max_wait:
            return reserved, admitted, REFUSED, wait
        return base + cost * interval, admitted, RESERVED, wait
    if admit:
        return (
            base + cost * interval,
            (now if now > admitted else admitted) + cost * interval,
            ADMITTED,
            0,
        )
    return base + cost * interval, admitted, RESERVED, 0


def commit(
    reserved: int,
    admitted: int,
    now: int,
    cost: int,
    interval: int,
    burst: int,
    slot: int | None = None,
) -> tuple[int, int, int, int]:
    """Admit ``cost`` reserved tokens if the admissions so far leave room at ``now``.

    Given the waiter's ``slot``, a refusal says ``OVERTAKEN`` rather than ``WAIT`` when the
    waiter was overtaken, judged with ``interval``, the one in force (after adaptation).
    """
    wait = admitted + (cost - burst) * interval - now
    if wait > 0:
        if slot is not None and overtaken(slot, now, interval):
            return reserved, admitted, OVERTAKEN, wait
        return reserved, admitted, WAIT, wait
    return reserved, (now if now > admitted else admitted) + cost * interval, ADMITTED, 0


def overtaken(slot: int, now: int, interval: int) -> bool:
    """Whether a waiter due at ``slot``, refused by ``commit`` at ``now``, was overtaken.

    A later waiter is due at least one ``interval`` after it, so only a waiter woken that
    late can have lost its admission to one; it then reserves a new slot at the back of the
    line instead of racing each punctual waiter for theirs (and perhaps losing every time).
    A waiter refused earlier than that merely follows an admission that was itself late.
    """
    return now - slot >= interval


def level(reserved: int, admitted: int, now: int, interval: int, burst: int) -> float:
    """Tokens a request could take right now without waiting (0 to ``burst``)."""
    debt = max(reserved, admitted) - now
    if debt <= 0:
        return float(burst)
    return 0.0 if interval <= 0 else max(0.0, burst - debt / interval)
