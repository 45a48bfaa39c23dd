"""pytest-xdist: one shared session directory, handed from the controller to its workers.

The controller creates a fresh directory per session (so no state of an earlier or
concurrent session can leak in), tells each worker where it is and when the session
started through ``workerinput``, and removes it at the end. A controller killed before its
end (SIGKILL, a CI job cancelled) cannot: the next session that creates one removes the
directories left behind whose owner is provably dead (``remove_stale``). Workers pace their
own tests against the file store and ledger in it (``stores.files``). Waits happen in
workers, but only the controller writes to the terminal: a worker announces a long wait with
one datagram on a Unix socket in the directory, and a thread of the controller prints it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ..limits.clock import MONOTONIC
from ..stores.base import StoreError
from ..stores.files import FileBucketStore, FileLedger
from .reporter import ANNOUNCE_WAITS_FROM

__all__ = [
    "DIRECTORY_PREFIX",
    "OWNER_FILE",
    "SessionDirectory",
    "SharedSession",
    "WorkerSession",
    "owner_is_dead",
    "remove_stale",
    "this_machine",
    "worker_session",
]


WORKERINPUT_KEY = "ratebatch"
ANNOUNCE_SOCKET = "announce"
#: In place of a wait's seconds: the announcement is a warning, printed once per session.
WARNING = "warning"

#: The start of every session directory's name, in the temporary directory.
DIRECTORY_PREFIX = "pytest-ratebatch-"
#: The file that names a session directory's owner; the owner holds its ``flock`` for life.
OWNER_FILE = "owner"


def this_machine() -> dict[str, str] | None:
    """What makes process ids comparable: the same boot of the same kernel, the same pid
    namespace. ``None`` where the system does not tell (no ``/proc``): nothing is provable."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as boot:
            boot_id = boot.read().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return {"boot": boot_id, "pid_namespace": namespace}


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from ``/proc``); ``None`` if
    there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as status:
            text = status.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # the name in parentheses may hold spaces
    return fields[19] if len(fields) > 19 else None  # field 22 of proc(5): starttime


def owner_is_dead(owner: dict[str, Any], machine: dict[str, str]) -> bool:
    """Whether the process an owner record names is provably gone: the record comes from this
    boot and pid namespace, and its pid is not running or is another process (reused)."""
    if any(owner.get(key) != value for key, value in machine.items()):
        return False  # another machine, boot or container: its pids mean nothing here
    pid, started = owner.get("pid"), owner.get("started")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or not started:
        return False
    return bool(process_start(pid) != started)


