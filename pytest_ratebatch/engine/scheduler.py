"""``TaskScheduler``: admits each test at its start, or cancels it. Knows nothing of pytest.

For every test, in the process that runs it: check the stop conditions, then (batched) join
the current batch or open the next one, which means waiting for the previous batch to drain,
for the backoff, and for the whole batch's tokens; then, with a concurrency cap, take a slot;
finally take the test's own tokens. The slot comes before the tokens: tokens taken before a
wait for a slot would let starts bunch up past the rate once slots free up. A batched test
takes its slot only once its batch is released: holding one while waiting for the previous
batch to drain could starve that batch's own members. Which limiter store, ledger and slot
pool it talks to is the caller's choice.

Every sleep of an admission (for tokens, for a batch's backoff) sleeps on the ledger, which
wakes it when a stop is recorded where it can (the file ledger: any worker's stop), and
checks the stop when it wakes: a test waiting when the session stops is cancelled, never
started. The tokens such a waiter reserved stay reserved: a GCRA bucket's tokens are time, so
they hold back later starts by the waiter's own cost in intervals, once, and are never lost
for good; and after a stop its session starts nothing more anyway.

With a start line (``open_start_line``: priorities stated, or other sessions on the store),
an unbatched start takes its tokens only in its turn: starts waiting for tokens when they
come due, in any worker or session on the store, take them highest ``priority`` first, in
arrival order within one. Nothing is reserved further ahead than a short lead: a start
whose tokens are further off holds its turn while it sleeps, and gives it up to a start of a
higher priority that came meanwhile, which then goes first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..limits.batches import StopRule
from ..limits.clock import MONOTONIC, Clock
from ..limits.policy import NANOS_PER_SECOND, ExecutionPolicy, format_duration
from ..stores.base import Ledger, StoreError
from ..stores.memory import MemoryLedger
from .limiter import UNLIMITED, RateLimiter

if TYPE_CHECKING:
    from ..stores.base import ResourcePool, Slot, SlotPool
    from .gates import Gates

__all__ = [
    "START_TURN",
    "TURN_LEAD_NS",
    "OnWait",
    "SlotTicket",
    "TaskScheduler",
    "Ticket",
    "WaitCancelled",
    "line_rank",
]

#: How often a test retries while the batch it waits for is being opened by a new opener.
ORPHAN_RETRY_SECONDS = 0.01

#: A wait for a slot at least this long (and most of the test's wait) names the cap as the
#: limit the test waited for; shorter ones are only the time to take a free slot.
SLOT_WAIT_NAMED_NS = 1_000_000

#: Called before a wait of known length: ``on_wait(what, seconds)``.
OnWait = Callable[[str, float], None]

#: What a start holds from the start line while it takes its tokens: the one turn.
START_TURN = {"turn": 1.0}

#: A start takes its tokens when they are due within this (and three round trips to the
#: store); further off, it sleeps until then, in the start line. Longer than a wake-up and a
#: turn's hand-over take (the file store's line is looked at every 5-20 ms).
TURN_LEAD_NS = 25_000_000

#: A start waits for its turn in the start line this long at most before it looks at the
#: session's stop (and stands in line again, at its rank).
TURN_SLICE_NS = 500_000_000

#: Arrivals ranked within a priority, in hundredths of a second of the wall clock (shared by
#: the processes of a machine, and close enough across machines).
_ARRIVAL_UNIT_NS = 10_000_000
_ARRIVALS = 1 << 32  # 497 days of hundredths: the ranks of one priority never overlap another's


def line_rank(priority: int, arrived_wall_ns: int) -> int:
    """A start's rank in the start line (higher first): its priority, then the earlier
    arrival. The line orders equal ranks by the moment they stood in it; a start stands in
    it again after it gave its turn up, or a slice of its wait passed, so its first arrival
    is folded into the rank to keep its place.
    Exact in Redis (a double): ``MAX_PRIORITY`` times ``2**32`` is below ``2**53``."""
    arrival = (arrived_wall_ns // _ARRIVAL_UNIT_NS) % _ARRIVALS
    return priority * _ARRIVALS + (_ARRIVALS - 1 - arrival)


class WaitCancelled(Exception):
    """The session stopped while a test waited for its admission (raised by the scheduler's
    sleep, through the limiter, and turned into a cancelled ticket)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Ticket:
    """The scheduler's answer for one test: admitted (``cancelled`` empty) or cancelled."""

    __slots__ = ("batch", "cancelled", "limit", "start_ns", "store_ns", "tokens", "waited_ns")

    #: The concurrency slot the test holds until ``finish`` (``SlotTicket``: with a cap).
    slot: Slot | None = None
    #: Of ``waited_ns``, the wait for that slot.
    slot_wait_ns: int = 0

    def __init__(
        self,
        batch: int,
        tokens: int,
        start_ns: int,
        waited_ns: int,
        cancelled: str = "",
        store_ns: int | None = None,
    ) -> None:
        self.batch = batch  # 0 when unbatched
        self.tokens = tokens
        self.start_ns = start_ns  # when admitted, on the scheduler's (monotonic) clock
        self.waited_ns = waited_ns  # in all, from arrival to admission (or cancellation)
        self.cancelled = cancelled  # the stop reason, e.g. "max failures (3) reached"
        self.store_ns = store_ns  # the admission on the store's own clock, if it has one
        self.limit = ""  # the limit it waited for longest, if it waited for one (e.g. 10/2s)

    def __repr__(self) -> str:
        names = (*Ticket.__slots__, "slot", "slot_wait_ns")
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
        return f"Ticket({fields})"


