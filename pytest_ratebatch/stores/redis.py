"""The bucket and the slots in Redis, shared by every session naming the same server and key.

Each operation is one round trip: an atomic Lua script on one key (the ``BucketState`` of
``limits.bucket``: the two GCRA numbers of ``gcra`` and the adapted rate), on the server's
clock (``TIME``, in microseconds), never the clients' clocks, so sessions on different
machines agree on time; a throttle, rare, reads and writes it under WATCH. The key expires once the
bucket has been full and idle for a minute. redis-py (the ``redis`` extra) does the
talking (the scripts on a connection of the store's own, past redis-py's pool, which costs
more than a loopback round trip per command); ``RedisConnection`` retries for
``RETRY_SECONDS`` (2 s) while the server cannot be
reached or does not answer within ``SOCKET_TIMEOUT`` (2 s), and what stays down becomes a
``StoreError``.

**A lost state** (a server restarted without persistence, a flushed database): each client
keeps the bucket's epoch and time as it last saw them and sends them with each operation;
the script tells a key that cannot have expired by itself yet, and the bucket resumes as if
it had just been emptied, the windows as if full (``_READ``).

**One limit per key**: each session claims the key for its limits (``claim``, a renewed
lease beside the key); a session that states other limits while the key is held fails to
start (``PolicyConflict``), as does a session of a version that keeps the bucket as text
(``CLAIM_FORMAT``).

**Slots** (``--max-concurrency``) are leases. A held slot is a member of a sorted set
(``pytest-ratebatch:<key>:slots:leases``) scored by its expiry on the server's clock. The
process holding it renews it every third of its length (``LEASE_SECONDS``, 30 s by default)
from a daemon thread while the test runs; a session killed mid-test renews nothing, so its
slots come back when their leases expire. A lease found gone at renewal (the server lost
it) is leased again: its test still runs.

Waiters stand in line in a second sorted set, in arrival order (a counter). A waiter gets a
slot when fewer waiters are ahead of it than there are free slots, so a freed slot goes to
the longest waiter. Each operation is one Lua script on the server's clock (one round
trip), which first drops expired leases and waiters that stopped asking. A release pushes a
wake-up onto the list of each waiter that may now take a slot, which waits on it with
``BLPOP``, so hand-overs do not wait for a poll. The one polling left: a waiter asks again
at least every ``POLL_SECONDS`` (0.25 s) — for leases that expired, which push nothing — and
a waiter that stops asking for ``ALIVE_POLLS`` polls (2 s; its session was killed) leaves the
line. The keys expire after a minute of idleness.

**Resources** (declared amounts, ``limits.resources``) work the same way, under
``pytest-ratebatch:<key>:resources``: a holder's lease (renewed by the same kind of thread)
and its amounts; waiters in a line sorted by priority, then arrival, each asking again at
least every ``POLL_SECONDS`` and dropped once silent for ``ALIVE_POLLS`` polls. Every
script first drops expired leases and silent waiters, then hands the room to the head of
the line while it fits (leasing it for the waiter, and pushing its wake-up): a newcomer
starts at once only if it fits and nobody of its priority or higher waits.

The scripts name the wake-up lists themselves, which a single Redis server (not a cluster)
allows.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import secrets
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ..limits import gcra
from ..limits.bucket import BucketState
from ..limits.bucket import throttle as adapt_throttle
from ..limits.clock import MONOTONIC, Clock
from ..limits.gcra import Outcome
from ..limits.policy import NANOS_PER_SECOND, mask_url, parse_store, url_secrets
from ..limits.resources import check_request, describe_amounts, parse_request
from ..limits.windows import WindowedOutcome, Windows
from .base import Slot, StoreError

__all__ = [
    "ALIVE_POLLS",
    "CLAIM_LEASE_SECONDS",
    "DEFAULT_KEY",
    "LEASE_SECONDS",
    "POLL_SECONDS",
    "PolicyConflict",
    "RedisBucketStore",
    "RedisConnection",
    "RedisResourcePool",
    "RedisSlotPool",
]


_T = TypeVar("_T")

DEFAULT_KEY = "default"
KEY_PREFIX = "pytest-ratebatch:"
IDLE_EXPIRY_MS = 60_000
RETRY_SECONDS = 2.0  # how long a lost server is retried before the session stops
CONNECT_TIMEOUT = 2.0  # seconds to connect (TCP)
#: Seconds to wait for a reply (and for a TLS handshake): a script answers in microseconds,
#: so a server this slow is as good as lost, and the retry above takes over.
SOCKET_TIMEOUT = 2.0

# Shared preamble: the server's clock and the bucket, in microseconds. The bucket is one
# string (one GET, one SET with its expiry: fewest calls per round trip): a format byte (2)
# and twelve little-endian doubles, packed and unpacked in C (``struct``: text cost the
# script a third of its time), exact to 2**53 us. The numbers of ``BucketState``, then four
# of its own: its epoch (when this value was created, so a client can tell a new one from
# the one it saw), the moment a loss of the store's state was last found (0: never; the
# windows count as full from then), and for window limits, when the logs' expiry was last
# renewed (st[11]) and the latest reservation logged (st[12]). A value of an
# older version, the numbers as text joined by ":" (shorter still, older yet), still reads.
#
# A lost state (a server restarted without persistence, a flushed database): the client
# sends the epoch it knows (ARGV[7], 0: none yet) and the bucket's theoretical arrival time
# as it last saw it (ARGV[8]). The key lives at least a minute (ARGV[6] ms) past that time,
# so a key missing before then, or one born again before then, or one whose time went back,
# was lost: the bucket resumes as if it had just been emptied (no burst: G1 holds across the
# loss) and the reply says so once. A key missing later may simply have expired, idle: the
# bucket resumes without its burst (one token now, then the rate) and says nothing.
_READ = """
local clock = redis.call('TIME')
local now = clock[1] * 1000000 + clock[2]
local cost, interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local idle_ms, known, seen = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local lost, dirty, keep_until = 0, false, 0
local st = {0, 0, -1, 0, -1, 0, 0, 0, 0, 0, 0, 0}
local stored = redis.call('GET', KEYS[1])
if stored then
  if string.byte(stored, 1) == 2 then
    st = {struct.unpack('<dddddddddddd', stored, 2)}
  else
    local i = 1
    for field in string.gmatch(stored, '[^:]+') do st[i] = tonumber(field); i = i + 1 end
  end
  -- Written by an older version, which keeps no epoch: nothing to judge by.
  if st[9] == 0 then st[9], known, dirty = now, 0, true end
