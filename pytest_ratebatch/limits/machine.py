"""Machine gates: start a test only while the machine has memory to spare and is not busy.

Like GNU parallel's ``--memfree`` and ``--load`` and make's ``-l``: a floor of available
memory (``MemoryFloor``: bytes, or a share of the total) and a ceiling on the 1-minute load
average. Here are their parsing, the decision on one reading (``blocked_by``), the settle
rule after a start and the ``/proc/meminfo`` format; reading the machine and waiting are
``engine.machine``'s. Pure: no I/O, integer bytes and nanoseconds.
"""

from __future__ import annotations

import re

from .values import Value

__all__ = [
    "LOAD",
    "MAX_LOAD",
    "MAX_MEMORY_BYTES",
    "MEMORY",
    "SETTLE_NS",
    "MemoryFloor",
    "beyond_total",
    "blocked",
    "blocked_by",
    "describe_gates",
    "format_bytes",
    "parse_max_load",
    "parse_meminfo",
    "parse_memory_size",
    "settle_remaining_ns",
]

#: The gates' names, as ``blocked_by`` and ``MachineGate.last_bound`` report them.
MEMORY = "memory"
LOAD = "load"

#: The largest memory floor: 1 EiB, far above any machine, and exact in a float too.
MAX_MEMORY_BYTES = 2**60
#: The largest ``--max-load``: a load average stays far below it even on huge machines.
MAX_LOAD = 1_000_000.0

#: How long after a start a reading is not trusted yet, and the next start waits. A test's
#: memory shows in ``MemAvailable`` only as it allocates: its imports and fixtures, mostly in
#: its first second. The load average lags far more (the kernel samples it every 5 s and it
#: decays over a minute), so no short settle makes it current: a second keeps a burst of
#: tests from starting on one reading, and ``--max-load`` stays as coarse as make's ``-l``.
SETTLE_NS = 1_000_000_000

_KIB = 1024
#: Units, case-insensitive. A single letter is binary, as GNU parallel's capitals, ``sort
#: -S``, Docker and systemd read it; ``KB``/``MB``/... are SI (powers of 1000) and
#: ``KiB``/``MiB``/... IEC (powers of 1024), strictly as the standards spell them.
_UNITS = {
    "": 1,
    "b": 1,
    "k": _KIB,
    "kb": 1000,
    "kib": _KIB,
    "m": _KIB**2,
    "mb": 1000**2,
    "mib": _KIB**2,
    "g": _KIB**3,
    "gb": 1000**3,
    "gib": _KIB**3,
    "t": _KIB**4,
    "tb": 1000**4,
    "tib": _KIB**4,
}
_UNITS_TEXT = "B, K/KB/KiB, M/MB/MiB, G/GB/GiB or T/TB/TiB"
#: For display, largest first: up to the largest floor (1 EiB).
_BINARY = (
    (_KIB**6, "EiB"),
    (_KIB**5, "PiB"),
    (_KIB**4, "TiB"),
    (_KIB**3, "GiB"),
    (_KIB**2, "MiB"),
    (_KIB, "KiB"),
)
_DECIMAL = ((1000**4, "TB"), (1000**3, "GB"), (1000**2, "MB"), (1000, "KB"))
# Patterns, not compiled objects: re compiles them on first use, so a session without a
# machine gate never pays for them. ASCII digits only, as the policy's parsers read them.
_SIZE = r"([+-]?)([0-9]*)(?:\.([0-9]*))?\s*([a-zA-Z]*|%)"
_LOAD = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
#: The longest number read (a longer one is a mistake, and ``int`` refuses past 4300 digits).
_MAX_DIGITS = 30


