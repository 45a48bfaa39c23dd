"""The bucket and the ledger in files, shared by the processes of one pytest-xdist session.

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
  exclusively until the batch is released.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
from pathlib import Path
from typing import Any

from . import gcra
from .clock import MONOTONIC, Clock
from .gcra import Outcome
from .ledger import Entry, SessionState, StopRule, check_stop, enter, finish, leave, release, stop
from .throttle.adapt import UNSET, BucketState, current_interval, throttle
from .windows import EMPTY, WindowedOutcome, Windows, commit_state, take_state

__all__ = ["FileBucketStore", "FileLedger", "SharedFile"]

BUCKET_FILE = "bucket"
LEDGER_FILE = "ledger"


class SharedFile:
    """A small fixed-size record in a file, read and written under an exclusive ``flock``."""

    def __init__(self, path: Path, layout: struct.Struct) -> None:
        self.path = path
        self._layout = layout
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._thread_lock = threading.Lock()  # flock does not exclude threads sharing an fd

    def __enter__(self) -> tuple[Any, ...] | None:
        self._thread_lock.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise
        data = os.pread(self._fd, self._layout.size, 0)
        return self._layout.unpack(data) if len(data) == self._layout.size else None

    def write(self, *values: object) -> None:
        """Only between ``__enter__`` and ``__exit__``."""
        os.pwrite(self._fd, self._layout.pack(*values), 0)

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
        os.close(self._fd)


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
    """The ``BucketState`` of ``throttle.adapt`` in a file: eight signed 64-bit integers."""

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
            outcome = take_state(
                state, self._logs(windows), self._now(), cost, interval_ns, burst, max_wait_ns,
                admit,
            )  # fmt: skip
            if outcome[0] != gcra.REFUSED:
                self._file.write(*state.values())
        return outcome

    def commit_windowed(
        self, cost: int, interval_ns: int, burst: int, slot_ns: int | None, windows: Windows
    ) -> WindowedOutcome:
        with self._file as stored:
            state = BucketState(*stored) if stored else BucketState()
            outcome = commit_state(
                state, self._logs(windows), self._now(), cost, interval_ns, burst, slot_ns
            )
            if outcome[0] == gcra.ADMITTED:
                self._file.write(*state.values())
        return outcome

    def level(self, interval_ns: int, burst: int, windows: Windows = ()) -> float:
        with self._file as stored:
            state = BucketState(*stored) if stored else BucketState()
            now = self._now()
            interval_ns = current_interval(state, now, interval_ns)
            tokens = gcra.level(state.reserved, state.admitted, now, interval_ns, burst)
            for log in self._logs(windows) if windows else ():
                tokens = min(tokens, log.free(now))
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
    """``SessionState`` in a file; the barrier and the gate as per-batch lock files."""

    _REASON_BYTES = 240
    _LAYOUT = struct.Struct(f"<qqqq?qqq{_REASON_BYTES}s")

    def __init__(self, directory: Path, clock: Clock = MONOTONIC) -> None:
        self.directory = directory
        self._file = SharedFile(directory / LEDGER_FILE, self._LAYOUT)
        self._now = clock.now_ns
        self._members: dict[int, int] = {}  # batch -> fd of its members file, kept open
        self._held: set[int] = set()  # batches whose members file this process holds shared
        self._gates: dict[int, int] = {}  # batch -> fd of the gate this process holds

    # --- the state record -------------------------------------------------------------

    def _load(self, stored: tuple[Any, ...] | None) -> SessionState:
        if stored is None:
            return SessionState()
        failures, batch, members, running, released, draining, drained, last, reason = stored
        assert isinstance(reason, bytes)
        return SessionState(
            failures=int(failures),
            stop_reason=reason.rstrip(b"\0").decode("utf-8", "replace"),
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
        with self._file as stored:
            state = self._load(stored)
            entry = enter(state, now, rule, batch_size)
            if entry.batch and entry.action in ("go", "join", "open"):
                self._hold(entry.batch)
            if entry.action == "open":
                gate = os.open(self._lock_path(entry.batch, "gate"), os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(gate, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: never contended
                self._gates[entry.batch] = gate
            self._save(state)
        return entry

    def release(self, batch: int) -> None:
        with self._file as stored:
            state = self._load(stored)
            release(state, batch)
            self._save(state)
        self._open_gate(batch)

    def _open_gate(self, batch: int) -> None:
        gate = self._gates.pop(batch, None)
        if gate is not None:
            os.unlink(self._lock_path(batch, "gate"))
            os.close(gate)

    def finish(self, batch: int, failed: bool, now: int) -> None:
        with self._file as stored:
            state = self._load(stored)
            finish(state, batch, failed, now)
            self._save(state)
        self._let_go(batch)

    def leave(self, batch: int) -> None:
        with self._file as stored:
            state = self._load(stored)
            leave(state, batch)
            self._save(state)
        self._let_go(batch)
        self._open_gate(batch)

    def stop(self, reason: str) -> str:
        with self._file as stored:
            state = self._load(stored)
            result = stop(state, reason)
            self._save(state)
        for batch in list(self._gates):
            self._open_gate(batch)
        return result

    def check_stop(self, now: int, rule: StopRule) -> str:
        with self._file as stored:
            state = self._load(stored)
            reason = check_stop(state, now, rule)
            if reason:
                self._save(state)
        return reason

    def wait_drained(self, batch: int) -> int:
        if batch < 1:
            return self.snapshot().drained_ns
        path = self._lock_path(batch, "members")
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return self.snapshot().drained_ns
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # returns when the last member let go, or died
            locked_at = self._now()
            os.unlink(path)
        finally:
            os.close(fd)
        state = self.snapshot()
        # A member that died never wrote its finish time: then the lock's release is the end.
        return state.drained_ns if state.draining <= 0 else locked_at

    def wait_released(self, batch: int) -> None:
        try:
            fd = os.open(self._lock_path(batch, "gate"), os.O_RDWR)
        except FileNotFoundError:
            return  # already released (the opener removes the gate)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        finally:
            os.close(fd)

    def snapshot(self) -> SessionState:
        with self._file as stored:
            return self._load(stored)

    def close(self) -> None:
        self._held.clear()
        for fd in self._members.values():
            os.close(fd)  # closing releases any lock still held
        self._members.clear()
        for batch in list(self._gates):
            self._open_gate(batch)
        self._file.close()
