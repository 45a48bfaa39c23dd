"""The bucket, the ledger and the slots in files, shared by the processes of one pytest-xdist
session.

One directory per session (created by the controller, handed to workers in ``workerinput``)
holds a fixed-size state file for each, updated under ``fcntl.flock``: the kernel releases
such a lock when its process dies, so a crashed worker never leaves the session stuck, and
the state stays a few dozen bytes however many tests run. Each update is one lock, one read
and one write; all waiting happens outside the lock:

- a test waiting for tokens sleeps until its reserved slot (see ``gcra``);
- the barrier between batches is a lock file per batch: every member holds it shared while
  it runs, and the opener of the next batch takes it exclusively, which returns exactly
  when the last member finished (or died);
- members of a batch still opening wait on the batch's gate file, which the opener holds
  exclusively until the batch is released;
- a process sleeping for its admission listens on a Unix datagram socket of its own,
  ``wake-<pid>-<n>``, and whoever records a stop sends every such socket a datagram: a stop
  by any worker cancels the tests waiting in the others at once, not when their sleep ends.

**Slots** (``--max-concurrency``) are lock files in the same directory. Slot *i* is held by
holding the exclusive ``flock`` of the file ``slot-<i>``. The kernel releases such a lock
when its process dies, so a crashed worker never keeps a slot. A slot's file is created
when a search for a free slot first reaches it: as many files as tests were ever in flight
at once, plus one, whatever the cap.

Waiters form a line, so that a freed slot goes to the longest waiter and only one process
at a time looks for one:

- a waiter takes the next ticket (a counter in ``slots.queue``, under ``flock``) and, before
  letting go of the counter, creates and locks its own file ``slots.wait-<ticket>``, which it
  holds for as long as it is in line;
- it then blocks on the lock of the file of the ticket before its own: the kernel wakes it
  when that waiter leaves the line (or dies). If that waiter had become the head of the line
  (it writes ``H`` in its file as it does), this one is now the head; if it left before (a
  timeout, Ctrl-C, or its death), this one blocks on the one before, and so on;
- the head looks at every slot (a non-blocking ``flock`` each) and takes the first free one.
  If none is, it binds the Unix datagram socket ``slots.bell`` and waits on it: every
  release rings it, so the head wakes as soon as a slot is given back. A slot freed by a
  process that died rings no bell, so the head also looks again every ``RESCAN_SECONDS``
  (0.1 s): the only polling, done by one process at a time. Where no socket can be bound
  (a directory path too long for a socket address) the head polls every ``POLL_SECONDS``.

The head removes the files of the tickets before its own (their waiters are all done), so
the directory holds a few small files whatever the number of tests. A waiter with a
deadline cannot block on ``flock`` (it has no timeout): a helper thread blocks on it for the
waiter, which waits for that thread with a timeout instead.

**Resources** (declared amounts, ``limits.resources``) are one JSON record,
``resources.json``, of the holders and the line of waiters (by priority, then arrival),
replaced whole (written aside, then renamed) under the ``flock`` of ``resources.lock``,
which also counts the changes. Whoever frees amounts hands them to the head of the line
while it fits, in the same update. Each pool holds the ``flock`` of a file of its own,
``resources.owner-<pid>-<random>``, for as long as it is open, and every entry names its
owner: an owner whose file can be locked has died, and its entries are dropped by the next
process that needs the room (at most every ``RESCAN_SECONDS``), so a crashed worker's
amounts come back. Waiters look again every ``POLL_SECONDS``, backing off to
``RESOURCE_POLL_SECONDS``; a look at a record that did not change since reads 8 bytes.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import itertools
import json
import os
import re
import secrets
import select
import socket
import struct
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
from ..limits.gcra import Outcome
from ..limits.policy import NANOS_PER_SECOND
from ..limits.windows import EMPTY, WindowedOutcome, Windows, commit_state, take_state
from .base import Slot, StoreError

__all__ = [
    "POLL_SECONDS",
    "RESCAN_SECONDS",
    "RESOURCE_POLL_SECONDS",
    "FileBucketStore",
    "FileLedger",
    "FileResourcePool",
    "FileSlotPool",
    "SharedFile",
]


BUCKET_FILE = "bucket"
LEDGER_FILE = "ledger"
#: The sockets of the processes sleeping for an admission, which a stop wakes.
WAKE_PREFIX = "wake-"
_wake_numbers = itertools.count()  # a socket per ledger, even for several in one process


def session_error(directory: Path, error: OSError) -> StoreError:
    """A failure of the session directory, as a ``StoreError`` that says what happened (the
    scheduler then stops the session, cancelling the tests with this reason)."""
    if not os.path.isdir(directory):
        return StoreError(f"the session directory {directory} was removed while the session ran")
    return StoreError(f"the session directory {directory}: {error.strerror or error}")


class SharedFile:
    """A small fixed-size record in a file, read and written under an exclusive ``flock``.

    A file that cannot be opened (its directory gone) or read and written (a full disk) is a
    ``StoreError`` at its first use, not at its opening: the session then stops with the
    reason, every test accounted for."""

    def __init__(self, path: Path, layout: struct.Struct) -> None:
        self.path = path
        self._layout = layout
        self._error: StoreError | None = None
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            self._fd = -1
            self._error = session_error(path.parent, error)
        self._thread_lock = threading.Lock()  # flock does not exclude threads sharing an fd

    def __enter__(self) -> tuple[Any, ...] | None:
        if self._error is not None:
            raise self._error
        self._thread_lock.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise
        try:
            data = os.pread(self._fd, self._layout.size, 0)
        except OSError as error:
            self.__exit__()
            raise self.failure(error) from None
        return self._layout.unpack(data) if len(data) == self._layout.size else None

    def write(self, *values: object) -> None:
        """Only between ``__enter__`` and ``__exit__``."""
        try:
            os.pwrite(self._fd, self._layout.pack(*values), 0)
        except OSError as error:  # a full disk: the record stays as it was
            raise self.failure(error) from None

    def failure(self, error: OSError) -> StoreError:
        return session_error(self.path.parent, error)

    def replaced(self) -> bool:
        """Whether the file's path no longer names this file (its directory was removed)."""
        if self._fd < 0:
            return True
        try:
            named = os.stat(self.path)
        except OSError:
            return True
        mine = os.fstat(self._fd)
        return (named.st_dev, named.st_ino) != (mine.st_dev, mine.st_ino)

    @property
    def fd(self) -> int:
        """For records beyond the first (``FileWindowLog``), under the same lock."""
        return self._fd

    def __exit__(self, *exc_info: object) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


