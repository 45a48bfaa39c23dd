"""``MachineGate``: hold a start back while the machine is short of memory or busy.

The readings come from ``SystemReadings`` (``/proc/meminfo``, ``os.getloadavg``; psutil only
where those are missing) or any ``MachineReadings``; the decisions and the settle rule are
``limits.machine``'s. The gate polls, since nothing announces freed memory; each poll reads
only what a gate is set for, and a gate without a floor or a ceiling reads nothing at all.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from typing import Any, Protocol

from ..limits.clock import Clock
from ..limits.machine import (
    SETTLE_NS,
    MemoryFloor,
    beyond_total,
    blocked_by,
    describe_gates,
    parse_meminfo,
    settle_remaining_ns,
)
from ..limits.policy import NANOS_PER_SECOND

__all__ = ["POLL_SECONDS", "MachineGate", "MachineReadings", "SystemReadings"]

#: How often a held-back start reads the machine again. A reading costs some microseconds,
#: so four a second cost nothing, and a quarter second is short next to the settle time and
#: to a test; freed memory is seen within it.
POLL_SECONDS = 0.25

#: Enough for ``MemTotal`` and ``MemAvailable``, the first and third lines.
_MEMINFO_READ = 4096


class MachineReadings(Protocol):
    """What the machine has now; ``None``: cannot be read."""

    def memory(self) -> tuple[int, int] | None:
        """``(available, total)`` memory in bytes."""
        ...

    def load(self) -> float | None:
        """The 1-minute load average."""
        ...


class SystemReadings:
    """This machine's readings: Linux's ``/proc/meminfo`` (``MemAvailable``, the kernel's
    own estimate of what can be allocated without swapping) and ``os.getloadavg``; psutil,
    imported at the first reading those cannot give, elsewhere (macOS memory, Windows)."""

    def __init__(self, meminfo_path: str = "/proc/meminfo") -> None:
        self._meminfo_path = meminfo_path
        self._proc_memory = True  # until /proc/meminfo turns out missing or without the lines
        self._psutil: Any = None
        self._psutil_tried = False

    def memory(self) -> tuple[int, int] | None:
        if self._proc_memory:
            try:
                reading = _read_meminfo(self._meminfo_path)
            except FileNotFoundError:
                reading = None
            except OSError:  # out of file descriptors, say: try again at the next reading
                return None
            if reading is not None:
                return reading
            self._proc_memory = False
        psutil = self._psutil_module()
        if psutil is None:
            return None
        try:
            memory = psutil.virtual_memory()
            return int(memory.available), int(memory.total)
        except Exception:  # psutil's own errors: no reading, not a failed session
            return None

    def load(self) -> float | None:
        getloadavg = getattr(os, "getloadavg", None)  # missing on Windows
        if getloadavg is not None:
            try:
                return float(getloadavg()[0])
            except OSError:  # the system would not tell
                pass
        psutil = self._psutil_module()
        if psutil is None:
            return None
        try:
            return float(psutil.getloadavg()[0])
        except Exception:
            return None

    def supported(self, need_memory: bool, need_load: bool) -> str:
        """Why this machine cannot give a reading the gates need ("" if it can): for a usage
        error at the session's start, rather than gates that never hold anything back."""
        reasons = []
        if need_memory and self.memory() is None:
            reasons.append(
                "cannot read the available memory on this machine (no MemAvailable in "
                f"{self._meminfo_path}, and psutil is not installed or failed)"
            )
        if need_load and self.load() is None:
            reasons.append(
                "cannot read the load average on this machine (os.getloadavg failed, and "
                "psutil is not installed or failed)"
            )
        return "; ".join(reasons)

    def _psutil_module(self) -> Any:
        """psutil, imported once and only when needed; ``None`` if it is not installed."""
        if not self._psutil_tried:
            self._psutil_tried = True
            try:
                import importlib

                self._psutil = importlib.import_module("psutil")  # optional, never required
            except ImportError:
                self._psutil = None
        return self._psutil