class MemoryFloor(Value):
    """How much memory must be available for a test to start: ``bytes``, or a ``fraction``
    of the machine's total (exactly one of them is set)."""

    __slots__ = ("bytes", "fraction")
    bytes: int | None
    fraction: float | None

    def __init__(self, bytes: int | None = None, fraction: float | None = None) -> None:
        if (bytes is None) == (fraction is None):
            raise ValueError("a memory floor is either bytes or a fraction of the total")
        if bytes is not None and (
            isinstance(bytes, bool)
            or not isinstance(bytes, int)
            or not 0 < bytes <= MAX_MEMORY_BYTES
        ):
            raise ValueError(f"bytes must be a whole number from 1 to 2**60, not {bytes!r}")
        if fraction is not None and not 0 < fraction < 1:  # also refuses NaN
            raise ValueError(f"fraction must be above 0 and below 1, not {fraction!r}")
        self._set(bytes=bytes, fraction=fraction)

    def required(self, total_bytes: int) -> int:
        """The bytes that must be available on a machine with ``total_bytes`` of memory."""
        if self.bytes is not None:
            return self.bytes
        assert self.fraction is not None
        return round(total_bytes * self.fraction)  # a byte either way: no float artefacts

    def describe(self) -> str:
        """``512 MiB``, ``2 GB``, ``10%``: as the user wrote it, normalised."""
        if self.fraction is not None:
            return f"{_format_number(self.fraction * 100, 6)}%"
        assert self.bytes is not None
        shown = format_bytes(self.bytes)
        if "." in shown:  # not a whole number of binary units: perhaps of SI ones (2GB)
            for unit, name in _DECIMAL:
                if self.bytes >= unit and self.bytes % unit == 0:
                    return f"{self.bytes // unit} {name}"
        return shown