_INT = struct.Struct("<q")
_HEADS = struct.Struct("<qq")


class FileWindowLog:
    """A window limit's two rings in the bucket file, from ``offset``: the heads of the
    reserved and admitted rings, then each ring's ``count`` entries (0: empty). Only the
    entries a check needs are read, so a 10,000/day limit costs what a 10/s one does."""

    __slots__ = ("_admitted_head", "_fd", "_reserved_head", "count", "offset", "window")

    def __init__(self, fd: int, offset: int, count: int, window: int) -> None:
        self._fd = fd
        self.offset = offset
        self.count = count
        self.window = window
        self._reserved_head = self._admitted_head = 0

    @property
    def size(self) -> int:
        return _HEADS.size + 2 * self.count * _INT.size

    def load(self) -> None:
        """Read the heads: first, in every locked operation."""
        data = os.pread(self._fd, _HEADS.size, self.offset)
        heads = _HEADS.unpack(data) if len(data) == _HEADS.size else (0, 0)
        self._reserved_head, self._admitted_head = heads

    def _entry(self, ring: int, index: int) -> int:
        at = self.offset + _HEADS.size + (ring * self.count + index % self.count) * _INT.size
        data = os.pread(self._fd, _INT.size, at)
        value = _INT.unpack(data)[0] if len(data) == _INT.size else 0
        return EMPTY if value == 0 else value

    def earliest_start(self, cost: int) -> int:
        reserved = self._entry(0, self._reserved_head + cost - 1)
        admitted = self._entry(1, self._admitted_head + cost - 1)
        return max(reserved, admitted) + self.window

    def earliest_admission(self, cost: int) -> int:
        return self._entry(1, self._admitted_head + cost - 1) + self.window

    def last_reserved(self) -> int:
        return self._entry(0, self._reserved_head - 1)

    def _push(self, ring: int, head: int, at: int, cost: int) -> int:
        value = _INT.pack(max(at, 1))  # 0 marks an empty entry
        base = self.offset + _HEADS.size + ring * self.count * _INT.size
        cost = min(cost, self.count)
        first = min(cost, self.count - head)  # up to the ring's end, then from its start
        os.pwrite(self._fd, value * first, base + head * _INT.size)
        if cost > first:
            os.pwrite(self._fd, value * (cost - first), base)
        return (head + cost) % self.count

    def reserve(self, at: int, cost: int) -> None:
        self._reserved_head = self._push(0, self._reserved_head, at, cost)

    def admit(self, at: int, cost: int) -> None:
        self._admitted_head = self._push(1, self._admitted_head, at, cost)

    def save(self) -> None:
        """The heads, once per operation (one write fewer when a start is admitted at once)."""
        os.pwrite(self._fd, _HEADS.pack(self._reserved_head, self._admitted_head), self.offset)

    def free(self, now: int) -> int:
        since = now - self.window
        used = 0
        for ring in (0, 1):
            at = self.offset + _HEADS.size + ring * self.count * _INT.size
            data = os.pread(self._fd, self.count * _INT.size, at).ljust(
                self.count * _INT.size, b"\0"
            )
            entries = struct.unpack(f"<{self.count}q", data)
            used = max(used, sum(entry > 0 and entry > since for entry in entries))
        return max(0, self.count - used)


