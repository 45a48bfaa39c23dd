"""``CallPacer``: every request to a host under a call limit, admitted, timed and recorded.

One ``HostPacer`` per ``--call-limit`` entry: a ``RateLimiter`` on the host's own bucket and
windows (shared like the test rate: memory, the session directory, or Redis) and, with a
``concurrency``, a ``SlotPool``. The instrumented clients call ``admit`` (or ``admit_async``)
before sending, ``respond`` with the response's status and headers, and ``done`` once the
response arrived.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from ..engine.limiter import RateLimiter
from ..limits.calls import CallLimit, find_call_limit
from ..limits.clock import MONOTONIC, Clock
from ..limits.policy import ThrottlePolicy
from ..stores.base import SlotPool
from ..throttle.backoff import backoff
from ..throttle.headers import remaining, wait_seconds
from ..views.calls import Call, HostStats

__all__ = ["Call", "CallPacer", "HostPacer", "HostStats", "is_throttle"]


def is_throttle(status: int, headers: Any) -> bool:
    """A 429, or a 503 with ``Retry-After``: the server did not act on the request."""
    if status == 429:
        return True
    if status != 503:
        return False
    from ..throttle.headers import header

    return header(headers, "Retry-After") is not None


class HostPacer:
    """The calls to the hosts one ``CallLimit`` names."""

    def __init__(
        self,
        pacer: CallPacer,
        limit: CallLimit,
        limiter: RateLimiter,
        slots: SlotPool | None,
    ) -> None:
        self.pacer = pacer
        self.limit = limit
        self.limiter = limiter
        self.slots = slots
        self.stats = HostStats()
        self._lock = threading.Lock()
        # A stated limit is known: a throttle pauses, and only auto learns a rate from it.
        self._adapt = limit.auto and pacer.throttling.adapt
        #: What held calls back, by ``take_bound``'s index: the bucket (throttles' pauses, a
        #: published budget, and under auto the rate learnt), then each window.
        self._names = ("auto" if limit.auto else "pauses", *limiter.limit_names[1:])
        self._auto = limit.auto
        self._pattern = limit.pattern  # derived anew on each read: kept for every call
        self._now_ns = pacer.clock.now_ns

    def _start(self, host: str) -> Call:
        pacer = self.pacer
        call = Call(host, pacer.nodeid)
        call.attempts += 1
        counts = pacer.counts.setdefault(call.nodeid, {})
        pattern = self._pattern
        counts[pattern] = counts.get(pattern, 0) + 1
        return call

    def admit(self, host: str, call: Call | None = None) -> Call:
        """Wait (blocking) until a request to ``host`` may be sent; the call's record."""
        call = call or self._start(host)
        now_ns = self._now_ns
        started = before = now_ns()
        waited: dict[str, int] = {}
        if self.slots is not None and call.slot is None:
            call.slot = self.slots.acquire()
            before = now_ns()
            self._slot_wait(waited, before - started)
        bound = self.limiter.take_bound(1)
        now = now_ns()
        if bound >= 0:
            waited[self._names[bound]] = now - before
        return self._admitted(call, started, now, waited)

    async def admit_async(self, host: str, call: Call | None = None) -> Call:
        """``admit`` for a coroutine: the event loop runs while the request waits."""
        call = call or self._start(host)
        now_ns = self._now_ns
        started = before = now_ns()
        waited: dict[str, int] = {}
        if self.slots is not None and call.slot is None:
            call.slot = self.slots.acquire(0)
            if call.slot is None:  # the pools block: wait for a slot in a thread
                import asyncio

                call.slot = await asyncio.to_thread(self.slots.acquire)
                before = now_ns()
                self._slot_wait(waited, before - started)
        _, bound = await self.limiter.take_bound_async(1)
        now = now_ns()
        if bound >= 0:
            waited[self._names[bound]] = now - before
        return self._admitted(call, started, now, waited)

    @staticmethod
    def _slot_wait(waited: dict[str, int], waited_ns: int) -> None:
        # A slot pool does not say whether it waited: under a millisecond is its own time.
        if waited_ns > 1_000_000:
            waited["concurrency"] = waited_ns

    def _admitted(self, call: Call, started: int, now: int, waited: dict[str, int]) -> Call:
        """Count the admission at ``now``; ``waited``: how long each limit held it (none: no
        wait)."""
        call.start_ns = now - self.pacer.start_ns
        if waited:
            call.wait_ns += now - started
        with self._lock:
            stats = self.stats
            stats.calls += 1
            if waited:
                stats.waits += 1
                stats.waited_ns += now - started
                for name, waited_ns in waited.items():
                    stats.bound[name] = stats.bound.get(name, 0) + waited_ns
            if stats.first_ns < 0:
                stats.first_ns = call.start_ns
            stats.last_ns = max(stats.last_ns, call.start_ns)
        return call

    def respond(self, call: Call, status: int, headers: Any, replayable: bool = True) -> bool:
        """The response's status and headers: whether to send the request again (a throttle
        with retries left and a body that can be sent again; the caller then ``admit``s it
        again, which waits past the pause every sharer now sees)."""
        call.status = status
        if status != 429 and (status != 503 or not is_throttle(status, headers)):
            if self._auto:
                self._obey_budget(headers)
            return False
        asked = wait_seconds(headers, time.time())
        wait = asked[0] if asked is not None else backoff(call.attempts)
        throttling = self.pacer.throttling
        again = replayable and call.attempts <= throttling.retries and wait <= throttling.max_wait
        self.limiter.throttle(min(wait, throttling.max_wait), self._adapt)
        with self._lock:
            self.stats.throttled += 1
            if again:
                self.stats.resent += 1
            else:
                self.stats.passed_on += 1
        if again:
            call.resent += 1
            call.attempts += 1
        return again

    def _obey_budget(self, headers: Any) -> None:
        """A published budget at 0 pauses every sharer until its reset (auto only: a stated
        limit is already kept, and the budget's edge would only slow it)."""
        budget = remaining(headers, time.time())
        if budget is not None and budget.remaining <= 0 and budget.reset:
            self.limiter.throttle(min(budget.reset, self.pacer.throttling.max_wait), False)

    def done(self, call: Call) -> None:
        """The response arrived (or the request failed): free the slot, keep the record."""
        slot, call.slot = call.slot, None
        if slot is not None and self.slots is not None:
            self.slots.release(slot)
        records = self.pacer.records
        if records is not None:
            records.append(call)