def remove_stale(parent: Path, keep: Path | None = None) -> list[Path]:
    """Remove the session directories in ``parent`` whose owner is provably dead; the ones
    removed. Only this user's directories of this plugin (the name's prefix, an owner record)
    whose owner's lock is free and whose owner process is gone: never a live session's (it
    holds the lock), never another user's, never one nobody can prove dead."""
    machine = this_machine()
    if machine is None:
        return []
    removed = []
    uid = os.getuid()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.startswith(DIRECTORY_PREFIX) or (keep and entry.path == str(keep)):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
            continue
        try:
            fd = os.open(os.path.join(entry.path, OWNER_FILE), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # no owner record: not provably this plugin's, or not dead
        try:
            try:
                owner = json.loads(os.read(fd, 4096))
            except ValueError:
                continue
            if not isinstance(owner, dict) or not owner_is_dead(owner, machine):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # held: its owner lives after all (or another start removes it)
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
        finally:
            os.close(fd)
    return removed


class SessionDirectory:
    """A session's shared directory: its file bucket and ledger, opened on first use."""

    directory: Path
    start_ns: int

    def __init__(self) -> None:
        self._bucket: FileBucketStore | None = None
        self._ledger: FileLedger | None = None

    def bucket(self) -> FileBucketStore:
        if self._bucket is None:
            self._bucket = FileBucketStore(self.directory)
        return self._bucket

    def ledger(self) -> FileLedger:
        if self._ledger is None:
            self._ledger = FileLedger(self.directory)
        return self._ledger

    def _close_files(self) -> None:
        for part in (self._bucket, self._ledger):
            if part is not None:
                part.close()
        self._bucket = self._ledger = None


class SharedSession(SessionDirectory):
    """The controller's side: owns the directory and prints the workers' announcements."""

    def __init__(self, directory: Path, start_ns: int, owner_fd: int = -1) -> None:
        super().__init__()
        self.directory = directory
        self.start_ns = start_ns
        self._owner_fd = owner_fd  # its flock says the directory's owner lives
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        # Reentrant: an announcement holds it across its writes, each of which takes it too.
        self.output_lock = threading.RLock()

    @classmethod
    def create(cls) -> SharedSession:
        """A fresh directory owned by this process; then the stale ones of dead owners go.
        ``StoreError`` if none can be created."""
        try:
            directory = Path(tempfile.mkdtemp(prefix=DIRECTORY_PREFIX))
        except OSError as error:
            raise StoreError(
                f"no session directory can be created in {tempfile.gettempdir()}: "
                f"{error.strerror or error}"
            ) from None
        owner_fd = _claim(directory)
        remove_stale(directory.parent, keep=directory)
        return cls(directory, MONOTONIC.now_ns(), owner_fd)

    def workerinput(self, send_records: bool) -> dict[str, Any]:
        """What each worker needs; ``send_records``: whether the controller keeps records."""
        return {
            WORKERINPUT_KEY: {
                "directory": str(self.directory),
                "start_ns": self.start_ns,
                "send_records": send_records,
            }
        }

    def start_announcer(self, write: Callable[[str], None]) -> None:
        """Print each worker's announcement with ``write``, holding ``output_lock``. Where no
        socket can be bound (a full disk, a path too long for a socket's address) there are
        no announcements: they are a courtesy, the run goes on without them."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(self.directory / ANNOUNCE_SOCKET))
        except OSError:
            sock.close()
            return
        self._socket = sock

        def relay() -> None:
            while True:
                try:
                    message = sock.recv(4096)
                except OSError:
                    return
                if not message:
                    return  # the empty datagram of stop_announcer
                with self.output_lock:
                    write(message.decode("utf-8", "replace"))

        self._thread = threading.Thread(target=relay, name="ratebatch-announcer", daemon=True)
        self._thread.start()

    def stop_announcer(self) -> None:
        sock, thread = self._socket, self._thread
        self._socket = self._thread = None
        if sock is None or thread is None:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            try:
                sender.sendto(b"", str(self.directory / ANNOUNCE_SOCKET))
            except OSError:  # the socket's file is gone (the directory removed): wake it so
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        thread.join(timeout=5)
        sock.close()

    def close(self) -> None:
        self.stop_announcer()
        self._close_files()
        shutil.rmtree(self.directory, ignore_errors=True)
        if self._owner_fd >= 0:
            os.close(self._owner_fd)  # after the removal: nobody else removes it meanwhile
            self._owner_fd = -1


def _claim(directory: Path) -> int:
    """Name this process the directory's owner, and hold the record's lock for life (the
    kernel lets go of it when the process dies, however it dies). ``-1`` if it cannot: the
    directory then is never taken for stale."""
    try:
        fd = os.open(directory / OWNER_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: never contended
        machine = this_machine()
        started = process_start(os.getpid())
        if machine is not None and started is not None:
            # Written under the lock: a reader that sees a whole record saw the lock taken.
            record = {"pid": os.getpid(), "started": started, **machine}
            os.write(fd, json.dumps(record).encode("ascii"))
    except OSError:
        pass  # a record not written (a full disk) is never proof of death: the lock holds
    return fd


class WorkerSession(SessionDirectory):
    """A worker's side: the controller's directory and session start."""

    def __init__(self, directory: Path, start_ns: int, worker_id: str, send_records: bool) -> None:
        super().__init__()
        self.directory = directory
        self.start_ns = start_ns
        self.worker_id = worker_id
        self.send_records = send_records
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sender.setblocking(False)

    def announce(self, what: str, seconds: float) -> None:
        """Ask the controller to print a long wait; never blocks, never fails the test."""
        if seconds < ANNOUNCE_WAITS_FROM:
            return
        text = f"{self.worker_id}\t{seconds!r}\t{what}"
        with contextlib.suppress(OSError):
            self._sender.sendto(text.encode(), str(self.directory / ANNOUNCE_SOCKET))

    def warn(self, text: str) -> None:
        """Ask the controller to print a warning line (once for the session)."""
        message = f"{self.worker_id}\t{WARNING}\t{text}"
        with contextlib.suppress(OSError):
            self._sender.sendto(message.encode(), str(self.directory / ANNOUNCE_SOCKET))

    def close(self) -> None:
        self._sender.close()
        self._close_files()


def worker_session(config: pytest.Config) -> WorkerSession | None:
    """The shared session if this process is an xdist worker of a paced session."""
    workerinput = getattr(config, "workerinput", None)
    if not workerinput or WORKERINPUT_KEY not in workerinput:
        return None
    data = workerinput[WORKERINPUT_KEY]
    session = WorkerSession(
        Path(data["directory"]),
        int(data["start_ns"]),
        str(workerinput.get("workerid", "gw?")),
        bool(data["send_records"]),
    )
    config.add_cleanup(session.close)
    return session