class FileBucketStore:
    """The ``BucketState`` of ``limits.bucket`` in a file: eight signed 64-bit integers."""

    local_clock = True  # the monotonic clock is system-wide: every worker reads the same one

    _LAYOUT = struct.Struct(f"<{len(BucketState.FIELDS)}q")

    def __init__(self, directory: Path, clock: Clock = MONOTONIC) -> None:
        self._file = SharedFile(directory / BUCKET_FILE, self._LAYOUT)
        self._now = clock.now_ns
        self._windows: dict[Windows, list[FileWindowLog]] = {}

    def take(
        self, cost: int, interval_ns: int, burst: int, max_wait_ns: int | None, admit: bool
    ) -> Outcome:
        with self._file as stored:
            state = BucketState(*stored) if stored else BucketState()
            now = self._now()
            if state.interval != UNSET:
                interval_ns = current_interval(state, now, interval_ns)
            state.reserved, state.admitted, status, wait = gcra.take(
                state.reserved, state.admitted, now, cost, interval_ns, burst, max_wait_ns, admit
            )
            if status != gcra.REFUSED:
                if status == gcra.ADMITTED:
                    state.count += cost
                self._file.write(*state.values())
        return status, now, wait

    def commit(
        self, cost: int, interval_ns: int, burst: int, slot_ns: int | None = None
    ) -> Outcome:
        with self._file as stored:
            state = BucketState(*stored) if stored else BucketState()
            now = self._now()
            if state.interval != UNSET:
                interval_ns = current_interval(state, now, interval_ns)
            state.reserved, state.admitted, status, wait = gcra.commit(
                state.reserved, state.admitted, now, cost, interval_ns, burst, slot_ns
            )
            if status == gcra.ADMITTED:
                state.count += cost
                self._file.write(*state.values())
        return status, now, wait

    def _logs(self, windows: Windows) -> list[FileWindowLog]:
        """The limits' logs, laid out one after the other behind the bucket; loaded (under
        the file's lock)."""
        logs = self._windows.get(windows)
        if logs is None:
            logs = []
            offset = self._LAYOUT.size
            for count, window in windows:
                logs.append(FileWindowLog(self._file.fd, offset, count, window))
                offset += logs[-1].size
            self._windows[windows] = logs
        for log in logs:
            log.load()
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
        with self._file as stored:
            state = BucketState(*stored) if stored else BucketState()
            try:
                outcome = take_state(
                    state, self._logs(windows), self._now(), cost, interval_ns, burst,
                    max_wait_ns, admit,
                )  # fmt: skip
            except OSError as error:  # the logs, read and written past the record
                raise self._file.failure(error) from None
            if outcome[0] != gcra.REFUSED:
                self._file.write(*state.values())
        return outcome

    def commit_windowed(
        self, cost: int, interval_ns: int, burst: int, slot_ns: int | None, windows: Windows
    ) -> WindowedOutcome:
        with self._file as stored:
            state = BucketState(*stored) if stored else BucketState()
            try:
                outcome = commit_state(
                    state, self._logs(windows), self._now(), cost, interval_ns, burst, slot_ns
                )
            except OSError as error:
                raise self._file.failure(error) from None
            if outcome[0] == gcra.ADMITTED:
                self._file.write(*state.values())
        return outcome

    def level(self, interval_ns: int, burst: int, windows: Windows = ()) -> float:
        with self._file as stored:
            state = BucketState(*stored) if stored else BucketState()
            now = self._now()
            interval_ns = current_interval(state, now, interval_ns)
            tokens = gcra.level(state.reserved, state.admitted, now, interval_ns, burst)
            try:
                for log in self._logs(windows) if windows else ():
                    tokens = min(tokens, log.free(now))
            except OSError as error:
                raise self._file.failure(error) from None
            return tokens

    def throttle(
        self, wait_ns: int, interval_ns: int, burst: int, adapt: bool
    ) -> tuple[int, int, int, int]:
        with self._file as stored:
            state = BucketState(*stored) if stored else BucketState()
            now = self._now()
            result = throttle(state, now, wait_ns, interval_ns, burst, adapt)
            self._file.write(*state.values())
        return (now, *result)

    def describe(self) -> str:
        return "file (shared by this session's workers)"

    def close(self) -> None:
        self._file.close()


