"""The interfaces every store follows, and the error they raise.

A store makes one kind of shared state atomic for everyone who shares it: a
``BucketStore`` the token bucket and its window limits, a ``Ledger`` the session's batches
and stop, a ``SlotPool`` the concurrency cap's slots, a ``ResourcePool`` the amounts of
declared resources the tests in flight hold. The engine sees only these
interfaces; ``memory``, ``files`` and ``redis`` implement them, one module per backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from ..limits.batches import Entry, SessionState, StopRule
from ..limits.clock import Clock
from ..limits.gcra import Outcome

if TYPE_CHECKING:  # loaded with the first window limit: a session without one never needs it
    from ..limits.windows import WindowedOutcome, Windows

__all__ = ["BucketStore", "Ledger", "ResourcePool", "Slot", "SlotPool", "StoreError"]


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

    def commit(
        self, cost: int, interval_ns: int, burst: int, slot_ns: int | None = None
    ) -> Outcome:
        """Admit reserved tokens. Given the waiter's ``slot_ns`` (its admission time as
        reserved), a refusal is ``OVERTAKEN`` if a later waiter took that admission (judged
        with the interval in force, which only the store knows once it has adapted)."""
        ...

    def take_windowed(
        self,
        cost: int,
        interval_ns: int,
        burst: int,
        max_wait_ns: int | None,
        admit: bool,
        windows: Windows,
    ) -> WindowedOutcome:
        """``take`` under window limits too (``windows``): the outcome says which limit set
        the wait (``windows.RATE`` for the bucket, else the window's index + 1)."""
        ...

    def commit_windowed(
        self, cost: int, interval_ns: int, burst: int, slot_ns: int | None, windows: Windows
    ) -> WindowedOutcome:
        """``commit`` under window limits too."""
        ...

    def level(self, interval_ns: int, burst: int, windows: Windows = ()) -> float: ...

    def throttle(
        self, wait_ns: int, interval_ns: int, burst: int, adapt: bool
    ) -> tuple[int, int, int, int]:
        """A throttle: pause the bucket for ``wait_ns`` and, with ``adapt``, adapt its rate
        (``limits.bucket``). Returns the store's clock, the interval before and after, and
        the pause's end."""
        ...

    def describe(self) -> str:
        """A name safe to print (no credentials)."""
        ...


class Ledger(Protocol):
    """Atomic access to one ``SessionState``, and the two blocking waits of the barrier."""

    def enter(self, now: int, rule: StopRule, batch_size: int | None) -> Entry: ...

    def release(self, batch: int) -> None: ...

    def finish(self, batch: int, failed: bool, now: int) -> None: ...

    def leave(self, batch: int) -> None: ...

    def stop(self, reason: str) -> str:
        """Record ``reason`` unless the session already stopped; return the reason in force."""
        ...

    def check_stop(self, now: int, rule: StopRule) -> str: ...

    def wait_drained(self, batch: int) -> int:
        """Block until every test of ``batch`` finished; return when the last one did."""
        ...

    def wait_released(self, batch: int) -> None:
        """Block until ``batch`` was released or the session stopped."""
        ...

    def sleep(self, seconds: float, clock: Clock) -> None:
        """Sleep ``seconds`` on ``clock``, or less if a stop is recorded meanwhile, where the
        ledger can wake its sleepers (the caller checks the stop when this returns)."""
        ...

    def snapshot(self) -> SessionState: ...


class Slot:
    """A held slot: what ``acquire`` returns and ``release`` takes back (once).

    ``index`` numbers the pool's slots (0 to N - 1) where the pool has fixed slots (-1
    otherwise); ``token`` names a lease where the pool has leases (Redis), or a holding in a
    ``ResourcePool`` (``""``: a request of nothing, which holds nothing).
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


class ResourcePool(Protocol):
    """Amounts of declared resources (``limits.resources``) held by every user of the pool
    together, at most ``capacity`` of each, handed out in a strict line."""

    capacity: dict[str, float]

    def acquire(
        self, amounts: Mapping[str, float], max_wait_ns: int | None = None, priority: int = 0
    ) -> Slot | None:
        """Block until ``amounts`` fit in what the holders leave free and no waiter is ahead
        (waiters are served higher ``priority`` first, in arrival order within one); ``None``
        (holding nothing, out of the line) once ``max_wait_ns`` passed first (``0``: only if
        they fit now and nobody waits ahead). Empty ``amounts`` take nothing and never wait.

        ``ValueError`` for amounts that are not positive numbers or could never fit (they
        would hold up the line forever). May raise ``StoreError`` if a shared pool cannot be
        reached."""
        ...

    def release(self, slot: Slot) -> None:
        """Give the amounts back (the waiters at the head of the line that now fit start).
        Once per slot; never raises for a store that cannot be reached."""
        ...

    def in_use(self) -> dict[str, float]:
        """The amounts held right now by every user of the pool, by name (none: absent)."""
        ...

    def first_waiting(self) -> int | None:
        """The priority of the waiter at the head of the line (``None``: nobody waits)."""
        ...

    def describe(self) -> str:
        """A name safe to print (no credentials)."""
        ...

    def close(self) -> None: ...