def parse_memory_size(text: str) -> MemoryFloor:
    """A memory floor from ``512MiB``, ``2GiB``, ``1.5G``, ``4000000KB``, ``10%``.

    Units are case-insensitive: ``B``; ``K``, ``M``, ``G``, ``T`` are powers of 1024 (as GNU
    parallel reads its capitals and ``sort -S``, Docker and systemd read them all);
    ``KB``, ``MB``, ``GB``, ``TB`` powers of 1000 (SI) and ``KiB``, ``MiB``, ``GiB``, ``TiB``
    powers of 1024 (IEC), strictly. A number without a unit is bytes; decimals are allowed
    and rounded up to a whole byte; from 1 byte to 1 EiB (2**60 bytes). A percentage
    (``10%``, ``12.5%``) is a share of the machine's total memory, above 0 and below 100.
    """
    shown = _quote(text)
    match = re.fullmatch(_SIZE, text.strip())
    if match is None or not (match.group(2) or match.group(3)):
        raise ValueError(f"{shown}: expected a size such as 512MiB, 2GiB or 10%")
    sign, whole, decimals, unit = match.groups()
    decimals = decimals or ""
    if len(whole) + len(decimals) > _MAX_DIGITS:
        raise ValueError(f"{shown}: too many digits")
    numerator = int(whole + decimals or "0") * (-1 if sign == "-" else 1)
    denominator = 10 ** len(decimals)
    if unit == "%":
        if not 0 < numerator < 100 * denominator:
            raise ValueError(f"{shown}: a percentage must be above 0 and below 100")
        return MemoryFloor(fraction=numerator / (100 * denominator))
    multiplier = _UNITS.get(unit.lower())
    if multiplier is None:
        raise ValueError(f"{shown}: unknown unit {unit!r} (use {_UNITS_TEXT})")
    size = -(-numerator * multiplier // denominator)  # exact, rounded up to a whole byte
    if size <= 0:
        raise ValueError(f"{shown}: must be more than 0 bytes")
    if size > MAX_MEMORY_BYTES:
        raise ValueError(f"{shown}: must be at most 1 EiB (2**60 bytes)")
    return MemoryFloor(bytes=size)


def parse_max_load(text: str) -> float:
    """A load average ceiling from ``4``, ``2.5`` or ``1e3``: above 0, at most ``MAX_LOAD``."""
    shown = _quote(text)
    compact = text.strip()
    if not re.fullmatch(_LOAD, compact):
        raise ValueError(f"{shown}: expected a load average such as 4 or 2.5")
    value = float(compact)  # a huge exponent gives inf: the bound refuses it
    if not 0 < value <= MAX_LOAD:
        raise ValueError(f"{shown}: must be above 0 and at most {MAX_LOAD:.0f}")
    return value


def format_bytes(count: int) -> str:
    """Bytes to read at a glance, in binary units: ``512 MiB``, ``1.5 GiB``, ``300 B``."""
    for unit, name in _BINARY:
        if count >= unit:
            if count % unit == 0:
                return f"{count // unit} {name}"
            return f"{count / unit:.1f} {name}"
    return f"{count} B"


def describe_gates(floor: MemoryFloor | None, max_load: float | None) -> str:
    """For the session header: ``min free memory 512 MiB, max load 4`` ("" without gates)."""
    parts = []
    if floor is not None:
        parts.append(f"min free memory {floor.describe()}")
    if max_load is not None:
        parts.append(f"max load {_format_number(max_load, 6)}")
    return ", ".join(parts)


def blocked_by(
    floor: MemoryFloor | None,
    max_load: float | None,
    available: int | None,
    total: int | None,
    load: float | None,
) -> tuple[str, str]:
    """Which gate holds a start back on this reading, and why: ``(MEMORY, reason)``,
    ``(LOAD, reason)``, or ``("", "")`` when the start may go.

    ``available`` and ``total`` are bytes, ``load`` the 1-minute load average; ``None`` is a
    value that could not be read, which holds nothing back (whether the machine can read it
    at all is checked once, when the session starts). Memory is checked first: running out
    of it is what hurts.
    """
    if floor is not None and available is not None and total is not None:
        required = floor.required(total)
        if available < required:
            of_total = f" of {format_bytes(total)}" if floor.fraction is not None else ""
            return MEMORY, (
                f"available memory {format_bytes(available)} is below {floor.describe()}{of_total}"
            )
    if max_load is not None and load is not None and load >= max_load:
        shown, limit = _format_number(load, 2), _format_number(max_load, 6)
        relation = "has reached" if shown == limit else "is above"
        return LOAD, f"load average {shown} {relation} {limit}"
    return "", ""


def blocked(
    floor: MemoryFloor | None,
    max_load: float | None,
    available: int | None,
    total: int | None,
    load: float | None,
) -> str:
    """Why this reading holds a start back, e.g. ``available memory 300 MiB is below 512
    MiB`` or ``load average 5.2 is above 4``; "" when the start may go (see ``blocked_by``)."""
    return blocked_by(floor, max_load, available, total, load)[1]


def beyond_total(floor: MemoryFloor, total: int) -> str:
    """Why ``floor`` can never be met on a machine with ``total`` bytes, or "" if it can: a
    floor above the total would hold every test back until the session's timeout."""
    required = floor.required(total)
    if required > total:
        return (
            f"min free memory {floor.describe()} is more than this machine's memory "
            f"({format_bytes(total)})"
        )
    return ""


def settle_remaining_ns(now_ns: int, last_start_ns: int | None, settle_ns: int = SETTLE_NS) -> int:
    """How long until a reading can be trusted, given the latest start (``None``: none yet):
    0 once ``settle_ns`` passed since it."""
    if last_start_ns is None:
        return 0
    return max(0, last_start_ns + settle_ns - now_ns)


def parse_meminfo(data: bytes) -> tuple[int, int] | None:
    """``(available, total)`` bytes from ``/proc/meminfo``'s ``MemAvailable`` and
    ``MemTotal``; ``None`` if either is missing (``MemAvailable`` came with Linux 3.14)."""
    found: dict[bytes, int] = {}
    for line in data.splitlines():
        name, _, rest = line.partition(b":")
        if name in (b"MemTotal", b"MemAvailable"):
            fields = rest.split()
            # The kernel writes "kB" and means KiB.
            if len(fields) == 2 and fields[1] == b"kB" and fields[0].isdigit():
                found[name] = int(fields[0]) * _KIB
            if len(found) == 2:
                return found[b"MemAvailable"], found[b"MemTotal"]
    return None


def _format_number(value: float, places: int) -> str:
    return f"{value:.{places}f}".rstrip("0").rstrip(".") or "0"


def _quote(text: str) -> str:
    """``text`` quoted for a message, cut short if long (a value can be any length)."""
    return repr(text) if len(text) <= 40 else f"{text[:40]!r}..."
