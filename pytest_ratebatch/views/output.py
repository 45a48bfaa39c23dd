"""Writing the plugin's files (the JSON report, the timeline) whole or not at all.

A reader never sees half a file: the text goes to a temporary file beside the target, which
then replaces it. Whatever fails on the way (a full disk, a read-only or missing directory, a
name too long, a directory in the way) is one ``OutputError`` naming the path, and the
temporary file is gone. A new file gets the permissions the user's umask gives any new file;
a file written again keeps its own. A path that is neither a regular file nor a directory —
a symbolic link, a character device, a pipe (``/dev/stdout`` is all three in turn) — is
written through, as a shell's ``>`` would, never replaced: replacing ``/dev/stdout`` (a
root user may) would break the machine, not write the report.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

__all__ = ["OutputError", "write_atomically"]

#: The most bytes of the target's name kept in the temporary file's name: a name close to
#: the file system's limit must not make the temporary one too long.
_NAME_IN_TEMPORARY = 64


class OutputError(Exception):
    """A file that could not be written, with a one-line reason naming it."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: cannot be written ({reason})")
        self.path = path
        self.reason = reason


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole, or raise ``OutputError`` leaving nothing."""
    data = text.encode("utf-8")
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        existing = None
    except OSError as error:  # a name too long, a parent that is a file, ...
        raise OutputError(path, _reason(error)) from None
    if existing is not None and (stat.S_ISDIR(existing.st_mode) or os.path.isdir(path)):
        raise OutputError(path, "a directory")
    try:
        if existing is not None and not stat.S_ISREG(existing.st_mode):
            _write_through(path, data)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        _replace(path, data, None if existing is None else stat.S_IMODE(existing.st_mode))
    except OSError as error:
        raise OutputError(path, _reason(error)) from None


def _replace(path: Path, data: bytes, mode: int | None) -> None:
    """Write a temporary file beside ``path``, then rename it over ``path``."""
    name = path.name.encode("utf-8", "surrogateescape")[:_NAME_IN_TEMPORARY]
    stem = name.decode("utf-8", "ignore")
    temporary = path.with_name(f".{stem}.{secrets.token_hex(4)}.partial")
    # 0o666 less the umask, as for any new file (tempfile would make it 0o600).
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)  # the file it replaces keeps its permissions
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _write_through(path: Path, data: bytes) -> None:
    # As ``>`` does: a link's target is created if missing and emptied first.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