end
-- limits.bucket.current_interval: the adapted interval, after its recovery steps
if st[3] >= 0 then
  local adapted, recover_at = st[3], st[7]
  while now >= recover_at and adapted > interval do
    adapted = math.max(interval, adapted - math.max(1, math.floor(adapted / 16)))
    recover_at = recover_at + math.max(1000000, 4 * adapted)
  end
  if adapted <= interval then
    st[3] = -1
  else
    st[3], st[7], interval = adapted, recover_at, adapted
  end
end
if not stored then
  st[9] = now
  if known > 0 then
    if now < seen + idle_ms * 1000 then lost = 1 end
    st[1] = now + (burst - 1) * interval
    st[2], dirty = st[1], true
  end
elseif known > 0 then
  if st[9] ~= known then
    if st[9] < seen + idle_ms * 1000 then lost = 1 end
  elseif math.max(st[1], st[2]) < seen then
    lost = 1
  end
end
-- Found lost by this client: empty the bucket now, unless whoever created it did.
if lost == 1 and not (stored and st[9] ~= known and st[10] == st[9]) then
  local empty = now + burst * interval
  st[1], st[2] = math.max(st[1], empty), math.max(st[2], empty)
  st[9], st[10], dirty = now, now, true
end
local reserved, admitted = st[1], st[2]
local function save()
  local busy_ms = math.max(math.ceil((math.max(reserved, admitted, keep_until) - now) / 1000), 0)
  st[1], st[2] = reserved, admitted
  local packed = string.char(2) .. struct.pack('<dddddddddddd', unpack(st, 1, 12))
  redis.call('SET', KEYS[1], packed, 'PX', busy_ms + idle_ms)
end
-- The reply, and what the client keeps to tell a lost state: the epoch, the time, the loss.
local function reply(result, changed)
  if changed or dirty then save() end
  local n = #result
  result[n + 1], result[n + 2], result[n + 3] = st[9], math.max(reserved, admitted), lost
  return result
end
"""

# gcra.take: ARGV[4] = max wait (-1: none), ARGV[5] = 1 to admit when no wait is needed.
TAKE_SCRIPT = (
    _READ
    + """
local base = math.max(reserved, admitted, now)
local wait = base + (cost - burst) * interval - now
local max_wait = tonumber(ARGV[4])
if wait > 0 and max_wait >= 0 and wait > max_wait then return reply({3, now, wait}, false) end
reserved = base + cost * interval
local status = 1
if wait <= 0 then
  wait = 0
  if ARGV[5] == '1' then
    admitted = math.max(admitted, now) + cost * interval
    st[4] = st[4] + cost
    status = 0
  end
end
return reply({status, now, wait}, true)
"""
)

# gcra.commit: ARGV[4] = the waiter's slot (-1: none), for gcra.overtaken.
COMMIT_SCRIPT = (
    _READ
    + """
local wait = admitted + (cost - burst) * interval - now
if wait > 0 then
  local slot = tonumber(ARGV[4])
  if slot >= 0 and now - slot >= interval then return reply({4, now, wait}, false) end
  return reply({2, now, wait}, false)
end
admitted = math.max(admitted, now) + cost * interval
st[4] = st[4] + cost
return reply({0, now, 0}, true)
"""
)

# gcra.level needs the debt only (max(reserved, admitted) - now), and the interval in force.
# (Read-only: the client sends no epoch, so nothing is judged lost or written.)
DEBT_SCRIPT = (
    _READ
    + """
return {math.max(reserved, admitted) - now, interval}
"""
)

# Window limits (``windows``): KEYS[2k] and KEYS[2k+1] are window k's reserved and admitted
# logs, lists of their starts (oldest first), of which the last ``count`` matter; ARGV[7+2k],
# ARGV[8+2k] its count and length. Each check reads one entry counted from a list's tail,
# each start appends: O(cost), whatever the count. Calls saved, as each costs the script
# more than its arithmetic: a list is trimmed once it holds LOG_SLACK entries more than its
# count, and its expiry renewed every half minute (st[11]: the last renewal), not on every
# start. After a loss of the store's state (st[10]) each window counts as full at that
# moment, until it has passed: the starts it lost may have filled it.
LOG_SLACK = 64
_WINDOWS = """
local windows = (#ARGV - 8) / 2
local function count_of(k) return tonumber(ARGV[7 + 2 * k]) end
local function length_of(k) return tonumber(ARGV[8 + 2 * k]) end
for k = 1, windows do
  if st[10] > 0 then keep_until = math.max(keep_until, st[10] + length_of(k)) end
end
-- Each renewal keeps every list (both sides: a start may write only one) for its window
-- and the idle minute: renewed after half a minute, a list outlives the window of any start
-- it holds by half a minute or more. (A clock gone back renews too.)
local renew = now - st[11] > idle_ms * 500 or now < st[11]
-- Window k's starts before those logged: at the loss, while the window still holds it
local function filled(k)
  if st[10] > 0 and st[10] + length_of(k) > now then return st[10] end
  return nil
end
-- the c-th oldest of a window's last ``count`` starts (counted from the list's tail: one
-- call, no LLEN), or the loss's mark while fewer were logged
local function entry(list, k, c)
  if c > count_of(k) then return nil end
  local at = redis.call('LINDEX', list, c - count_of(k) - 1)
  if not at then return filled(k) end
  return tonumber(at)
end
local function log(list, k, at, c)
  local text, values, length = string.format('%.0f', at), {}, 0
  local pushed = math.min(c, count_of(k))
  -- in chunks: unpack() takes at most a few thousand values (a start may cost a million)
  for i = 1, math.min(pushed, 1000) do values[i] = text end
  local left = pushed
  while left > 0 do
    local chunk = math.min(left, 1000)
    length = redis.call('RPUSH', list, unpack(values, 1, chunk))
    left = left - chunk
  end
  if length > count_of(k) + LOG_SLACK then
    redis.call('LTRIM', list, -count_of(k), -1)
  end
  -- (a list just made has no expiry yet; the others get theirs in ``note_logs``)
  if length <= pushed and not renew then
    redis.call('PEXPIRE', list, math.ceil(length_of(k) / 1000) + idle_ms)
  end