OpenHost = Callable[[int, CallLimit], tuple[RateLimiter, "SlotPool | None"]]


class CallPacer:
    """The session's call limits in this process; ``host`` finds the pacer of a request."""

    def __init__(
        self,
        limits: tuple[CallLimit, ...],
        open_host: OpenHost,
        throttling: ThrottlePolicy,
        start_ns: int,
        clock: Clock = MONOTONIC,
        keep_records: bool = True,
    ) -> None:
        self.limits = limits
        self.throttling = throttling
        self.start_ns = start_ns
        self.clock = clock
        self._open_host = open_host
        self._pacers: dict[int, HostPacer] = {}
        self._found: dict[tuple[str, int | None], HostPacer | None] = {}
        self._lock = threading.Lock()
        #: The test running now (calls are its calls), and whether it opted out.
        self.nodeid = ""
        self.enabled = True
        #: Every call, in the order they finished (``None``: no report wants them).
        self.records: list[Call] | None = [] if keep_records else None
        #: Each test's calls (re-sends not counted) per limit: node id -> pattern -> count.
        self.counts: dict[str, dict[str, int]] = {}

    def host(self, host: str | None, port: int | None) -> HostPacer | None:
        """The pacer of requests to ``host:port``, or ``None``: not limited (or the running
        test opted out)."""
        if not self.enabled or not host:
            return None
        key = (host, port)
        try:
            return self._found[key]
        except KeyError:
            pass
        with self._lock:
            found = find_call_limit(self.limits, host, port)
            pacer = None
            if found is not None:
                index, limit = found
                pacer = self._pacers.get(index)
                if pacer is None:
                    limiter, slots = self._open_host(index, limit)
                    pacer = self._pacers[index] = HostPacer(self, limit, limiter, slots)
            self._found[key] = pacer
        return pacer

    def stats(self) -> dict[str, HostStats]:
        """Each limited host's totals (by its pattern), for the hosts called so far."""
        return {pacer.limit.pattern: pacer.stats for pacer in self._pacers.values()}