def _read_meminfo(path: str) -> tuple[int, int] | None:
    """One small read: the file is generated on each read, and its first lines suffice."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, _MEMINFO_READ)
    finally:
        os.close(fd)
    return parse_meminfo(data)


class MachineGate:
    """Holds a start back until the machine has ``floor`` memory available and its load
    average is below ``max_load`` (``None``: that gate is off).

    After a start, readings are trusted only once ``settle_ns`` passed (``SETTLE_NS``): the
    test's own memory shows late. ``wait`` records its pass as a start, so that two threads
    never pass on one reading; ``started`` records the test's actual start, after any later
    wait (tokens, a slot), from which the settle then counts. Safe for the threads of one
    process; every process (an xdist worker) has its own gate and settles on its own starts.
    """

    def __init__(
        self,
        floor: MemoryFloor | None,
        max_load: float | None,
        readings: MachineReadings,
        clock: Clock,
        settle_ns: int = SETTLE_NS,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        if max_load is not None and not (math.isfinite(max_load) and max_load > 0):
            raise ValueError(f"max_load must be a number > 0, not {max_load!r}")
        if settle_ns < 0:
            raise ValueError(f"settle_ns must be >= 0, not {settle_ns!r}")
        if not (math.isfinite(poll_seconds) and poll_seconds > 0):
            raise ValueError(f"poll_seconds must be > 0, not {poll_seconds!r}")
        self.floor = floor
        self.max_load = max_load
        self.readings = readings
        #: Whether any gate is set: without one, ``wait`` and ``started`` do nothing.
        self.active = floor is not None or max_load is not None
        self._clock = clock
        self._settle_ns = settle_ns
        self._poll_ns = max(1, round(poll_seconds * NANOS_PER_SECOND))
        self._lock = threading.Lock()  # around the latest start, and the reading it decides
        self._last_start_ns: int | None = None
        self._bound = threading.local()  # each thread's own ``last_bound``

    @property
    def last_bound(self) -> str:
        """The gate that held this thread's latest ``wait`` back (``"memory"`` or ``"load"``,
        the latest if both did), or "" if it passed at once."""
        gate: str = getattr(self._bound, "gate", "")
        return gate

    def describe(self) -> str:
        """For the session header: ``min free memory 512 MiB, max load 4``."""
        return describe_gates(self.floor, self.max_load)

    def unreachable(self) -> str:
        """Why the memory floor can never be met here, e.g. more than the machine's total
        (checked once, at the start); "" if it can be, or memory cannot be read."""
        if self.floor is None:
            return ""
        memory = self.readings.memory()
        return "" if memory is None else beyond_total(self.floor, memory[1])

    def started(self) -> None:
        """A test started now: the next reading waits for the settle time."""
        if not self.active:
            return
        with self._lock:
            now = self._clock.now_ns()
            last = self._last_start_ns
            self._last_start_ns = now if last is None else max(last, now)

    def wait(self, deadline_ns: int | None, sleep: Callable[[float], None]) -> tuple[int, str]:
        """Block until a trusted reading lets a start go: ``(waited_ns, "")``. At
        ``deadline_ns`` (``None``: none), a last reading decides: ``(waited_ns, reason)``,
        e.g. ``waited for memory: available memory 300 MiB is below 512 MiB``, if it holds
        the start back; the caller cancels the test with it.

        Sleeps through ``sleep``, which the caller makes raise when the session stops (the
        exception propagates), and never asks it to sleep past the deadline.
        """
        if not self.active:
            return 0, ""
        clock = self._clock
        bound = self._bound
        bound.gate = ""
        began = clock.now_ns()
        while True:
            with self._lock:
                now = clock.now_ns()
                late = deadline_ns is not None and now >= deadline_ns
                last = self._last_start_ns
                pause = settle_remaining_ns(now, last, self._settle_ns)
                if not pause or late:  # at the deadline, even an unsettled reading decides
                    gate, reason = self._check()
                    if not gate:
                        self._last_start_ns = now if last is None else max(last, now)
                        return now - began, ""
                    bound.gate = gate
                    if late:
                        return now - began, f"waited for {gate}: {reason}"
                    pause = self._poll_ns
            if deadline_ns is not None:
                pause = min(pause, deadline_ns - now)
            sleep(pause / NANOS_PER_SECOND)

    def _check(self) -> tuple[str, str]:
        """``blocked_by`` on a reading of what the gates need (the load is not read while
        memory holds the start back)."""
        floor = self.floor
        if floor is not None:
            memory = self.readings.memory()
            if memory is not None:
                available, total = memory
                held = blocked_by(floor, None, available, total, None)
                if held[0]:
                    return held
        if self.max_load is None:
            return "", ""
        return blocked_by(None, self.max_load, None, None, self.readings.load())