class SlotTicket(Ticket):
    """A ticket under a concurrency cap: it carries the slot and the wait for it (a subclass,
    so that tickets without a cap cost nothing more)."""

    __slots__ = ("slot", "slot_wait_ns")

    def __init__(
        self, ticket: Ticket, slot: Slot | None, slot_wait_ns: int, gate: str = "concurrency"
    ) -> None:
        super().__init__(
            ticket.batch,
            ticket.tokens,
            ticket.start_ns,
            ticket.waited_ns,
            ticket.cancelled,
            ticket.store_ns,
        )
        self.slot = slot
        self.slot_wait_ns = slot_wait_ns
        self.limit = ticket.limit
        if slot_wait_ns >= SLOT_WAIT_NAMED_NS and 2 * slot_wait_ns > ticket.waited_ns:
            self.limit = gate  # the slot (the cap, resources, the machine) took most of it


class TaskScheduler:
    """Batches, the barrier between them, backoff, stop conditions and rate, per test."""

    def __init__(
        self,
        policy: ExecutionPolicy,
        *,
        limiter: RateLimiter | None = None,
        ledger: Ledger | None = None,
        clock: Clock = MONOTONIC,
        session_start_ns: int | None = None,
        on_wait: OnWait | None = None,
        slots: SlotPool | None = None,
        gates: Gates | None = None,
    ) -> None:
        self.policy = policy
        self.ledger: Ledger = ledger if ledger is not None else MemoryLedger()
        self._clock = clock
        if limiter is None and (policy.rate_limit is not None or policy.windows):
            limiter = RateLimiter(
                policy.rate_limit or UNLIMITED, clock=clock, windows=policy.windows
            )
        self.limiter = limiter
        if limiter is not None:
            limiter.sleep = self._sleep  # a stop ends the waits for tokens
        #: Seconds waited for each limit (by its name: ``rate``, ``10/2s``, ``concurrency``),
        #: in this process.
        self.waited_by_limit: dict[str, float] = {}
        self._waited_on = ""  # the limit the test being admitted waited for longest
        self._longest_wait = 0.0
        self._local_clock = limiter is None or limiter.store.local_clock
        self._on_wait = on_wait
        self._on_tokens = self._waiter("rate tokens") if limiter is not None else None
        if slots is None and policy.max_concurrency is not None:
            from ..stores.memory import MemorySlotPool

            slots = MemorySlotPool(policy.max_concurrency)
        #: The declared resources and the machine's gates, around the cap (``None``: none).
        self.gates = gates
        if gates is not None:
            gates.sleep = self._sleep_unless_stopped
            slots = gates  # taken as one slot, where the cap's is
        #: The concurrency cap's slots (``None``: no cap), or the gates around them.
        self.slots = slots
        #: Of the last slot taken, the gate that held it longest (named in its ticket).
        self._gate = "concurrency"
        #: Unbatched and uncapped: a start only takes its tokens (``acquire``).
        self.direct = policy.batch_size is None and slots is None
        #: Opens the line starts stand in for their tokens, by priority, when they must wait
        #: (``None``: they take them in arrival order); opened at the first such wait.
        self.open_start_line: Callable[[], ResourcePool] | None = None
        self._start_line: ResourcePool | None = None
        #: The priority of the test being admitted, its place in the start line.
        self.priority = 0
        if slots is not None:
            # Chosen once here, so that ``finish`` costs nothing more without a cap.
            self.finish = self._finish_releasing  # type: ignore[method-assign]
        start = clock.now_ns() if session_start_ns is None else session_start_ns
        timeout = policy.total_timeout
        self._stop_rule = StopRule(
            policy.max_failures,
            None if timeout is None else start + int(timeout * NANOS_PER_SECOND),
            "" if timeout is None else format_duration(timeout),
        )

    @property
    def deadline_ns(self) -> int | None:
        """When the total timeout passes, on the scheduler's clock (``None``: never)."""
        return self._stop_rule.deadline_ns

    @property
    def stop_reason(self) -> str:
        return self.ledger.snapshot().stop_reason

    def admit(self, cost: int = 1, batch_cost: int | None = None) -> Ticket:
        """Block until the test may start, or return a cancelled ticket; never raises on a stop.

        ``cost`` is the test's own tokens (0: exempt from batches and the rate, but not from a
        stop); ``batch_cost`` what the batch this test may open is expected to cost in all
        (default: the batch size times ``cost``).
        """
        if self.direct or not cost:  # exempt tests (cost 0) take no batch, no slot
            return self.acquire(cost, start=True)  # no batch to join: its own tokens
        if self.policy.batch_size is None:
            return self._admit_unbatched(cost)
        arrived = self._clock.now_ns()
        try:
            return self._admit(cost, batch_cost, arrived)
        except StoreError as error:
            reason = self.ledger.stop(f"store unavailable: {error}")
            return self._cancelled(reason, arrived)
        except WaitCancelled as stopped:  # the batch was left on the way out
            return self._cancelled(stopped.reason, arrived)

    def _cancelled(self, reason: str, arrived: int) -> Ticket:
        now = self._clock.now_ns()
        return Ticket(0, 0, now, now - arrived, reason)

    def _admit(self, cost: int, batch_cost: int | None, arrived: int) -> Ticket:
        batch_size = self.policy.batch_size
        on_tokens = self._on_tokens
        now = arrived
        while True:
            entry = self.ledger.enter(now, self._stop_rule, batch_size)
            if entry.action == "cancel":
                return self._cancelled(entry.reason, arrived)
            if entry.action == "wait":
                self.ledger.wait_released(entry.batch)
                state = self.ledger.snapshot()
                if state.batch == entry.batch and not state.released and not state.stop_reason:
                    # Its opener died; a member is taking over. Do not spin meanwhile.
                    self._clock.sleep(ORPHAN_RETRY_SECONDS)
                now = self._clock.now_ns()
                continue
            reason = ""
            try:
                if entry.action == "open":
                    expected = batch_cost if batch_cost is not None else cost * (batch_size or 1)
                    reason = self._open(entry.batch, expected)
                elif entry.action == "join":
                    self.ledger.wait_released(entry.batch)
                    reason = self.ledger.check_stop(self._clock.now_ns(), self._stop_rule)
                    state = self.ledger.snapshot()
                    if not reason and state.batch == entry.batch and not state.released:
                        reason = self._open(entry.batch, cost * (batch_size or 1))  # opener died
                if not reason:
                    if self.slots is not None:
                        return self._start_member(entry.batch, cost, arrived)
                    limiter = self.limiter  # ``_commit_tokens``, one call less per member
                    store_ns = None if limiter is None else limiter.commit(cost, on_wait=on_tokens)
            except BaseException:
                self.ledger.leave(entry.batch)
                raise
            if reason:
                self.ledger.leave(entry.batch)
                return self._cancelled(reason, arrived)
            if store_ns is not None and self._local_clock and not self._waited_on:
                return Ticket(entry.batch, cost, store_ns, store_ns - arrived)  # as ``_admitted``
            return self._admitted(entry.batch, cost, store_ns, arrived)

    def _start_member(self, batch: int, cost: int, arrived: int) -> Ticket:
        """A member of a released batch, under a cap: its slot, then its own tokens. Leaves
        the batch if the session stopped meanwhile; the caller leaves it if this raises."""
        slot_wait, slot, reason = self._take_slot(check_after=True)
        if reason:
            self.ledger.leave(batch)
            return SlotTicket(self._cancelled(reason, arrived), None, slot_wait, self._gate)
        assert slot is not None
        try:
            store_ns = self._commit_tokens(cost)
        except BaseException:
            self._give_back(slot)
            raise
        ticket = self._admitted(batch, cost, store_ns, arrived)
        return SlotTicket(ticket, slot, slot_wait, self._gate)

    def _admit_unbatched(self, cost: int) -> Ticket:
        """An unbatched test under a concurrency cap: a slot first, then its tokens."""
        slots = self.slots
        assert slots is not None
        arrived = self._clock.now_ns()
        slot_wait = 0
        try:
            reason = self.ledger.check_stop(arrived, self._stop_rule)
            if not reason:
                slot_wait, slot, reason = self._take_slot(check_after=False)
        except StoreError as error:
            reason = self.ledger.stop(f"store unavailable: {error}")
        if reason:
            return SlotTicket(self._cancelled(reason, arrived), None, slot_wait, self._gate)
        assert slot is not None
        try:
            # Checks the stop conditions again: a wait may be long.
            ticket = self.acquire(cost, start=True)
        except BaseException:
            slots.release(slot)
            raise
        if ticket.cancelled:
            slots.release(slot)
            slot = None
        ticket.waited_ns = self._clock.now_ns() - arrived  # the slot's wait included
        return SlotTicket(ticket, slot, slot_wait, self._gate)

    def _take_slot(self, check_after: bool) -> tuple[int, Slot | None, str]:
        """A slot, waiting at most until the total timeout: ``(wait, slot, "")``, or
        ``(wait, None, stop reason)``. With ``check_after``, a stop while waiting (checked
        once the slot is got) cancels the test too (else the caller checks)."""
        slots = self.slots
        assert slots is not None
        began = self._clock.now_ns()
        deadline = self._stop_rule.deadline_ns
        try:
            slot = slots.acquire(None if deadline is None else max(0, deadline - began))
        except WaitCancelled as stopped:  # a gate's wait, when the session stopped
            return self._clock.now_ns() - began, None, stopped.reason
        now = self._clock.now_ns()
        wait = now - began
        waited = self.waited_by_limit
        gates = self.gates
        if gates is None:
            waited["concurrency"] = waited.get("concurrency", 0.0) + wait / NANOS_PER_SECOND
        else:  # each gate's own wait
            for name, gate_wait in gates.waits.items():
                waited[name] = waited.get(name, 0.0) + gate_wait / NANOS_PER_SECOND
            self._gate = max(gates.waits, key=gates.waits.__getitem__, default="concurrency")
        if slot is None:
            if gates is not None and gates.blocked:  # a gate held it to the deadline
                reason = f"total timeout ({self._stop_rule.timeout_text}) reached; {gates.blocked}"
                return wait, None, self.ledger.stop(reason)
            reason = self.ledger.check_stop(max(now, deadline or now), self._stop_rule)
            return wait, None, reason or self.ledger.stop(self._timeout_ahead())
        if not check_after:
            return wait, slot, ""
        try:
            reason = self.ledger.check_stop(now, self._stop_rule)
        except BaseException:
            slots.release(slot)
            raise
        if reason:
            slots.release(slot)
            return wait, None, reason
        return wait, slot, ""

    def _admitted(self, batch: int, cost: int, store_ns: int | None, arrived: int) -> Ticket:
        if store_ns is not None and self._local_clock:
            # The exact admission time, on this clock: no need to read it again.
            ticket = Ticket(batch, cost, store_ns, store_ns - arrived)
        else:
            now = self._clock.now_ns()
            ticket = Ticket(batch, cost, now, now - arrived, store_ns=store_ns)
        if self._waited_on:
            ticket.limit = self._waited_on
            self._waited_on = ""
            self._longest_wait = 0.0
        return ticket

    def acquire(self, cost: int, start: bool = False) -> Ticket:
        """Tokens outside any batch, for an unbatched test's ``start`` (in the start line, if
        there is one) or a running test: a ticket, or a cancelled one."""
        arrived = self._clock.now_ns()
        store_ns = None
        try:
            reason = self.ledger.check_stop(arrived, self._stop_rule)
            limiter = self.limiter
            if not reason and limiter is not None and cost:
                if start and self.open_start_line is not None:
                    store_ns = self._take_in_line(limiter, cost)
                else:
                    deadline = self._stop_rule.deadline_ns
                    max_wait = None if deadline is None else max(0, deadline - arrived)
                    store_ns = limiter.take(cost, max_wait, self._on_tokens)
                if store_ns is None:
                    reason = self.ledger.stop(self._timeout_ahead())
        except StoreError as error:
            reason = self.ledger.stop(f"store unavailable: {error}")
        except WaitCancelled as stopped:
            reason = stopped.reason
        if reason:
            return self._cancelled(reason, arrived)
        if store_ns is not None and self._local_clock and not self._waited_on:
            return Ticket(0, cost, store_ns, store_ns - arrived)  # ``_admitted``, one call less
        return self._admitted(0, cost, store_ns, arrived)

    def _take_in_line(self, limiter: RateLimiter, cost: int) -> int | None:
        """A start's tokens: at once if they are due within ``TURN_LEAD_NS``, else in its
        turn in the start line (the lead then grows by three of the store's round trips).
        The admission time on the store's clock, or ``None`` if the total timeout would pass
        first.

        The line hands the turn out by rank (``line_rank``: priority, then arrival). Its
        holder sleeps until shortly before its tokens are due, then takes them, unless a
        start of a higher rank waits by then: it lets that one go first and stands in line
        again. So the tokens go to the highest priority waiting when they come due, and none
        is reserved further ahead than the lead."""
        on_tokens = self._on_tokens
        assert on_tokens is not None
        clock = self._clock
        asked = clock.now_ns()
        admitted, wait = limiter.take_within(cost, TURN_LEAD_NS, on_tokens)
        if admitted is not None:
            return admitted
        # Waking, looking at the line and taking are two round trips to the store: a far
        # one (a Redis server across a network) needs a longer lead.
        lead = TURN_LEAD_NS + 3 * (clock.now_ns() - asked)
        rule = self._stop_rule
        deadline = rule.deadline_ns
        if deadline is not None and clock.now_ns() + wait > deadline:
            return None
        line = self._start_line
        if line is None:
            assert self.open_start_line is not None
            line = self._start_line = self.open_start_line()
        rank = line_rank(self.priority, time.time_ns())
        while True:
            turn = self._turn(line, rank, limiter)
            if turn is None:
                return None
            try:
                while True:
                    admitted, wait = limiter.take_within(cost, lead, on_tokens)
                    if admitted is not None:
                        return admitted
                    if deadline is not None and clock.now_ns() + wait > deadline:
                        return None
                    seconds = (wait - lead) / NANOS_PER_SECOND
                    on_tokens(seconds)  # accounted to the limit that set ``wait``
                    self._sleep(seconds)  # ``WaitCancelled`` at a stop
                    first = line.first_waiting()
                    if first is not None and first > rank:
                        break  # a higher rank came meanwhile: it goes first
            finally:
                line.release(turn)

    def _turn(self, line: ResourcePool, rank: int, limiter: RateLimiter) -> Slot | None:
        """The start line's turn for ``rank``; ``None`` at the total timeout. Asked for in
        slices of ``TURN_SLICE_NS``, the stop checked between them (``WaitCancelled``): the
        pools know nothing of the session's stop. The rank keeps the place in between. The
        wait counts as one for the limit that bound the tokens (the starts ahead took them)."""
        clock = self._clock
        rule = self._stop_rule
        deadline = rule.deadline_ns
        began = clock.now_ns()
        while True:
            now = clock.now_ns()
            reason = self.ledger.check_stop(now, rule)
            if reason:
                raise WaitCancelled(reason)
            left = TURN_SLICE_NS if deadline is None else min(TURN_SLICE_NS, deadline - now)
            if left <= 0:
                return None
            turn = line.acquire(START_TURN, left, rank)
            if turn is not None:
                break
        waited = clock.now_ns() - began
        if waited >= SLOT_WAIT_NAMED_NS:
            limit = limiter.limit_names[limiter.last_bound]
            self._account(limit, waited / NANOS_PER_SECOND)
        try:
            reason = self.ledger.check_stop(clock.now_ns(), rule)
        except BaseException:
            line.release(turn)
            raise
        if reason:
            line.release(turn)
            raise WaitCancelled(reason)
        return turn

    async def acquire_async(self, cost: int) -> Ticket:
        """``acquire`` for a coroutine: the wait is an ``await``, so the event loop runs on.
        A stop is seen before the wait and after it (a wait in progress runs to its end)."""
        arrived = self._clock.now_ns()
        store_ns = None
        try:
            reason = self.ledger.check_stop(arrived, self._stop_rule)
            limiter = self.limiter
            if not reason and limiter is not None and cost:
                deadline = self._stop_rule.deadline_ns
                max_wait = None if deadline is None else max(0, deadline - arrived)
                store_ns = await limiter.acquire_async(cost, self._on_tokens, max_wait)
                if store_ns is None:
                    reason = self.ledger.stop(self._timeout_ahead())
                else:
                    reason = self.ledger.check_stop(self._clock.now_ns(), self._stop_rule)
        except StoreError as error:
            reason = self.ledger.stop(f"store unavailable: {error}")
        if reason:
            return self._cancelled(reason, arrived)
        return self._admitted(0, cost, store_ns, arrived)

    def finish(self, ticket: Ticket, failed: bool) -> None:
        """The admitted test of ``ticket`` finished; ``failed`` if it failed or errored."""
        if ticket.cancelled:
            return
        if failed:
            now = self._clock.now_ns()
            self.ledger.finish(ticket.batch, True, now)
            if self._stop_rule.max_failures is not None:
                # Record the stop this failure may bring now: that wakes the tests waiting.
                self.ledger.check_stop(now, self._stop_rule)
        elif ticket.batch:  # an unbatched test that passed changes nothing shared
            self.ledger.finish(ticket.batch, False, self._clock.now_ns())

    def _finish_releasing(self, ticket: Ticket, failed: bool) -> None:
        """``finish`` under a concurrency cap: then give the test's slot back. After the
        ledger heard of the finish, so that a waiter the slot wakes sees a stop it caused."""
        try:
            TaskScheduler.finish(self, ticket, failed)
        finally:
            slot = ticket.slot
            if slot is not None:
                assert isinstance(ticket, SlotTicket)
                ticket.slot = None
                self._give_back(slot)

    def _give_back(self, slot: Slot) -> None:
        assert self.slots is not None
        self.slots.release(slot)

    def _open(self, batch: int, expected_cost: int) -> str:
        """Pass the barrier, the backoff and the batch's tokens, then release the batch.

        Returns a stop reason instead if the session must stop.
        """
        drained_ns = self.ledger.wait_drained(batch - 1)
        now = self._clock.now_ns()
        reason = self.ledger.check_stop(now, self._stop_rule)
        if reason:
            return reason
        backoff_ns = int(self.policy.batch_backoff * NANOS_PER_SECOND)
        if batch > 1 and backoff_ns:
            until = drained_ns + backoff_ns
            if self._past_deadline(until):
                return self.ledger.stop(self._timeout_ahead())
            if until > now:
                self._wait("batch backoff", until - now)
        limiter = self.limiter
        if limiter is not None:
            # The batch's cost, or the burst if it costs more: then its tests beyond the
            # burst are paced one by one as they start (each takes its own tokens).
            tokens = min(expected_cost, limiter.largest)
            admission = limiter.admit(
                tokens,
                timeout=self._time_left(),
                reserve_only=True,
                on_wait=self._waiter(f"rate tokens for batch {batch}"),
            )
            if admission is None:
                return self.ledger.stop(self._timeout_ahead())
        self.ledger.release(batch)
        return ""

    def _commit_tokens(self, cost: int) -> int | None:
        """A batch member's own tokens, from its batch's reservation: the admission time on
        the store's clock (``None`` if nothing was taken)."""
        if self.limiter is None:
            return None
        return self.limiter.commit(cost, on_wait=self._on_tokens)

    def _time_left(self) -> float | None:
        deadline = self._stop_rule.deadline_ns
        if deadline is None:
            return None
        return max(0, deadline - self._clock.now_ns()) / NANOS_PER_SECOND

    def _past_deadline(self, when_ns: int) -> bool:
        deadline = self._stop_rule.deadline_ns
        return deadline is not None and when_ns >= deadline

    def _timeout_ahead(self) -> str:
        return f"total timeout ({self._stop_rule.timeout_text}) would pass before the next start"

    def _waiter(self, what: str) -> Callable[[float], None]:
        """Before each sleep for tokens: account it to the limit that set it, announce it."""
        on_wait = self._on_wait
        limiter = self.limiter
        assert limiter is not None

        def waiting(seconds: float) -> None:
            self._account(limiter.limit_names[limiter.last_bound], seconds)
            if on_wait is not None:
                on_wait(what, seconds)

        return waiting

    def _account(self, limit: str, seconds: float) -> None:
        """A wait of the test being admitted, for ``limit``."""
        self.waited_by_limit[limit] = self.waited_by_limit.get(limit, 0.0) + seconds
        if seconds > self._longest_wait:
            self._waited_on, self._longest_wait = limit, seconds

    def _wait(self, what: str, wait_ns: int) -> None:
        seconds = wait_ns / NANOS_PER_SECOND
        if self._on_wait is not None:
            self._on_wait(what, seconds)
        self._sleep(seconds)

    def _sleep_unless_stopped(self, seconds: float) -> None:
        """A gate's sleep (``engine.gates``): on the ledger, raising ``WaitCancelled`` if a
        stop was recorded meanwhile; the gate itself watches the total timeout, to name what
        it waited for when it passes."""
        self.ledger.sleep(seconds, self._clock)
        reason = self.ledger.snapshot().stop_reason
        if reason:
            raise WaitCancelled(reason)

    def _sleep(self, seconds: float) -> None:
        """Every sleep of an admission (the limiter's too): on the ledger, which wakes it
        early where it can when a stop is recorded; the stop checked when it wakes. Raises
        ``WaitCancelled`` if the session stopped: the waiting test must not start."""
        clock = self._clock
        ledger = self.ledger
        rule = self._stop_rule
        end = clock.now_ns() + round(seconds * NANOS_PER_SECOND)
        while True:
            ledger.sleep(seconds, clock)
            now = clock.now_ns()
            reason = ledger.check_stop(now, rule)
            if reason:
                raise WaitCancelled(reason)
            if now >= end:
                return
            seconds = (end - now) / NANOS_PER_SECOND  # woken early, not for a stop: sleep on
