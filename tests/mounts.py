"""Real file system faults for a subprocess: a full disk, a read-only file system, a device
that is always full, each a mount in a private mount namespace (``unshare``, as an
unprivileged user through a user namespace). Nothing outside the command's namespace sees
them, and they go when it ends.

A missing ``unshare`` (util-linux), or a kernel that refuses user namespaces, fails the
tests that need it: they do not skip.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

__all__ = ["FILL_SCRIPT", "in_mount_namespace"]

#: Fill a directory to its last byte: ``sh -c FILL_SCRIPT sh DIRECTORY``.
FILL_SCRIPT = 'cat /dev/zero > "$1/.fill" 2>/dev/null; true'


def in_mount_namespace(
    command: Sequence[str],
    *,
    full: Path | None = None,
    empty: Path | None = None,
    read_only: Path | None = None,
    full_device: Path | None = None,
    listing: Path | None = None,
) -> list[str]:
    """``command`` run where ``full`` is a small tmpfs filled to the last byte, ``empty`` a
    small tmpfs left empty (the command may fill it: ``FILL_SCRIPT``), ``read_only`` a
    read-only tmpfs, and ``full_device`` (a directory) holds ``full``: ``/dev/full``, which
    refuses every write with "No space left on device". Afterwards the names in each of these
    directories (hidden ones too) are written to ``listing``, one a line, since the mounts
    end with the command. The command's exit status is kept."""
    steps = ["set -e"]
    shown = []
    if full is not None:
        steps.append(f"mount -t tmpfs -o size=256k tmpfs {shlex.quote(str(full))}")
        steps.append(f"sh -c {shlex.quote(FILL_SCRIPT)} sh {shlex.quote(str(full))}")
        shown.append(full)
    if empty is not None:
        steps.append(f"mount -t tmpfs -o size=1m tmpfs {shlex.quote(str(empty))}")
        shown.append(empty)
    if read_only is not None:
        steps.append(f"mount -t tmpfs -o ro,size=64k tmpfs {shlex.quote(str(read_only))}")
        shown.append(read_only)
    if full_device is not None:
        device = shlex.quote(str(full_device / "full"))
        steps.append(f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(full_device))}")
        steps.append(f": > {device}")
        steps.append(f"mount --bind /dev/full {device}")  # replacing it fails: a mount point
        shown.append(full_device)
    steps.append("set +e")
    steps.append('"$@"')
    steps.append("status=$?")
    if listing is not None:
        target = shlex.quote(str(listing))
        steps.append(f": > {target}")
        for directory in shown:
            steps.append(f"ls -A {shlex.quote(str(directory))} >> {target}")
    steps.append("exit $status")
    script = "\n".join(steps)
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *command]
