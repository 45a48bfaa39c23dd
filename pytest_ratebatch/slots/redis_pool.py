"""Slots shared by every session that names the same Redis server and key, as leases.

A held slot is a lease: a member of a sorted set (``pytest-ratebatch:<key>:slots:leases``)
scored by its expiry on the server's clock. The process holding it renews it every third
of its length (``LEASE_SECONDS``, 30 s by default) from a daemon thread while the test runs;
a session killed mid-test renews nothing, so its slots come back when their leases expire.

Waiters stand in line in a second sorted set, in arrival order (a counter). A waiter gets a
slot when fewer waiters are ahead of it than there are free slots, so a freed slot goes to
the longest waiter. Each operation is one Lua script on the server's clock (one round
trip), which first drops expired leases and waiters that stopped asking. A release pushes a
wake-up onto the list of each waiter that may now take a slot, which waits on it with
``BLPOP``, so hand-overs do not wait for a poll. The one polling left: a waiter asks again
at least every ``POLL_SECONDS`` (0.25 s) — for leases that expired, which push nothing — and
a waiter that stops asking for ``ALIVE_POLLS`` polls (2 s; its session was killed) leaves the
line. The keys expire after a minute of idleness.

The scripts name the wake-up lists themselves, which a single Redis server (not a cluster)
allows.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import threading
from typing import Any

from ..clock import MONOTONIC, Clock
from ..policy import NANOS_PER_SECOND, mask_url
from ..redis_store import DEFAULT_KEY, IDLE_EXPIRY_MS, KEY_PREFIX, RedisConnection, Script
from ..stores import StoreError
from .pool import Slot

__all__ = ["ALIVE_POLLS", "LEASE_SECONDS", "POLL_SECONDS", "RedisSlotPool"]

#: How long a lease lasts unless renewed; it is renewed every third of that.
LEASE_SECONDS = 30.0
#: How often a waiter asks again when no release woke it.
POLL_SECONDS = 0.25
#: After how many polls a silent waiter is dropped from the line.
ALIVE_POLLS = 8

# KEYS: leases, line, alive, counter. ARGV[1] capacity, ARGV[2] the wake-up lists' prefix,
# ARGV[3] the keys' expiry in ms; the rest per script.
_PREAMBLE = """
local clock = redis.call('TIME')
local now = clock[1] * 1000000 + clock[2]
local leases, line, alive = KEYS[1], KEYS[2], KEYS[3]
local capacity, prefix, keep_ms = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
local gone = redis.call('ZRANGEBYSCORE', alive, '-inf', now)
for i = 1, #gone do redis.call('ZREM', line, gone[i]) end
if #gone > 0 then redis.call('ZREMRANGEBYSCORE', alive, '-inf', now) end
-- Wake the waiters that may take a slot now (the first ones, as many as slots are free).
local function wake(skip)
  local free = capacity - redis.call('ZCARD', leases)
  if free > 0 then
    for _, waiter in ipairs(redis.call('ZRANGE', line, 0, free - 1)) do
      if waiter ~= skip then
        redis.call('RPUSH', prefix .. waiter, 1)
        redis.call('PEXPIRE', prefix .. waiter, keep_ms)
      end
    end
  end
end
local function keep()
  for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, keep_ms) end
end
"""

# ARGV[4] token, ARGV[5] lease (us), ARGV[6] how long a waiter stays in line unheard (us),
# ARGV[7] '1' to stand in line if no slot is free. Returns {1, now} or {0, waiters ahead}.
ACQUIRE_SCRIPT = (
    _PREAMBLE
    + """
local token = ARGV[4]
local rank = redis.call('ZRANK', line, token)
local ahead = rank or redis.call('ZCARD', line)
if ahead < capacity - redis.call('ZCARD', leases) then
  if rank then
    redis.call('ZREM', line, token)
    redis.call('ZREM', alive, token)
  end
  redis.call('ZADD', leases, now + tonumber(ARGV[5]), token)
  redis.call('DEL', prefix .. token)
  wake(token)
  keep()
  return {1, now}
end
if ARGV[7] == '1' then
  if not rank then redis.call('ZADD', line, redis.call('INCR', KEYS[4]), token) end
  redis.call('ZADD', alive, now + tonumber(ARGV[6]), token)
  wake(token)
  keep()
end
return {0, ahead}
"""
)

# ARGV[4] token: give its slot back, or leave the line (whichever it holds).
RELEASE_SCRIPT = (
    _PREAMBLE
    + """
local token = ARGV[4]
redis.call('ZREM', leases, token)
redis.call('ZREM', line, token)
redis.call('ZREM', alive, token)
redis.call('DEL', prefix .. token)
wake('')
keep()
return 1
"""
)

# ARGV[4] lease (us), ARGV[5...] tokens. Returns the tokens whose lease had already expired.
RENEW_SCRIPT = (
    _PREAMBLE
    + """
local lost = {}
for i = 5, #ARGV do
  if redis.call('ZSCORE', leases, ARGV[i]) then
    redis.call('ZADD', leases, now + tonumber(ARGV[4]), ARGV[i])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