end
-- after the logs are written: every list's expiry when due, and the latest reservation
local function note_logs(reserved_at)
  if renew then
    for k = 1, windows do
      local keep = math.ceil(length_of(k) / 1000) + idle_ms
      redis.call('PEXPIRE', KEYS[2 * k], keep)
      redis.call('PEXPIRE', KEYS[2 * k + 1], keep)
    end
    st[11] = now
  end
  if reserved_at then st[12] = reserved_at end
end
""".replace("LOG_SLACK", str(LOG_SLACK))

# windows.take: ARGV[4] = max wait (-1: none), ARGV[5] = 1 to admit when no wait is needed.
TAKE_WINDOWS_SCRIPT = (
    _READ
    + _WINDOWS
    + """
local base = math.max(reserved, admitted, now)
local rate_start = base + (cost - burst) * interval
local start, bound = rate_start, 0
local last = nil
if st[12] > 0 then last = st[12]; start = math.max(start, last) end
-- windows.take: the most binding window, named even when the line before it binds more
local latest, latest_bound = start, 0
for k = 1, windows do
  local r = entry(KEYS[2 * k], k, cost)
  local a = entry(KEYS[2 * k + 1], k, cost)
  local first = r
  if a and (not first or a > first) then first = a end
  if first and (latest_bound == 0 or first + length_of(k) > latest) then
    latest, latest_bound = first + length_of(k), k
  end
end
if latest_bound > 0 and (latest > start or (last and last >= rate_start)) then
  start, bound = math.max(start, latest), latest_bound
end
local wait = start - now
local max_wait = tonumber(ARGV[4])
if wait > 0 and max_wait >= 0 and wait > max_wait then
  return reply({3, now, wait, bound}, false)
end
local status = 1
if wait > 0 then
  reserved = math.max(base, start) + cost * interval
else
  wait = 0
  reserved = base + cost * interval
  if ARGV[5] == '1' then
    admitted = math.max(admitted, now) + cost * interval
    st[4] = st[4] + cost
    status = 0
  end
end
for k = 1, windows do
  log(KEYS[2 * k], k, now + wait, cost)
  if status == 0 then log(KEYS[2 * k + 1], k, now, cost) end
end
note_logs(now + wait)
return reply({status, now, wait, bound}, true)
"""
)

# windows.commit: ARGV[4] = the waiter's slot (-1: none), for gcra.overtaken.
COMMIT_WINDOWS_SCRIPT = (
    _READ
    + _WINDOWS
    + """
local rate_wait = admitted + (cost - burst) * interval - now
local wait, bound = rate_wait, 0
for k = 1, windows do
  local a = entry(KEYS[2 * k + 1], k, cost)
  if a and a + length_of(k) - now > wait then wait, bound = a + length_of(k) - now, k end
end
if wait > 0 then
  local slot = tonumber(ARGV[4])
  if slot >= 0 and rate_wait > 0 and now - slot >= interval then
    return reply({4, now, wait, bound}, false)
  end
  return reply({2, now, wait, bound}, false)
end
admitted = math.max(admitted, now) + cost * interval
st[4] = st[4] + cost
for k = 1, windows do log(KEYS[2 * k + 1], k, now, cost) end
note_logs(nil)
return reply({0, now, 0, bound}, true)
"""
)

# What could start now by each window: its count less the starts logged within it.
FREE_WINDOWS_SCRIPT = (
    _READ
    + _WINDOWS
    + """