class FileLedger:
    """``SessionState`` in a file; the barrier and the gate as per-batch lock files.

    If the session directory fails (removed by a temporary-file cleaner, a full disk), its
    operations raise ``StoreError`` and the scheduler records a stop: in the file if it can
    still be written (every process then sees it), else in this process alone, which then
    cancels every test it would start. A finish or a leave never raises: a test that ran is
    not failed for it."""

    _REASON_BYTES = 240
    _LAYOUT = struct.Struct(f"<qqqq?qqq{_REASON_BYTES}s")

    def __init__(self, directory: Path, clock: Clock = MONOTONIC) -> None:
        self.directory = directory
        self._file = SharedFile(directory / LEDGER_FILE, self._LAYOUT)
        self._now = clock.now_ns
        self._members: dict[int, int] = {}  # batch -> fd of its members file, kept open
        self._held: set[int] = set()  # batches whose members file this process holds shared
        self._gates: dict[int, int] = {}  # batch -> fd of the gate this process holds
        #: This ledger's socket for stops (bound on its first sleep; ``False``: cannot be).
        self._wake: socket.socket | bool | None = None
        self._wake_path = directory / f"{WAKE_PREFIX}{os.getpid()}-{next(_wake_numbers)}"
        #: A stop the file could not record: this process stops alone.
        self._stopped_here = ""

    # --- the state record -------------------------------------------------------------

    def _load(self, stored: tuple[Any, ...] | None) -> SessionState:
        if stored is None:
            return SessionState(stop_reason=self._stopped_here)
        failures, batch, members, running, released, draining, drained, last, reason = stored
        assert isinstance(reason, bytes)
        return SessionState(
            failures=int(failures),
            stop_reason=reason.rstrip(b"\0").decode("utf-8", "replace") or self._stopped_here,
            batch=int(batch),
            members=int(members),
            running=int(running),
            released=bool(released),
            draining=int(draining),
            drained_ns=int(drained),
            last_finish_ns=int(last),
        )

    def _save(self, state: SessionState) -> None:
        reason = state.stop_reason.encode("utf-8")[: self._REASON_BYTES]
        self._file.write(
            state.failures,
            state.batch,
            state.members,
            state.running,
            state.released,
            state.draining,
            state.drained_ns,
            state.last_finish_ns,
            reason,
        )

    # --- lock files of the barrier ----------------------------------------------------

    def _lock_path(self, batch: int, kind: str) -> Path:
        return self.directory / f"batch-{batch}.{kind}"

    def _missing(self, error: OSError) -> StoreError | None:
        """A lock file not found: normal (a batch already drained or released), unless the
        directory itself was removed, which is the error returned."""
        if self._file.replaced():
            return session_error(self.directory, error)
        return None

    def _hold(self, batch: int) -> None:
        """Hold the batch's members file shared: the barrier of the next batch waits for it."""
        if batch in self._held:
            return
        fd = self._members.get(batch)
        if fd is None:
            for older in [old for old in self._members if old not in self._held]:
                os.close(self._members.pop(older))
            path = self._lock_path(batch, "members")
            fd = self._members[batch] = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        # Never blocks: the next batch's opener locks it only once this batch is full.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        self._held.add(batch)

    def _let_go(self, batch: int) -> None:
        # The file stays open: the next test of this process in the batch re-locks it.
        if batch in self._held:
            self._held.discard(batch)
            fcntl.flock(self._members[batch], fcntl.LOCK_UN)

    # --- the ledger ---------------------------------------------------------------------

    def enter(self, now: int, rule: StopRule, batch_size: int | None) -> Entry:
        if self._stopped_here:
            return Entry("cancel", reason=self._stopped_here)
        with self._file as stored:
            state = self._load(stored)
            stopped = state.stop_reason  # a stop recorded before this operation
            entry = enter(state, now, rule, batch_size)
            held_before = entry.batch in self._held
            try:
                if entry.batch and entry.action in ("go", "join", "open"):
                    self._hold(entry.batch)
                if entry.action == "open":
                    path = self._lock_path(entry.batch, "gate")
                    gate = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                    fcntl.flock(gate, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: uncontended
                    self._gates[entry.batch] = gate
                self._save(state)
            except (OSError, StoreError) as error:
                # Not entered after all: nothing of this entry stays held.
                if not held_before:
                    self._let_go(entry.batch)
                if entry.action == "open":
                    self._open_gate(entry.batch)
                if isinstance(error, StoreError):
                    raise
                raise session_error(self.directory, error) from None
        if entry.action == "cancel" and not stopped:
            self._ring()
        return entry

    def release(self, batch: int) -> None:
        try:
            with self._file as stored:
                state = self._load(stored)
                release(state, batch)
                self._save(state)
        finally:
            self._open_gate(batch)

    def _open_gate(self, batch: int) -> None:
        gate = self._gates.pop(batch, None)
        if gate is not None:
            with contextlib.suppress(OSError):  # the directory may be gone: the close wakes all
                os.unlink(self._lock_path(batch, "gate"))
            os.close(gate)

    def finish(self, batch: int, failed: bool, now: int) -> None:
        try:
            with self._file as stored:
                state = self._load(stored)
                finish(state, batch, failed, now)
                self._save(state)
        except StoreError as error:
            self._stop_here(f"store unavailable: {error}")
        finally:
            self._let_go(batch)

    def leave(self, batch: int) -> None:
        try:
            with self._file as stored:
                state = self._load(stored)
                leave(state, batch)
                self._save(state)
        except StoreError as error:
            self._stop_here(f"store unavailable: {error}")
        finally:
            self._let_go(batch)
            self._open_gate(batch)

    def _stop_here(self, reason: str) -> str:
        """The file cannot record a stop: this process stops alone, and wakes its waiters."""
        if not self._stopped_here:
            self._stopped_here = reason
        for batch in list(self._gates):
            self._open_gate(batch)
        return self._stopped_here

    def stop(self, reason: str) -> str:
        try:
            with self._file as stored:
                state = self._load(stored)
                stopped = state.stop_reason  # a stop recorded before this operation
                result = stop(state, reason)
                self._save(state)
        except StoreError:
            return self._stop_here(reason)
        for batch in list(self._gates):
            self._open_gate(batch)
        if not stopped:
            self._ring()
        return result

    def check_stop(self, now: int, rule: StopRule) -> str:
        if self._stopped_here:
            return self._stopped_here
        with self._file as stored:
            state = self._load(stored)
            stopped = state.stop_reason  # a stop recorded before this operation
            reason = check_stop(state, now, rule)
            if reason and not stopped:
                self._save(state)
        if reason and not stopped:
            self._ring()
        return reason

    # --- sleeping until a stop ------------------------------------------------------------

    def sleep(self, seconds: float, clock: Clock) -> None:
        """Sleep on this ledger's socket, which a stop recorded by any process rings; on
        another clock than the system's (tests), or without a socket, a plain sleep."""
        if seconds <= 0:
            return
        wake = self._wake_socket() if clock is MONOTONIC else None
        if wake is None:
            clock.sleep(seconds)
            return
        ready, _, _ = select.select([wake], [], [], seconds)  # microseconds, as time.sleep
        if ready:
            with contextlib.suppress(OSError):  # BlockingIOError once drained
                while True:
                    wake.recv(16)

    def _wake_socket(self) -> socket.socket | None:
        wake = self._wake
        if isinstance(wake, socket.socket):
            return wake
        if wake is False:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(self._wake_path))
        except OSError:  # e.g. a path too long for a socket address: sleeps run their course
            sock.close()
            self._wake = False
            return None
        sock.setblocking(False)
        self._wake = sock
        return sock

    def _ring(self) -> None:
        """A stop was just recorded: wake every process sleeping for an admission."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ringer:
            ringer.setblocking(False)
            for name in names:
                if name.startswith(WAKE_PREFIX):
                    with contextlib.suppress(OSError):  # a sleeper gone, or its queue full
                        ringer.sendto(b"\0", str(self.directory / name))

    def wait_drained(self, batch: int) -> int:
        if batch < 1:
            return self.snapshot().drained_ns
        path = self._lock_path(batch, "members")
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError as error:
            gone = self._missing(error)
            if gone is not None:
                raise gone from None
            return self.snapshot().drained_ns
        except OSError as error:
            raise session_error(self.directory, error) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # returns when the last member let go, or died
            locked_at = self._now()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        finally:
            os.close(fd)
        state = self.snapshot()
        # A member that died never wrote its finish time: then the lock's release is the end.
        return state.drained_ns if state.draining <= 0 else locked_at

    def wait_released(self, batch: int) -> None:
        try:
            fd = os.open(self._lock_path(batch, "gate"), os.O_RDWR)
        except FileNotFoundError as error:
            gone = self._missing(error)
            if gone is not None:
                raise gone from None
            return  # already released (the opener removes the gate)
        except OSError as error:
            raise session_error(self.directory, error) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        finally:
            os.close(fd)

    def snapshot(self) -> SessionState:
        """The state; never raises: a file that cannot be read is a stop, in the state."""
        try:
            with self._file as stored:
                return self._load(stored)
        except StoreError as error:
            return SessionState(stop_reason=self._stopped_here or f"store unavailable: {error}")

    def close(self) -> None:
        self._held.clear()
        for fd in self._members.values():
            os.close(fd)  # closing releases any lock still held
        self._members.clear()
        for batch in list(self._gates):
            self._open_gate(batch)
        if isinstance(self._wake, socket.socket):
            self._wake.close()
            with contextlib.suppress(OSError):
                os.unlink(self._wake_path)
        self._wake = None
        self._file.close()


# --- slots -------------------------------------------------------------------------------

QUEUE_FILE = "slots.queue"
BELL = "slots.bell"
#: How often the head of the line looks for slots freed by a process that died.
RESCAN_SECONDS = 0.1
#: How often it looks when it has no bell to wait on.
POLL_SECONDS = 0.005
HEAD_MARK = b"H"


class FileSlotPool:
    """``capacity`` slots as lock files in ``directory``, shared by every process using it."""

    _LAYOUT = struct.Struct("<qq")  # the next ticket; the oldest ticket whose file may remain

    def __init__(
        self,
        directory: Path,
        capacity: int,
        clock: Clock = MONOTONIC,
        rescan_seconds: float = RESCAN_SECONDS,
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, not {capacity!r}")
        self.directory = directory
        self.capacity = capacity
        self._clock = clock
        self._rescan_seconds = rescan_seconds
        self._queue = SharedFile(directory / QUEUE_FILE, self._LAYOUT)
        self._slot_fds: list[int] = []  # one per slot file, opened on first use, kept open
        self._held: set[int] = set()  # slots this process holds (flock cannot tell threads apart)
        self._lock = threading.Lock()
        self._bell_path = str(directory / BELL)
        self._ringer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._ringer.setblocking(False)

    # --- acquire ----------------------------------------------------------------------

    def acquire(self, max_wait_ns: int | None = None) -> Slot | None:
        deadline = None if max_wait_ns is None else self._clock.now_ns() + max(0, max_wait_ns)
        try:
            ticket, own = self._join()
        except OSError as error:  # the directory removed, a full disk
            raise session_error(self.directory, error) from None
        try:
            if not self._wait_turn(ticket, deadline):
                return None
            os.pwrite(own, HEAD_MARK, 0)
            self._clean_below(ticket)
            return self._find_slot(deadline)
        except OSError as error:
            raise session_error(self.directory, error) from None
        finally:
            os.close(own)  # leaves the line: the waiter behind wakes

    def _wait_path(self, ticket: int) -> str:
        return str(self.directory / f"slots.wait-{ticket}")

    def _join(self) -> tuple[int, int]:
        """Take a ticket and lock its file, both under the counter's lock: the next waiter
        never sees this one's file unlocked while it is in line."""
        with self._queue as stored:
            ticket, oldest = stored if stored else (0, 0)
            fd = os.open(self._wait_path(ticket), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: never contended
                self._queue.write(ticket + 1, oldest)
            except BaseException:
                os.close(fd)
                raise
        return ticket, fd

    def _wait_turn(self, ticket: int, deadline: int | None) -> bool:
        """Block until every waiter ahead left the line; ``False`` if the deadline came first."""
        for ahead in range(ticket - 1, -1, -1):
            try:
                fd = os.open(self._wait_path(ahead), os.O_RDONLY)
            except FileNotFoundError:
                return True  # removed by a head: that waiter, and all before it, are done
            try:
                if not _lock(fd, deadline, self._clock):
                    return False
                if os.pread(fd, 1, 0) == HEAD_MARK:
                    return True  # it was the head and is done: this one is the head now
            finally:
                os.close(fd)
            # It left the line before its turn (or died): wait for the one before it.
        return True

    def _clean_below(self, ticket: int) -> None:
        with self._queue as stored:
            assert stored is not None  # written when this waiter took its ticket
            next_ticket, oldest = stored
            if oldest < ticket:
                for old in range(oldest, ticket):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._wait_path(old))
                self._queue.write(next_ticket, ticket)

    def _find_slot(self, deadline: int | None) -> Slot | None:
        """The head's part: the first free slot, waiting for a release if none is free."""
        slot = self._scan()
        if slot is not None or (deadline is not None and deadline <= self._clock.now_ns()):
            return slot
        bell = self._bind_bell()
        try:
            while True:
                slot = self._scan()  # again: a release may have rung before the bell existed
                if slot is not None:
                    return slot
                wait = self._rescan_seconds if bell is not None else POLL_SECONDS
                if deadline is not None:
                    left = deadline - self._clock.now_ns()
                    if left <= 0:
                        return None
                    wait = min(wait, left / NANOS_PER_SECOND)
                if bell is None:
                    self._clock.sleep(wait)
                    continue
                bell.settimeout(wait)
                with contextlib.suppress(TimeoutError):
                    bell.recv(16)
        finally:
            if bell is not None:
                self._unbind_bell(bell)

    def _scan(self) -> Slot | None:
        """The first free slot. Slot files are opened (and created) as the scan reaches them
        and kept open: it stops at the first free one, so a process holds a file per slot
        in flight, plus one, whatever the cap."""
        with self._lock:
            fds = self._slot_fds
            held = self._held
            for index in range(self.capacity):
                if index == len(fds):
                    path = self.directory / f"slot-{index}"
                    fds.append(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
                if index in held:
                    continue
                try:
                    fcntl.flock(fds[index], fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                held.add(index)
                return Slot(index)
        return None

    def _bind_bell(self) -> socket.socket | None:
        bell = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._bell_path)  # a head that died leaves its socket file
            bell.bind(self._bell_path)
        except OSError:
            bell.close()
            return None
        return bell

    def _unbind_bell(self, bell: socket.socket) -> None:
        bound = os.fstat(bell.fileno()).st_ino
        bell.close()
        with contextlib.suppress(OSError):
            # Only this head's own socket file: never one a later head bound meanwhile.
            if os.stat(self._bell_path).st_ino != bound:
                return
            os.unlink(self._bell_path)

    # --- release ----------------------------------------------------------------------

    def release(self, slot: Slot) -> None:
        with self._lock:
            if not slot.live:
                return
            slot.live = False
            self._held.discard(slot.index)
            fcntl.flock(self._slot_fds[slot.index], fcntl.LOCK_UN)
        with contextlib.suppress(OSError):  # no head waiting: nobody to wake
            self._ringer.sendto(b"\0", self._bell_path)

    def in_use(self) -> int:
        """Slots held right now by any process (for tests and diagnostics: it briefly takes
        each free slot to find out)."""
        busy = 0
        for path in self.directory.glob("slot-*"):  # a slot never reached has no file
            fd = os.open(path, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy += 1
            finally:
                os.close(fd)
        return busy

    def describe(self) -> str:
        return f"file (shared by this session's workers), {self.capacity} slots"

    def close(self) -> None:
        """Close the files (which releases any slot still held) and the bell's sender."""
        with self._lock:
            for fd in self._slot_fds:
                os.close(fd)
            self._slot_fds.clear()
            self._held.clear()
        self._queue.close()
        self._ringer.close()


def _lock(fd: int, deadline: int | None, clock: Clock) -> bool:
    """Lock ``fd`` exclusively, blocking until ``deadline`` at most; whether it is locked.

    ``flock`` has no timeout: past a first try, a helper thread blocks on a duplicate of the
    descriptor (the same open file, so the same lock) while the caller waits for it with a
    timeout. A thread that gets the lock after its caller gave up closes its duplicate; the
    caller closes ``fd``; the lock goes with the last of the two.
    """
    if deadline is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        pass
    left = deadline - clock.now_ns()
    if left <= 0:
        return False
    locked = threading.Event()
    duplicate = os.dup(fd)

    def wait() -> None:
        try:
            fcntl.flock(duplicate, fcntl.LOCK_EX)
            locked.set()
        except OSError:
            pass
        finally:
            os.close(duplicate)

    threading.Thread(target=wait, name="ratebatch-slot-line", daemon=True).start()
    return locked.wait(left / NANOS_PER_SECOND)


# --- resources ---------------------------------------------------------------------------

RESOURCES_LOCK = "resources.lock"
RESOURCES_FILE = "resources.json"
OWNER_PREFIX = "resources.owner-"
#: The longest pause of a waiter for resources between two looks at the line.
RESOURCE_POLL_SECONDS = 0.02
_OWNER = r"[0-9]+-[0-9a-f]+"  # the pid, and random digits: a pid reused is another owner


class _Waiting:
    """A waiter in the resources' line."""

    __slots__ = ("amounts", "number", "owner", "priority", "token")

    def __init__(
        self, token: str, owner: str, priority: int, number: int, amounts: dict[str, float]
    ) -> None:
        self.token = token
        self.owner = owner
        self.priority = priority
        self.number = number  # arrival
        self.amounts = amounts

    def order(self) -> tuple[int, int]:
        return -self.priority, self.number


class _Resources:
    """The record: the holders (token -> owner, amounts) and the line, in order."""

    __slots__ = ("held", "line", "next_number")

    def __init__(self) -> None:
        self.held: dict[str, tuple[str, dict[str, float]]] = {}
        self.line: list[_Waiting] = []
        self.next_number = 0

    @classmethod
    def loads(cls, data: bytes) -> _Resources:
        state = cls()
        if not data:
            return state
        record = json.loads(data)
        state.next_number = int(record["next"])
        for token, owner, amounts in record["held"]:
            state.held[str(token)] = (str(owner), _amounts(amounts))
        state.line = [
            _Waiting(str(token), str(owner), int(priority), int(number), _amounts(amounts))
            for token, owner, priority, number, amounts in record["line"]
        ]
        return state

    def dumps(self) -> bytes:
        record = {
            "next": self.next_number,
            "held": [[token, owner, amounts] for token, (owner, amounts) in self.held.items()],
            "line": [
                [entry.token, entry.owner, entry.priority, entry.number, entry.amounts]
                for entry in self.line
            ],
        }
        return json.dumps(record, separators=(",", ":")).encode()

    def in_use(self) -> dict[str, float]:
        from ..limits.resources import total_amounts

        return total_amounts(amounts for _, amounts in self.held.values())

    def nobody_ahead(self, priority: int) -> bool:
        return not self.line or self.line[0].priority < priority

    def admit(self, capacity: Mapping[str, float]) -> bool:
        """Start the waiters at the head of the line while they fit; whether any did."""
        from ..limits.resources import admissible

        line = self.line
        count = admissible([entry.amounts for entry in line], self.in_use(), capacity)
        for entry in line[:count]:
            self.held[entry.token] = (entry.owner, entry.amounts)
        del line[:count]
        return count > 0

    def drop(self, token: str) -> bool:
        """Take ``token`` out of the holders or the line; whether it was in either."""
        if self.held.pop(token, None) is not None:
            return True
        for index, entry in enumerate(self.line):
            if entry.token == token:
                del self.line[index]
                return True
        return False


def _amounts(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ValueError(f"amounts are not a dict: {value!r}")
    return {str(name): float(amount) for name, amount in value.items()}


class FileResourcePool:
    """Declared resources (at most ``capacity`` of each) shared by every process using
    ``directory``: the holders and the line in one JSON record, under ``flock``."""

    def __init__(
        self,
        directory: Path,
        capacity: Mapping[str, float],
        clock: Clock = MONOTONIC,
        rescan_seconds: float = RESCAN_SECONDS,
    ) -> None:
        from ..limits.resources import parse_request

        self.capacity = parse_request(capacity)
        self.directory = directory
        self._clock = clock
        self._rescan_ns = int(rescan_seconds * NANOS_PER_SECOND)
        self._file = SharedFile(directory / RESOURCES_LOCK, _INT)  # the count of changes
        self._path = directory / RESOURCES_FILE
        self._owner = f"{os.getpid()}-{secrets.token_hex(6)}"
        self._owner_path = directory / f"{OWNER_PREFIX}{self._owner}"
        self._owner_fd = -1  # this pool's life: locked from its first request to ``close``
        self._tokens = itertools.count()
        self._lock = threading.Lock()
        self._swept_at: int | None = None  # when the entries of dead owners were last dropped

    # --- the record, under the lock ---------------------------------------------------

    def _read(self) -> _Resources:
        try:
            with open(self._path, "rb") as record:
                data = record.read()
        except FileNotFoundError:
            data = b""
        try:
            return _Resources.loads(data)
        except (ValueError, TypeError, KeyError) as error:  # never written so: not ours
            raise StoreError(f"the resources' record {self._path} is damaged: {error}") from None

    def _write(self, state: _Resources, changes: int) -> None:
        """Replace the record whole (a process killed while writing leaves the old one),
        and count the change, so that waiters see it."""
        aside = self._path.with_name(RESOURCES_FILE + ".new")  # one writer at a time: the lock
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            data = memoryview(state.dumps())
            while data:
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)
        os.replace(aside, self._path)
        self._file.write(changes + 1)

    def _sweep(self, state: _Resources, force: bool = False) -> bool:
        """Drop the entries of owners that died (at most every ``RESCAN_SECONDS``, unless
        ``force``); whether any were."""
        now = self._clock.now_ns()
        if not force and self._swept_at is not None and now - self._swept_at < self._rescan_ns:
            return False
        self._swept_at = now
        owners = {owner for owner, _ in state.held.values()}
        owners.update(entry.owner for entry in state.line)
        owners.discard(self._owner)
        dead = {owner for owner in owners if not self._alive(owner)}
        if not dead:
            return False
        state.held = {token: held for token, held in state.held.items() if held[0] not in dead}
        state.line = [entry for entry in state.line if entry.owner not in dead]
        return True

    def _alive(self, owner: str) -> bool:
        """Whether the pool ``owner`` is open: its file stays locked until it closes or its
        process dies (the kernel then lets go of the lock)."""
        if not re.fullmatch(_OWNER, owner):
            return False
        path = self.directory / f"{OWNER_PREFIX}{owner}"
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # its owner is gone: nobody will lock it again
        return False

    def _own(self) -> None:
        """Lock this pool's own file (once) before any entry names it."""
        with self._lock:
            if self._owner_fd >= 0:
                return
            fd = os.open(self._owner_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: never contended
            self._owner_fd = fd

    # --- acquire and release ----------------------------------------------------------

    def acquire(
        self, amounts: Mapping[str, float], max_wait_ns: int | None = None, priority: int = 0
    ) -> Slot | None:
        from ..limits.resources import check_request, parse_request

        wanted = parse_request(amounts)
        if not wanted:
            return Slot(-1)
        problem = check_request(wanted, self.capacity)
        if problem:
            raise ValueError(problem)
        queue = max_wait_ns is None or max_wait_ns > 0
        deadline = None if max_wait_ns is None else self._clock.now_ns() + max(0, max_wait_ns)
        token = f"{self._owner}-{next(self._tokens)}"
        try:
            self._own()
            granted, seen = self._attempt(token, wanted, priority, queue, None)
        except OSError as error:
            raise session_error(self.directory, error) from None
        if granted:
            return Slot(-1, token)
        if not queue:
            return None
        try:
            granted = self._wait(token, wanted, priority, deadline, seen)
        except BaseException:  # Ctrl-C, a failed directory: out of the line, amounts back
            with contextlib.suppress(StoreError, OSError):
                self._leave(token, keep=False)
            raise
        return Slot(-1, token) if granted else None

    def _attempt(
        self, token: str, wanted: dict[str, float], priority: int, queue: bool, seen: int | None
    ) -> tuple[bool, int]:
        """One look at the record: whether ``token`` holds its amounts (taking them if it
        may start, else standing in line if ``queue``), and the count of changes as seen. A
        waiter that saw the record at the count ``seen`` reads it again only if it changed
        since, or when dead owners are due to be looked for."""
        with self._file as stored:
            changes = int(stored[0]) if stored else 0
            if changes == seen and not self._sweep_due():
                return False, changes
            state = self._read()
            if token in state.held:  # handed over while it waited
                return True, changes
            # Not in line: a newcomer (or a waiter whose record was lost: it stands again).
            waiting = any(entry.token == token for entry in state.line)
            changed = False
            if not self._may_start(state, token, wanted, priority, waiting) and self._sweep(state):
                state.admit(self.capacity)  # the room of dead owners goes to the line first
                changed = True
            if token in state.held:
                pass
            elif self._may_start(state, token, wanted, priority, waiting):
                state.held[token] = (self._owner, wanted)
                changed = True
            elif not waiting and queue:
                entry = _Waiting(token, self._owner, priority, state.next_number, wanted)
                state.next_number += 1
                bisect.insort(state.line, entry, key=_Waiting.order)
                changed = True
            if changed:
                self._write(state, changes)
                changes += 1
            return token in state.held, changes

    def _may_start(
        self,
        state: _Resources,
        token: str,
        wanted: dict[str, float],
        priority: int,
        waiting: bool,
    ) -> bool:
        """Whether a newcomer may take ``wanted`` now: nobody waits ahead of it, and it fits.
        (A waiter is handed its amounts by whoever frees them.)"""
        from ..limits.resources import fits

        return (
            not waiting
            and state.nobody_ahead(priority)
            and fits(wanted, state.in_use(), self.capacity)
        )

    def _sweep_due(self) -> bool:
        swept_at = self._swept_at
        return swept_at is None or self._clock.now_ns() - swept_at >= self._rescan_ns

    def _wait(
        self,
        token: str,
        wanted: dict[str, float],
        priority: int,
        deadline: int | None,
        seen: int,
    ) -> bool:
        """Look at the line until ``token`` was handed its amounts (``True``) or the
        deadline passed (``False``, out of the line)."""
        pause = POLL_SECONDS
        while True:
            wait = pause
            if deadline is not None:
                left = deadline - self._clock.now_ns()
                if left <= 0:
                    return self._leave(token, keep=True)  # handed over just now: kept
                wait = min(wait, left / NANOS_PER_SECOND)
            self._clock.sleep(wait)
            try:
                granted, seen = self._attempt(token, wanted, priority, True, seen)
            except OSError as error:
                raise session_error(self.directory, error) from None
            if granted:
                return True
            pause = min(2 * pause, RESOURCE_POLL_SECONDS)

    def _leave(self, token: str, keep: bool) -> bool:
        """Take ``token`` out of the line, or (unless ``keep``) give back what it holds, the
        waiters behind then served; whether it holds amounts after this."""
        try:
            with self._file as stored:
                changes = int(stored[0]) if stored else 0
                state = self._read()
                if keep and token in state.held:
                    return True
                if state.drop(token):
                    state.admit(self.capacity)
                    self._write(state, changes)
                return False
        except OSError as error:
            raise session_error(self.directory, error) from None

    def release(self, slot: Slot) -> None:
        with self._lock:
            if not slot.live:
                return
            slot.live = False
        if slot.token:
            # Unreachable (the directory removed): the pool ends with the session anyway.
            with contextlib.suppress(StoreError):
                self._leave(slot.token, keep=False)

    def first_waiting(self) -> int | None:
        try:  # the record is replaced whole: read as it stands, without the lock
            line = self._read().line
        except OSError as error:
            raise session_error(self.directory, error) from None
        return line[0].priority if line else None

    def in_use(self) -> dict[str, float]:
        """The amounts held right now by every process (those of dead ones dropped)."""
        try:
            with self._file as stored:
                changes = int(stored[0]) if stored else 0
                state = self._read()
                if self._sweep(state, force=True):
                    state.admit(self.capacity)
                    self._write(state, changes)
                return state.in_use()
        except OSError as error:
            raise session_error(self.directory, error) from None

    def describe(self) -> str:
        from ..limits.resources import describe_amounts

        return (
            f"file (shared by this session's workers), resources {describe_amounts(self.capacity)}"
        )

    def close(self) -> None:
        """Give back what this pool holds and leave the line (the other processes would
        find it closed anyway), then let go of its own file."""
        with self._lock:
            fd, self._owner_fd = self._owner_fd, -1
        if fd >= 0:
            with contextlib.suppress(StoreError, OSError), self._file as stored:
                changes = int(stored[0]) if stored else 0
                state = self._read()
                before = (len(state.held), len(state.line))
                state.held = {
                    token: held for token, held in state.held.items() if held[0] != self._owner
                }
                state.line = [entry for entry in state.line if entry.owner != self._owner]
                if (len(state.held), len(state.line)) != before:
                    state.admit(self.capacity)
                    self._write(state, changes)
            with contextlib.suppress(OSError):
                os.unlink(self._owner_path)
            os.close(fd)
        self._file.close()
