"""Slots shared by the processes of one pytest-xdist session, as lock files in its directory.

Slot *i* is held by holding the exclusive ``flock`` of the file ``slot-<i>``. The kernel
releases such a lock when its process dies, so a crashed worker never keeps a slot.

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
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import threading
from pathlib import Path

from ..clock import MONOTONIC, Clock
from ..policy import NANOS_PER_SECOND
from ..shared import SharedFile
from .pool import Slot

__all__ = ["POLL_SECONDS", "RESCAN_SECONDS", "FileSlotPool"]

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

    def __init__(self, directory: Path, capacity: int, clock: Clock = MONOTONIC) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, not {capacity!r}")
        self.directory = directory
        self.capacity = capacity
        self._clock = clock
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
        ticket, own = self._join()
        try:
            if not self._wait_turn(ticket, deadline):
                return None
            os.pwrite(own, HEAD_MARK, 0)
            self._clean_below(ticket)
            return self._find_slot(deadline)
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
                wait = RESCAN_SECONDS if bell is not None else POLL_SECONDS
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
        with self._lock:
            fds = self._slot_fds or self._open_slots()
            held = self._held
            for index, fd in enumerate(fds):
                if index in held:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                held.add(index)
                return Slot(index)
        return None

    def _open_slots(self) -> list[int]:
        for index in range(self.capacity):
            path = self.directory / f"slot-{index}"
            self._slot_fds.append(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        return self._slot_fds

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
        for index in range(self.capacity):
            fd = os.open(self.directory / f"slot-{index}", os.O_RDWR | os.O_CREAT, 0o600)
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
