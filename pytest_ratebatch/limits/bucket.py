"""The shared bucket's state, and how a throttle pauses it and lowers its rate.

A store keeps one ``BucketState`` for everyone who shares the bucket: the two GCRA times of
``gcra``, the adapted interval (``UNSET`` until a throttle), the tokens admitted so far, and
what the rate estimate needs. Everything here is pure integer arithmetic on it, in
nanoseconds of the store's clock; stores make each call atomic.

**Pause.** A throttle that asks to wait ``w`` pushes both GCRA times so that nothing is
admitted before ``now + w``, and the bucket is empty then: after a pause tests resume at the
rate, without a burst. Waiters already asleep wake, find the admissions moved, and wait on.

**Rate.** At a throttle the server's bucket is empty. Between two throttles it accepted
every token admitted in between but the one that failed, so ``elapsed / accepted`` is an
interval the server sustained (exact unless its bucket overflowed in between, and then an
upper bound: the estimate errs on the slow side). The first throttle has no earlier empty
moment: it takes what was accepted until then as spread over the server's wait, or, with a
rate configured, halves it. Without throttles the interval recovers toward the configured
one by 1/16 per period (at least a second, or four intervals), slowly, because each probe
above the server's rate costs a throttle.
"""

from __future__ import annotations

__all__ = [
    "MAX_REFILL_NS",
    "RECOVERY_PERIOD_NS",
    "RECOVERY_STEP",
    "UNSET",
    "BucketState",
    "current_interval",
    "throttle",
]

UNSET = -1
#: The longest a full burst may take to refill: 365 days (``limits.policy.MAX_SECONDS``).
MAX_REFILL_NS = 365 * 86_400 * 1_000_000_000
RECOVERY_STEP = 16  # the interval shortens by 1/16 per recovery period
RECOVERY_PERIOD_NS = 1_000_000_000


class BucketState:
    """One shared bucket. Times are the store's clock, in nanoseconds."""

    FIELDS = (
        "reserved",
        "admitted",
        "interval",
        "count",
        "mark_ns",
        "mark_count",
        "recover_at",
        "throttles",
    )
    __slots__ = FIELDS

    def __init__(
        self,
        reserved: int = 0,
        admitted: int = 0,
        interval: int = UNSET,
        count: int = 0,
        mark_ns: int = UNSET,
        mark_count: int = 0,
        recover_at: int = 0,
        throttles: int = 0,
    ) -> None:
        self.reserved = reserved  # GCRA: the reservations' theoretical arrival time
        self.admitted = admitted  # GCRA: the admissions' theoretical arrival time
        self.interval = interval  # the adapted interval; UNSET: the configured one applies
        self.count = count  # tokens admitted so far
        self.mark_ns = mark_ns  # the last throttle: the server's bucket was empty then
        self.mark_count = mark_count  # tokens admitted by then
        self.recover_at = recover_at  # when the adapted interval next shortens
        self.throttles = throttles

    def values(self) -> tuple[int, ...]:
        """The fields in ``FIELDS`` order (written out: every take of the file store, for a
        test or a call, writes them)."""
        return (
            self.reserved,
            self.admitted,
            self.interval,
            self.count,
            self.mark_ns,
            self.mark_count,
            self.recover_at,
            self.throttles,
        )

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)}" for name in self.FIELDS)
        return f"BucketState({fields})"


def _period(interval: int) -> int:
    return max(RECOVERY_PERIOD_NS, 4 * interval)


def current_interval(state: BucketState, now: int, configured: int) -> int:
    """The interval in force at ``now``: the configured one, or the adapted one after the
    recovery steps due by ``now`` (which it records)."""
    interval = state.interval
    if interval == UNSET:
        return configured
    recover_at = state.recover_at
    while now >= recover_at and interval > configured:
        # (at least 1: an interval under RECOVERY_STEP would never shorten)
        interval = max(configured, interval - max(1, interval // RECOVERY_STEP))
        recover_at += _period(interval)
    if interval <= configured:
        state.interval = UNSET
        return configured
    state.interval = interval
    state.recover_at = recover_at
    return interval


def throttle(
    state: BucketState,
    now: int,
    wait_ns: int,
    configured: int,
    burst: int,
    adapt: bool,
) -> tuple[int, int, int]:
    """A test was throttled at ``now`` and the server asked to wait ``wait_ns``.

    Pauses the bucket until ``now + wait_ns`` and, with ``adapt``, sets the interval the
    server seems to sustain. Returns the interval before and after, and the pause's end.
    """
    before = current_interval(state, now, configured)
    after = before
    accepted = state.count - state.mark_count - 1  # the throttled token was refused
    if adapt and (state.mark_ns == UNSET or accepted > 0):
        # (Nothing accepted since the last throttle: the same empty moment, seen by a test
        # that was in flight then. It extends the pause but says nothing new of the rate.)
        if state.mark_ns != UNSET and now > state.mark_ns:
            measured = (now - state.mark_ns) // accepted
        elif before > 0:
            measured = 2 * before
        else:  # unlimited until now: what was accepted, spread over the server's wait
            measured = max(wait_ns, RECOVERY_PERIOD_NS) // max(1, accepted)
        # However slow the server seemed, a full burst refills within MAX_REFILL_NS: the
        # bucket's times stay where every store keeps them exactly (the policy holds the
        # configured interval to the same bound).
        after = max(configured, min(measured, MAX_REFILL_NS // burst), 1)
        state.interval = after
        state.mark_ns = now
        state.mark_count = state.count
    until = now + wait_ns
    state.recover_at = until + _period(after)
    floor = until + (burst - 1) * after  # empty at the pause's end: no burst after it
    state.reserved = max(state.reserved, floor)
    state.admitted = max(state.admitted, floor)
    state.throttles += 1
    return before, after, until
