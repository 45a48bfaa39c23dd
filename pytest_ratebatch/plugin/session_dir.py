"""pytest-xdist: one shared session directory, handed from the controller to its workers.

The controller creates a fresh directory per session (so no state of an earlier or
concurrent session can leak in), tells each worker where it is and when the session
started through ``workerinput``, and removes it at the end. Workers pace their own tests
against the file store and ledger in it (``stores.files``). Waits happen in workers, but only
the controller writes to the terminal: a worker announces a long wait with one datagram
on a Unix socket in the directory, and a thread of the controller prints it.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
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
    "SessionDirectory",
    "SharedSession",
    "WorkerSession",
    "worker_session",
]


WORKERINPUT_KEY = "ratebatch"
ANNOUNCE_SOCKET = "announce"
#: The start of every session directory's name, in the temporary directory.
DIRECTORY_PREFIX = "pytest-ratebatch-"


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

    def __init__(self, directory: Path, start_ns: int) -> None:
        super().__init__()
        self.directory = directory
        self.start_ns = start_ns
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        # Reentrant: an announcement holds it across its writes, each of which takes it too.
        self.output_lock = threading.RLock()

    @classmethod
    def create(cls) -> SharedSession:
        """A fresh directory; ``StoreError`` if none can be created."""
        try:
            directory = Path(tempfile.mkdtemp(prefix=DIRECTORY_PREFIX))
        except OSError as error:
            raise StoreError(
                f"no session directory can be created in {tempfile.gettempdir()}: "
                f"{error.strerror or error}"
            ) from None
        return cls(directory, MONOTONIC.now_ns())

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