local result = {math.max(reserved, admitted) - now, interval}
for k = 1, windows do
  local used = 0
  for side = 0, 1 do
    local n, logged = 0, redis.call('LRANGE', KEYS[2 * k + side], -count_of(k), -1)
    for _, at in ipairs(logged) do
      if tonumber(at) > now - length_of(k) then n = n + 1 end
    end
    if filled(k) then n = n + math.max(0, count_of(k) - #logged) end
    used = math.max(used, n)
  end
  result[k + 2] = count_of(k) - used
end
return result
"""
)

#: The first byte of a bucket's value as this version writes it, then ``_STATE``.
STATE_FORMAT = b"\x02"
_STATE = struct.Struct("<12d")
#: The fields of ``BucketState`` kept in microseconds in Redis (the others are counts).
_TIME_FIELDS = frozenset({"reserved", "admitted", "interval", "mark_ns", "recover_at"})


class Script:
    """A Lua script and its SHA1, the name the server caches it under."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class RedisConnection:
    """A redis-py client as the Redis parts use it: short timeouts, a retry for brief outages
    bounded in time (not in attempts), scripts by their SHA1, and every error a
    ``StoreError`` that never shows the password."""

    def __init__(self, url: str, socket_timeout: float = SOCKET_TIMEOUT) -> None:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise StoreError(
                "the Redis store needs redis-py: pip install 'pytest-ratebatch[redis]'"
            ) from None
        self._secrets = url_secrets(url)
        try:
            parse_store(url)  # as the option is checked: redis-py never reads a misshapen URL
        except ValueError as error:
            raise StoreError(f"bad Redis URL {mask_url(url)}: {error}") from None
        self._tls = url.startswith("rediss://")
        self.errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        # Worth another attempt: the server restarting, a connection reset. Not a refusal
        # (a wrong password is a ConnectionError too, and will not heal).
        self._transient: tuple[type[BaseException], ...] = (
            redis.ConnectionError,
            redis.TimeoutError,
            OSError,
        )
        self._timeout = redis.TimeoutError
        self._refused: tuple[type[BaseException], ...] = (
            redis.exceptions.AuthenticationError,
            redis.exceptions.AuthorizationError,
        )
        self.watch_error: type[BaseException] = redis.exceptions.WatchError
        self._noscript = redis.exceptions.NoScriptError
        try:
            # redis-py's own retry counts attempts, each up to the socket timeout (a TLS
            # handshake with a plain port waits all of it): ``call`` retries by time instead.
            self.client = redis.Redis.from_url(
                url,
                socket_timeout=socket_timeout,
                socket_connect_timeout=CONNECT_TIMEOUT,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as error:
            raise StoreError(self.clean(f"bad Redis URL {mask_url(url)}: {error}")) from None
        self._execute: Callable[..., Any] = self.client.execute_command
        self._lane = threading.Lock()
        self._connection: Any = None  # made on the first script call
        self._closed = False
        self._reply_error: type[BaseException] = redis.ResponseError
        self._pid = os.getpid()

    def clean(self, message: str) -> str:
        """No output, report or error ever contains the password."""
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return message

    def call(self, operation: Callable[[], _T], where: Callable[[], str]) -> _T:
        """``operation()``, tried again for ``RETRY_SECONDS`` while the server cannot be
        reached; then, or on any other error, a ``StoreError`` that starts with ``where()``."""
        deadline = time.monotonic() + RETRY_SECONDS
        delay = 0.05
        while True:
            try:
                return operation()
            except self._refused as error:
                raise StoreError(self.clean(f"{where()}: {error}")) from None
            except self._transient as error:
                left = deadline - time.monotonic()
                if left <= delay:
                    raise StoreError(self.clean(f"{where()}: {self._explain(error)}")) from None
                time.sleep(delay)
                delay = min(2 * delay, 0.5)
            except self.errors as error:
                raise StoreError(self.clean(f"{where()}: {error}")) from None

    def _explain(self, error: BaseException) -> str:
        text = str(error) or type(error).__name__
        if self._tls and isinstance(error, self._timeout):
            text += " (no TLS handshake: is the port a TLS one? rediss:// speaks TLS)"
        return text

    def run(
        self, script: Script, keys: Sequence[str], args: Sequence[object], where: Callable[[], str]
    ) -> Any:
        """One EVALSHA (the script is sent once per server, on its first NOSCRIPT); an error
        is a ``StoreError`` that starts with ``where()``."""

        def evaluate() -> Any:
            try:
                return self._evalsha(script, keys, args)
            except self._noscript:
                return self._execute("EVAL", script.source, len(keys), *keys, *args)

        return self.call(evaluate, where)

    def _evalsha(self, script: Script, keys: Sequence[str], args: Sequence[object]) -> Any:
        """EVALSHA on a connection of this object's own: redis-py's ``execute_command``
        spends more than a loopback round trip on its pool's bookkeeping (a poll of the
        socket, counters) before it sends. A second thread calling meanwhile goes through the
        pool as before, as does a call after ``close``."""
        if self._closed or not self._lane.acquire(blocking=False):
            return self._execute("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            connection = self._connection
            if connection is None or self._pid != os.getpid():
                # (a forked child must not read its parent's replies)
                connection = self._connection = self.client.connection_pool.make_connection()
                self._pid = os.getpid()
            command = connection.pack_command("EVALSHA", script.sha, len(keys), *keys, *args)
            try:
                connection.send_packed_command(command, check_health=False)
                return connection.read_response()
            except self._reply_error:
                raise  # the reply was read: the connection is ready for the next command
            except BaseException:
                # Interrupted between sending and reading (Ctrl-C, a timeout's signal): the
                # reply may still come, and the next command must not read it as its own.
                connection.disconnect()
                raise
        finally:
            self._lane.release()

    def close(self) -> None:
        """Close the connections (the pool's and this object's own)."""
        self._closed = True
        if self._pid != os.getpid():
            self._connection = None  # the parent's (whose lock a fork may have left held)
        elif self._lane.acquire(timeout=SOCKET_TIMEOUT):  # a call in flight ends by then
            try:
                if self._connection is not None:
                    self._connection.disconnect()
                self._connection = None
            finally:
                self._lane.release()
        self.client.close()


#: Ends a claim's limits: sessions of versions that keep the bucket in another form (before
#: ``STATE_FORMAT``) see other limits and refuse to share the key, as this one refuses them.
CLAIM_FORMAT = "; state 2"
OLDER_VERSION = " (by an older pytest-ratebatch)"
#: How long a session's claim on a key lasts unless renewed; renewed every third of that.
CLAIM_LEASE_SECONDS = 30.0

# A session's claim on a key: KEYS[1] a sorted set of ``id<TAB>limits<TAB>text`` scored by
# expiry (server µs). ARGV[1] the member, ARGV[2] the lease (µs), ARGV[3] the set's expiry
# (ms), ARGV[4] '1' to renew whatever the others hold. Returns another live member whose
# limits differ ('' if none); without ARGV[4], the claim is then not made.
CLAIM_SCRIPT = """
local clock = redis.call('TIME')
local now = clock[1] * 1000000 + clock[2]
local claims, member = KEYS[1], ARGV[1]
local limits = string.match(member, '^[^\t]*\t([^\t]*)\t')
redis.call('ZREMRANGEBYSCORE', claims, '-inf', now)
local other = ''
for _, held in ipairs(redis.call('ZRANGE', claims, 0, -1)) do
  if held ~= member and string.match(held, '^[^\t]*\t([^\t]*)\t') ~= limits then
    other = held
    break
  end
end
if other ~= '' and ARGV[4] ~= '1' then return other end
redis.call('ZADD', claims, now + tonumber(ARGV[2]), member)
redis.call('PEXPIRE', claims, tonumber(ARGV[3]))
return other
"""


class PolicyConflict(StoreError):
    """A live session holds the key with other limits than this one states."""

    def __init__(self, key: str, ours: str, theirs: str) -> None:
        super().__init__(f"the key {key!r} is held with other limits ({theirs}) than {ours}")
        self.key = key
        self.ours = ours
        self.theirs = theirs


class RedisBucketStore:
    """GCRA in Redis: ``take`` and ``commit`` are one script call (one round trip) each."""

    local_clock = False  # times are the server's, not this machine's monotonic clock

    def __init__(
        self,
        url: str,
        key: str = DEFAULT_KEY,
        *,
        idle_expiry_ms: int = IDLE_EXPIRY_MS,
        claim_lease_seconds: float = CLAIM_LEASE_SECONDS,
    ) -> None:
        self.url = url
        self.name = key
        self.key = KEY_PREFIX + key
        self._idle_ms = idle_expiry_ms
        self._redis = RedisConnection(url)
        self._client = self._redis.client
        self._watch_error = self._redis.watch_error
        self._take = Script(TAKE_SCRIPT)
        self._commit = Script(COMMIT_SCRIPT)
        self._debt = Script(DEBT_SCRIPT)
        self._take_windows = Script(TAKE_WINDOWS_SCRIPT)
        self._commit_windows = Script(COMMIT_WINDOWS_SCRIPT)
        self._free_windows = Script(FREE_WINDOWS_SCRIPT)
        self._window_keys: dict[Windows, tuple[list[str], list[int]]] = {}
        #: What this client last saw of the bucket: its epoch and its theoretical arrival
        #: time (µs of the server's clock), sent with each operation so that the script can
        #: tell a store that lost its state (see ``_READ``).
        self._seen: tuple[int, int] = (0, 0)
        #: Losses of the store's state found by this client.
        self.losses = 0
        #: Called with the store's clock (ns) when this client finds the state lost.
        self.on_lost: Callable[[int], None] | None = None
        # The session's claim on the key (``claim``): its member, renewed by a thread.
        self._claim_script = Script(CLAIM_SCRIPT)
        self._claims_key = f"{self.key}:sessions"
        self._claim_lease_us = max(1, int(claim_lease_seconds * 1_000_000))
        self._claim_every = claim_lease_seconds / 3
        self._claimed = ""
        self._closing = threading.Event()
        self._renewer: threading.Thread | None = None
        #: Called with the other policy's text when a renewal finds the key held with other
        #: limits (only after the server lost the claims, or this process stalled a lease).
        self.on_conflict: Callable[[str], None] | None = None

    def _call(self, script: Script, *args: int, windows: Windows = ()) -> Any:
        """One script call on the bucket's key (and the windows' logs) that judges and keeps
        what it saw; the reply without its last three numbers (``_READ``'s tail)."""
        epoch, seen = self._seen
        if windows:
            keys, extra = self._windows_arguments(windows)
            reply = self._redis.run(
                script, keys, (*args, self._idle_ms, epoch, seen, *extra), self.describe
            )
        else:
            reply = self._redis.run(
                script, [self.key], (*args, self._idle_ms, epoch, seen), self.describe
            )
        self._seen = (int(reply[-3]), int(reply[-2]))
        if reply[-1]:
            self._found_lost(int(reply[1]) * 1000)
        return reply

    def _read(self, script: Script, *args: int, windows: Windows = ()) -> Any:
        """One read-only script call: it judges nothing (no epoch sent) and writes nothing."""
        if windows:
            keys, extra = self._windows_arguments(windows)
            return self._redis.run(
                script, keys, (*args, IDLE_EXPIRY_MS, 0, 0, *extra), self.describe
            )
        return self._redis.run(script, [self.key], (*args, IDLE_EXPIRY_MS, 0, 0), self.describe)

    def _found_lost(self, now_ns: int) -> None:
        self.losses += 1
        if self.on_lost is not None:
            self.on_lost(now_ns)

    def _windows_arguments(self, windows: Windows) -> tuple[list[str], list[int]]:
        """The keys of each window's two logs (named by the limit: sessions that state
        different limits keep their own), and each window's count and length (µs)."""
        known = self._window_keys.get(windows)
        if known is None:
            keys, extra = [self.key], []
            for count, window_ns in windows:
                name = f"{self.key}:window:{count}/{_micros(window_ns)}us"
                keys += [f"{name}:reserved", f"{name}:admitted"]
                extra += [count, _micros(window_ns)]
            known = self._window_keys[windows] = (keys, extra)
        return known

    def check(self) -> None:
        """Fail now, with a clear message, if the server is unreachable or refuses us."""
        self._read(self._debt, 0, 1, 1, -1, 0)

    def take(
        self, cost: int, interval_ns: int, burst: int, max_wait_ns: int | None, admit: bool
    ) -> Outcome:
        max_wait = -1 if max_wait_ns is None else max_wait_ns // 1000
        status, now, wait = self._call(
            self._take, cost, _micros(interval_ns), burst, max_wait, int(admit)
        )[:3]
        return int(status), int(now) * 1000, int(wait) * 1000

    def commit(
        self, cost: int, interval_ns: int, burst: int, slot_ns: int | None = None
    ) -> Outcome:
        slot = -1 if slot_ns is None else slot_ns // 1000
        status, now, wait = self._call(self._commit, cost, _micros(interval_ns), burst, slot, 0)[:3]
        return int(status), int(now) * 1000, int(wait) * 1000

    def take_windowed(
        self,
        cost: int,
        interval_ns: int,
        burst: int,
        max_wait_ns: int | None,
        admit: bool,
        windows: Windows,
    ) -> WindowedOutcome:
        max_wait = -1 if max_wait_ns is None else max_wait_ns // 1000
        status, now, wait, bound = self._call(
            self._take_windows, cost, _micros(interval_ns), burst, max_wait, int(admit),
            windows=windows,
        )[:4]  # fmt: skip
        return int(status), int(now) * 1000, int(wait) * 1000, int(bound)

    def commit_windowed(
        self, cost: int, interval_ns: int, burst: int, slot_ns: int | None, windows: Windows
    ) -> WindowedOutcome:
        slot = -1 if slot_ns is None else slot_ns // 1000
        status, now, wait, bound = self._call(
            self._commit_windows, cost, _micros(interval_ns), burst, slot, 0, windows=windows
        )[:4]
        return int(status), int(now) * 1000, int(wait) * 1000, int(bound)

    def level(self, interval_ns: int, burst: int, windows: Windows = ()) -> float:
        if not windows:
            debt, interval = self._read(self._debt, 0, _micros(interval_ns), burst, -1, 0)
            return gcra.level(int(debt) * 1000, 0, 0, int(interval) * 1000, burst)
        debt, interval, *free = self._read(
            self._free_windows, 0, _micros(interval_ns), burst, -1, 0, windows=windows
        )
        tokens = gcra.level(int(debt) * 1000, 0, 0, int(interval) * 1000, burst)
        return min([tokens] + [float(max(0, int(room))) for room in free])

    def throttle(
        self, wait_ns: int, interval_ns: int, burst: int, adapt: bool
    ) -> tuple[int, int, int, int]:
        """Read, adapt and write the state under WATCH, retried if another client wrote it
        meanwhile: rare (a throttle), so the arithmetic stays ``limits.bucket``'s own. A
        commit of nothing first lets the script judge whether the state was lost."""
        self._call(self._commit, 0, _micros(interval_ns), burst, -1, 0)

        def attempt() -> tuple[int, int, int, int]:
            with self._client.pipeline() as pipe:
                while True:
                    try:
                        pipe.watch(self.key)  # type: ignore[no-untyped-call]
                        seconds, micros = pipe.time()
                        now = (int(seconds) * 1_000_000 + int(micros)) * 1000
                        # (bytes, even where the URL asks redis-py to decode replies)
                        stored = pipe.execute_command(  # type: ignore[no-untyped-call]
                            "GET", self.key, NEVER_DECODE=True
                        )
                        state, tail = _load(stored)
                        result = adapt_throttle(state, now, wait_ns, interval_ns, burst, adapt)
                        busy_ms = max(0, -(-(max(state.reserved, state.admitted) - now) // 10**6))
                        pipe.multi()
                        pipe.set(self.key, _dump(state, tail), px=busy_ms + self._idle_ms)
                        pipe.execute()
                        return (now, *result)
                    except self._watch_error:
                        continue

        return self._redis.call(attempt, self.describe)

    # --- the key's policy ------------------------------------------------------------

    def claim(self, fingerprint: str, text: str) -> None:
        """Hold the key for this session's limits (``ExecutionPolicy.shared_limits``) until
        ``close``: a lease renewed by a thread, so a killed session's claim lapses by itself.
        ``PolicyConflict`` if a live session holds it with other limits; a ``StoreError`` if
        one of a version that keeps the bucket in another form does."""
        member = f"{secrets.token_hex(8)}\t{fingerprint}{CLAIM_FORMAT}\t{text}"
        other = self._call_claim(member, force=False)
        if other.endswith(OLDER_VERSION):
            raise StoreError(
                f"the key {self.name!r} is in use by a session of an older pytest-ratebatch,"
                " which keeps the bucket in another form: run one version on every machine"
                " that shares a key (or give this session another --ratebatch-key)"
            )
        if other:
            raise PolicyConflict(self.name, text, other)
        self._claimed = member
        self._renewer = threading.Thread(
            target=self._renew_claim, name="ratebatch-key-claim", daemon=True
        )
        self._renewer.start()

    def _call_claim(self, member: str, force: bool) -> str:
        """The claim script: the text of another live session's policy if it differs (its
        limits, or ending in ``OLDER_VERSION``: the same limits by a version before
        ``STATE_FORMAT``)."""
        other = self._redis.run(
            self._claim_script,
            [self._claims_key],
            (member, self._claim_lease_us, self._claim_lease_us // 1000 + self._idle_ms,
             int(force)),
            self.describe,
        )  # fmt: skip
        if not other:
            return ""
        _, limits, text = _text(other).split("\t", 2)
        return text if limits.endswith(CLAIM_FORMAT) else text + OLDER_VERSION

    def _renew_claim(self) -> None:
        warned = set()
        while not self._closing.wait(self._claim_every):
            try:
                other = self._call_claim(self._claimed, force=True)
            except StoreError:
                continue  # try again next time; the claim may lapse if it stays down
            if other and other not in warned and self.on_conflict is not None:
                warned.add(other)
                self.on_conflict(other)

    def describe(self) -> str:
        return f"redis {mask_url(self.url)} key {self.key}"

    def close(self) -> None:
        """Give up the claim on the key (a session after this one may state other limits)."""
        self._closing.set()
        renewer = self._renewer
        if renewer is not None:
            renewer.join(timeout=5)
        if self._claimed:
            with contextlib.suppress(*self._redis.errors):  # lost: the lease lapses by itself
                self._client.zrem(self._claims_key, self._claimed)
        self._redis.close()


def _load(stored: bytes | str | None) -> tuple[BucketState, tuple[int, ...]]:
    """The state from its Redis string (microseconds) into nanoseconds, and the numbers that
    follow it, kept as they are (``_READ``: the epoch, the last loss, the logs' renewal, the
    latest reservation; fewer in older values). Either format."""
    state = BucketState()
    if not stored:
        return state, ()
    data = stored.encode() if isinstance(stored, str) else stored
    if data[:1] == STATE_FORMAT:
        fields = tuple(int(value) for value in _STATE.unpack_from(data, 1))
    else:
        fields = tuple(int(float(field)) for field in data.decode().split(":"))
    for name, value in zip(BucketState.FIELDS, fields, strict=False):
        scale = 1000 if name in _TIME_FIELDS and value >= 0 else 1
        setattr(state, name, value * scale)
    return state, fields[len(BucketState.FIELDS) :]


def _dump(state: BucketState, tail: Sequence[int] = ()) -> bytes:
    fields = [
        value // 1000 if name in _TIME_FIELDS and value >= 0 else value
        for name, value in zip(BucketState.FIELDS, state.values(), strict=True)
    ]
    count = _STATE.size // 8  # (an epoch of 0, or none at all: the script sets one)
    numbers = [*fields, *tail, *[0] * count][:count]
    return STATE_FORMAT + _STATE.pack(*numbers)


def _micros(interval_ns: int) -> int:
    """The interval in whole microseconds, rounded up: the server's clock has no finer grain.
    0 stays 0 (a bucket without a rate): as 1 us, a burst of 2**31 would be 36 minutes of
    credit, past any pause a throttle set."""
    return -(-interval_ns // 1000)


# --- slots -------------------------------------------------------------------------------

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

# ARGV[4] lease (us), ARGV[5...] tokens. Returns the tokens whose lease was gone (expired
# while its holder stalled, or lost with the server's state): each is leased again, since
# its test still runs, so the slots in use count it (and hold others back) until it ends.
RENEW_SCRIPT = (
    _PREAMBLE
    + """
local lost = {}
for i = 5, #ARGV do
  if not redis.call('ZSCORE', leases, ARGV[i]) then lost[#lost + 1] = ARGV[i] end
  redis.call('ZADD', leases, now + tonumber(ARGV[4]), ARGV[i])
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
        # Replies wait as long as a BLPOP below, and the usual margin beyond.
        self._redis = RedisConnection(url, socket_timeout=poll_seconds + SOCKET_TIMEOUT)
        self._client = self._redis.client
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
        #: Leases found gone at renewal (their holder was stalled longer than a lease, or the
        #: server lost its state); each was leased again.
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
        wake = [self._wake_prefix + token]
        timeout = max(0.001, round(seconds, 3))
        self._redis.call(lambda: self._client.blpop(wake, timeout), self.describe)

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
        self._redis.close()


# --- resources ---------------------------------------------------------------------------

# KEYS: leases (a sorted set of tokens by lease expiry), line (a sorted set of places
# ``<arrival, 16 digits>:<token>`` scored by minus the priority: higher priority first, then
# arrival, as equal scores sort by member), alive (waiters' tokens by when they count as
# gone), amounts (a hash of every holder's and waiter's amounts, ``name=amount,...``),
# places (a hash of each waiter's place in line), counter (arrivals).
# ARGV[1] the capacity (``name=amount,...``), ARGV[2] the wake-up lists' prefix, ARGV[3]
# the keys' expiry (ms), ARGV[4] a lease (us); the rest per script.
_RESOURCES_PREAMBLE = """
local clock = redis.call('TIME')
local now = clock[1] * 1000000 + clock[2]
local leases, line, alive, amounts, places = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local prefix, keep_ms, lease_us = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local function decode(text)
  local result = {}
  for name, amount in string.gmatch(text, '([^,=]+)=([^,]+)') do
    result[name] = tonumber(amount)
  end
  return result
end
local capacity = decode(ARGV[1])
-- Leases that ran out (their holders stopped renewing), and waiters that stopped asking.
for _, token in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now)) do
  redis.call('HDEL', amounts, token)
end
redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
local function out_of_line(token)
  local place = redis.call('HGET', places, token)
  if place then redis.call('ZREM', line, place) end
  redis.call('HDEL', places, token)
  redis.call('ZREM', alive, token)
end
for _, token in ipairs(redis.call('ZRANGEBYSCORE', alive, '-inf', now)) do
  out_of_line(token)
  redis.call('HDEL', amounts, token)
end
-- What the holders hold, by name (summed afresh: no rounding errors gather).
local used = {}
local function tally()
  used = {}
  for _, token in ipairs(redis.call('ZRANGE', leases, 0, -1)) do
    local held = redis.call('HGET', amounts, token)
    if held then
      for name, amount in pairs(decode(held)) do used[name] = (used[name] or 0) + amount end
    end
  end
end
-- limits.resources.fits
local function fits(wanted)
  for name, amount in pairs(wanted) do
    local room = capacity[name] or 0
    if (used[name] or 0) + amount > room + 1e-9 * room then return false end
  end
  return true
end
local function hold(token, wanted, expiry)
  redis.call('ZADD', leases, expiry, token)
  for name, amount in pairs(wanted) do used[name] = (used[name] or 0) + amount end
end
-- Hand the room to the head of the line while it fits, and wake those it went to. Until the
-- waiter takes it (and leases it in full), it is leased for as long as the waiter counts as
-- alive: the room handed to a waiter that died comes back as soon as its place would have.
local function admit()
  while true do
    local head = redis.call('ZRANGE', line, 0, 0)
    if #head == 0 then return end
    local token = string.sub(head[1], 18)
    local text = redis.call('HGET', amounts, token)
    if text then
      local wanted = decode(text)
      if not fits(wanted) then return end
      hold(token, wanted, tonumber(redis.call('ZSCORE', alive, token) or now + lease_us))
      redis.call('RPUSH', prefix .. token, 1)
      redis.call('PEXPIRE', prefix .. token, keep_ms)
    end
    out_of_line(token)
  end
end
local function settle()
  tally()
  admit()
end
local function keep()
  for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, keep_ms) end
end
"""

# ARGV[5] token, ARGV[6] how long a waiter stays in line unheard (us), ARGV[7] '1' to stand
# in line unless it may start, ARGV[8] the priority, ARGV[9] the amounts. Returns 1 if the
# token holds its amounts (taken now, or handed over while it waited), else 0.
ACQUIRE_RESOURCES_SCRIPT = (
    _RESOURCES_PREAMBLE
    + """
local token, priority = ARGV[5], tonumber(ARGV[8])
settle()
keep()
if redis.call('ZSCORE', leases, token) then  -- handed over while it waited: taken in full
  redis.call('ZADD', leases, now + lease_us, token)
  redis.call('DEL', prefix .. token)
  return 1
end
if not redis.call('HGET', places, token) then
  local head = redis.call('ZRANGE', line, 0, 0, 'WITHSCORES')
  local wanted = decode(ARGV[9])
  -- Nobody of its priority or higher waits, and it fits: it starts now.
  if (#head == 0 or tonumber(head[2]) > -priority) and fits(wanted) then
    redis.call('HSET', amounts, token, ARGV[9])
    hold(token, wanted, now + lease_us)
    return 1
  end
  if ARGV[7] ~= '1' then return 0 end
  local place = string.format('%016d', redis.call('INCR', KEYS[6])) .. ':' .. token
  redis.call('ZADD', line, -priority, place)
  redis.call('HSET', places, token, place)
  redis.call('HSET', amounts, token, ARGV[9])
end
redis.call('ZADD', alive, now + tonumber(ARGV[6]), token)
return 0
"""
)

# ARGV[5] token, ARGV[6] '1' to keep amounts handed over meanwhile (a wait that ran out):
# out of the line, and (unless kept) its amounts given back. Returns 1 if it holds them.
LEAVE_RESOURCES_SCRIPT = (
    _RESOURCES_PREAMBLE
    + """
local token = ARGV[5]
keep()
redis.call('DEL', prefix .. token)
if ARGV[6] == '1' and redis.call('ZSCORE', leases, token) then
  redis.call('ZADD', leases, now + lease_us, token)
  return 1
end
redis.call('ZREM', leases, token)
out_of_line(token)
redis.call('HDEL', amounts, token)
settle()
return 0
"""
)

# ARGV[5...] token and amounts, in pairs: extend their leases. Returns the tokens whose lease
# was gone (expired while its holder stalled, or lost with the server's state): each is
# leased again, since its test still runs.
RENEW_RESOURCES_SCRIPT = (
    _RESOURCES_PREAMBLE
    + """
local lost = {}
for i = 5, #ARGV, 2 do
  if not redis.call('ZSCORE', leases, ARGV[i]) then lost[#lost + 1] = ARGV[i] end
  redis.call('ZADD', leases, now + lease_us, ARGV[i])
  redis.call('HSET', amounts, ARGV[i], ARGV[i + 1])
end
settle()
keep()
return lost
"""
)

# The amounts held (expired leases dropped), as ``name=amount,...``.
COUNT_RESOURCES_SCRIPT = (
    _RESOURCES_PREAMBLE
    + """
settle()
local parts = {}
for name, amount in pairs(used) do
  parts[#parts + 1] = name .. '=' .. string.format('%.17g', amount)
end
return table.concat(parts, ',')
"""
)


class RedisResourcePool:
    """Declared resources (at most ``capacity`` of each) as renewed leases in Redis, shared by
    every session on ``key``.

    ``lease_seconds`` and ``poll_seconds`` are there for tests (and unusual setups); give
    every session sharing a key the same capacity (the key's claim sees to it). ``name``
    keeps another pool under the same key apart (the start line's, ``engine.scheduler``).
    """

    def __init__(
        self,
        url: str,
        key: str,
        capacity: Mapping[str, float],
        *,
        lease_seconds: float = LEASE_SECONDS,
        poll_seconds: float = POLL_SECONDS,
        clock: Clock = MONOTONIC,
        name: str = "resources",
    ) -> None:
        self.capacity = parse_request(capacity)
        if not (math.isfinite(lease_seconds) and lease_seconds > 0):
            raise ValueError(f"lease_seconds must be > 0, not {lease_seconds!r}")
        if not (math.isfinite(poll_seconds) and poll_seconds > 0):
            raise ValueError(f"poll_seconds must be > 0, not {poll_seconds!r}")
        self.url = url
        self.lease_seconds = lease_seconds
        self._poll = poll_seconds
        self._clock = clock
        # Replies wait as long as a BLPOP below, and the usual margin beyond.
        self._redis = RedisConnection(url, socket_timeout=poll_seconds + SOCKET_TIMEOUT)
        self._client = self._redis.client
        self.base = f"{KEY_PREFIX}{key}:{name}"
        self.keys = tuple(
            f"{self.base}:{name}"
            for name in ("leases", "line", "alive", "amounts", "places", "counter")
        )
        self._wake_prefix = f"{self.base}:wake:"
        self._capacity_text = _encode(self.capacity)
        self._lease_us = max(1, int(lease_seconds * 1_000_000))
        self._alive_us = max(1, int(ALIVE_POLLS * poll_seconds * 1_000_000))
        keep_seconds = max(lease_seconds, ALIVE_POLLS * poll_seconds)
        self._keep_ms = math.ceil(keep_seconds * 1000) + IDLE_EXPIRY_MS
        self._acquire = Script(ACQUIRE_RESOURCES_SCRIPT)
        self._leave = Script(LEAVE_RESOURCES_SCRIPT)
        self._renew = Script(RENEW_RESOURCES_SCRIPT)
        self._count = Script(COUNT_RESOURCES_SCRIPT)
        self._lock = threading.Lock()
        self._held: dict[str, str] = {}  # the amounts this process holds, by token
        self._renewer: threading.Thread | None = None
        self._closing = threading.Event()
        #: Leases found gone at renewal (their holder was stalled longer than a lease, or the
        #: server lost its state); each was leased again.
        self.lost = 0

    def _call(self, script: Script, *args: object) -> Any:
        """One script call on the pool's keys."""
        head = (self._capacity_text, self._wake_prefix, self._keep_ms, self._lease_us)
        return self._redis.run(script, self.keys, (*head, *args), self.describe)

    # --- acquire and release -------------------------------------------------------------

    def acquire(
        self, amounts: Mapping[str, float], max_wait_ns: int | None = None, priority: int = 0
    ) -> Slot | None:
        wanted = parse_request(amounts)
        if not wanted:
            return Slot(-1)
        problem = check_request(wanted, self.capacity)
        if problem:
            raise ValueError(problem)
        text = _encode(wanted)
        token = secrets.token_hex(8)
        queue = max_wait_ns is None or max_wait_ns > 0
        started = self._clock.now_ns()
        request = (token, self._alive_us, int(queue), int(priority), text)
        try:
            granted = self._call(self._acquire, *request)
            while not granted:
                if not queue:
                    return None
                wait = self._poll
                if max_wait_ns is not None:
                    left = max_wait_ns - (self._clock.now_ns() - started)
                    if left <= 0:
                        # Out of the line; amounts handed over just now are kept.
                        granted = self._call(self._leave, token, 1)
                        break
                    wait = min(wait, left / NANOS_PER_SECOND)
                self._wait_for_wake(token, wait)
                granted = self._call(self._acquire, *request)
        except StoreError:
            raise  # the server is gone: the line forgets this waiter by itself
        except BaseException:
            # Ctrl-C: out of the line, and amounts handed over meanwhile back.
            with contextlib.suppress(StoreError):
                self._call(self._leave, token, 0)
            raise
        return self._leased(token, text) if granted else None

    def _wait_for_wake(self, token: str, seconds: float) -> None:
        # BLPOP reads its timeout to the millisecond, and 0 would mean "forever".
        wake = [self._wake_prefix + token]
        timeout = max(0.001, round(seconds, 3))
        self._redis.call(lambda: self._client.blpop(wake, timeout), self.describe)

    def _leased(self, token: str, text: str) -> Slot:
        slot = Slot(-1, token)
        with self._lock:
            self._held[token] = text
            if self._renewer is None:
                self._renewer = threading.Thread(
                    target=self._renew_leases, name="ratebatch-resource-leases", daemon=True
                )
                self._renewer.start()
        return slot

    def release(self, slot: Slot) -> None:
        with self._lock:
            if not slot.live:
                return
            slot.live = False
            self._held.pop(slot.token, None)
        if slot.token:
            with contextlib.suppress(StoreError):  # unreachable: the lease expires by itself
                self._call(self._leave, slot.token, 0)

    def _renew_leases(self) -> None:
        """The renewing thread: every third of a lease, extend the leases still held."""
        every = self.lease_seconds / 3
        while not self._closing.wait(every):
            with self._lock:
                held = [part for pair in self._held.items() for part in pair]
            if not held:
                continue
            try:
                lost = self._call(self._renew, *held)
            except StoreError:
                continue  # try again next time; the leases may lapse if it stays down
            with self._lock:
                self.lost += sum(1 for token in lost if _text(token) in self._held)

    def first_waiting(self) -> int | None:
        line = self.keys[1]
        head = self._redis.call(
            lambda: self._client.zrange(line, 0, 0, withscores=True), self.describe
        )
        return -int(head[0][1]) if head else None

    def in_use(self) -> dict[str, float]:
        """The amounts held right now (expired leases dropped), by every session on the key."""
        text = _text(self._call(self._count))
        used = {}
        for part in text.split(",") if text else ():
            name, _, amount = part.partition("=")
            used[name] = float(amount)
        return used

    def describe(self) -> str:
        return (
            f"redis {mask_url(self.url)} key {self.base}, "
            f"resources {describe_amounts(self.capacity)}, leases of {self.lease_seconds:g}s"
        )

    def close(self) -> None:
        """Stop renewing, give back what is still held, and close the connections."""
        self._closing.set()
        renewer = self._renewer
        if renewer is not None:
            renewer.join(timeout=5)
        with self._lock:
            held = list(self._held)
        for token in held:
            self.release(Slot(-1, token))
        self._redis.close()


def _encode(amounts: Mapping[str, float]) -> str:
    """``name=amount,...`` for the scripts (``repr``: the float reads back exactly)."""
    return ",".join(f"{name}={float(amount)!r}" for name, amount in amounts.items())


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