keep()
return lost
"""
)


# The leases held, expired ones dropped.
COUNT_SCRIPT = _PREAMBLE + "return redis.call('ZCARD', leases)"


class RedisSlotPool:
    """``capacity`` slots as renewed leases in Redis, shared by every session on ``key``.

    ``lease_seconds`` and ``poll_seconds`` are there for tests (and unusual setups); give
    every session sharing a key the same capacity.
    """

    def __init__(
        self,
        url: str,
        key: str = DEFAULT_KEY,
        capacity: int = 1,
        *,
        lease_seconds: float = LEASE_SECONDS,
        poll_seconds: float = POLL_SECONDS,
        clock: Clock = MONOTONIC,
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, not {capacity!r}")
        if not (math.isfinite(lease_seconds) and lease_seconds > 0):
            raise ValueError(f"lease_seconds must be > 0, not {lease_seconds!r}")
        if not (math.isfinite(poll_seconds) and poll_seconds > 0):
            raise ValueError(f"poll_seconds must be > 0, not {poll_seconds!r}")
        self.url = url
        self.capacity = capacity
        self.lease_seconds = lease_seconds
        self._poll = poll_seconds
        self._clock = clock
        self._redis = RedisConnection(url, socket_timeout=5)  # longer than any BLPOP below
        self._client = self._redis.client
        self._errors = self._redis.errors
        base = f"{KEY_PREFIX}{key}:slots"
        self.keys = (f"{base}:leases", f"{base}:line", f"{base}:alive", f"{base}:counter")
        self._wake_prefix = f"{base}:wake:"
        self._lease_us = max(1, int(lease_seconds * 1_000_000))
        self._alive_us = max(1, int(ALIVE_POLLS * poll_seconds * 1_000_000))
        keep_seconds = max(lease_seconds, ALIVE_POLLS * poll_seconds)
        self._keep_ms = math.ceil(keep_seconds * 1000) + IDLE_EXPIRY_MS
        self._acquire = Script(ACQUIRE_SCRIPT)
        self._release = Script(RELEASE_SCRIPT)
        self._renew = Script(RENEW_SCRIPT)
        self._count = Script(COUNT_SCRIPT)
        self._lock = threading.Lock()
        self._held: dict[str, Slot] = {}  # leases this process holds, by token
        self._renewer: threading.Thread | None = None
        self._closing = threading.Event()
        #: Leases found expired at renewal (their holder was stalled longer than a lease).
        self.lost = 0

    def _call(self, script: Script, *args: object) -> Any:
        """One script call on the pool's keys."""
        head = (self.capacity, self._wake_prefix, self._keep_ms)
        return self._redis.run(script, self.keys, (*head, *args), self.describe)

    # --- acquire and release -------------------------------------------------------------

    def acquire(self, max_wait_ns: int | None = None) -> Slot | None:
        token = secrets.token_hex(8)
        queue = max_wait_ns is None or max_wait_ns > 0
        started = self._clock.now_ns()
        try:
            granted, _ = self._call(
                self._acquire, token, self._lease_us, self._alive_us, int(queue)
            )
            while not granted:
                if not queue:
                    return None
                wait = self._poll
                if max_wait_ns is not None:
                    left = max_wait_ns - (self._clock.now_ns() - started)
                    if left <= 0:
                        self._call(self._release, token)  # out of the line
                        return None
                    wait = min(wait, left / NANOS_PER_SECOND)
                self._wait_for_wake(token, wait)
                granted, _ = self._call(self._acquire, token, self._lease_us, self._alive_us, 1)
        except StoreError:
            raise  # the server is gone: the line forgets this waiter by itself
        except BaseException:
            # Ctrl-C: out of the line, and a slot granted meanwhile back.
            with contextlib.suppress(StoreError):
                self._call(self._release, token)
            raise
        return self._leased(token)

    def _wait_for_wake(self, token: str, seconds: float) -> None:
        # BLPOP reads its timeout to the millisecond, and 0 would mean "forever".
        try:
            self._client.blpop([self._wake_prefix + token], max(0.001, round(seconds, 3)))
        except self._errors as error:
            raise StoreError(self._redis.clean(f"{self.describe()}: {error}")) from None

    def _leased(self, token: str) -> Slot:
        slot = Slot(-1, token)
        with self._lock:
            self._held[token] = slot
            if self._renewer is None:
                self._renewer = threading.Thread(
                    target=self._renew_leases, name="ratebatch-slot-leases", daemon=True
                )
                self._renewer.start()
        return slot

    def release(self, slot: Slot) -> None:
        with self._lock:
            if not slot.live:
                return
            slot.live = False
            self._held.pop(slot.token, None)
        with contextlib.suppress(StoreError):  # unreachable: the lease expires by itself
            self._call(self._release, slot.token)

    def _renew_leases(self) -> None:
        """The renewing thread: every third of a lease, extend the leases still held."""
        every = self.lease_seconds / 3
        while not self._closing.wait(every):
            with self._lock:
                tokens = list(self._held)
            if not tokens:
                continue
            try:
                lost = self._call(self._renew, self._lease_us, *tokens)
            except StoreError:
                continue  # try again next time; the leases may lapse if it stays down
            with self._lock:
                self.lost += sum(1 for token in lost if _text(token) in self._held)

    def in_use(self) -> int:
        """Leases held right now (expired ones dropped), by every session on the key."""
        return int(self._call(self._count))

    def describe(self) -> str:
        return (
            f"redis {mask_url(self.url)} key {self.keys[0].rsplit(':', 1)[0]}, "
            f"{self.capacity} slots, leases of {self.lease_seconds:g}s"
        )

    def close(self) -> None:
        """Stop renewing, give back any lease still held, and close the connections."""
        self._closing.set()
        renewer = self._renewer
        if renewer is not None:
            renewer.join(timeout=5)
        with self._lock:
            held = list(self._held.values())
        for slot in held:
            self.release(slot)
        self._client.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
