"""Machine gates: the memory floor and the load ceiling, their parsing, and the gate's waits
(on fake readings and a fake clock: nothing sleeps for real)."""

from __future__ import annotations

import itertools
import os
import sys
import threading
import types
from pathlib import Path

import pytest

from pytest_ratebatch.engine.machine import POLL_SECONDS, MachineGate, SystemReadings
from pytest_ratebatch.limits.machine import (
    LOAD,
    MAX_MEMORY_BYTES,
    MEMORY,
    SETTLE_NS,
    MemoryFloor,
    beyond_total,
    blocked,
    blocked_by,
    describe_gates,
    format_bytes,
    parse_max_load,
    parse_meminfo,
    parse_memory_size,
    settle_remaining_ns,
)
from tests.fakes import FakeClock

SECOND = 1_000_000_000
KIB, MIB, GIB, TIB = 1024, 1024**2, 1024**3, 1024**4

# --- parsing ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", 1),
        ("4096", 4096),
        ("0.5", 1),  # rounded up to a whole byte
        ("10B", 10),
        ("10b", 10),
        ("1K", KIB),
        ("1k", KIB),
        ("1KB", 1000),
        ("1kb", 1000),
        ("1KiB", KIB),
        ("1kib", KIB),
        ("512M", 512 * MIB),
        ("512MB", 512 * 1000**2),
        ("512MiB", 512 * MIB),
        ("512mib", 512 * MIB),
        ("2G", 2 * GIB),
        ("2GB", 2 * 1000**3),
        ("2GiB", 2 * GIB),
        ("1T", TIB),
        ("1TB", 1000**4),
        ("1TiB", TIB),
        ("1.5GiB", 3 * GIB // 2),
        ("1.5G", 3 * GIB // 2),
        (".5MiB", MIB // 2),
        ("2.MiB", 2 * MIB),
        ("0.1KB", 100),  # exact: no float rounding to 101
        ("1.0000001KiB", KIB + 1),  # rounded up
        (" 512 MiB ", 512 * MIB),
        ("+1GiB", GIB),
        ("1048576TiB", MAX_MEMORY_BYTES),
    ],
)
def test_sizes_in_every_unit(text: str, expected: int) -> None:
    assert parse_memory_size(text) == MemoryFloor(bytes=expected)


@pytest.mark.parametrize(
    ("text", "fraction"), [("10%", 0.1), ("12.5%", 0.125), ("0.5 %", 0.005), ("99.9%", 0.999)]
)
def test_percentages(text: str, fraction: float) -> None:
    floor = parse_memory_size(text)
    assert floor.bytes is None
    assert floor.fraction == pytest.approx(fraction)


SIZE_EXPECTED = "expected a size such as 512MiB, 2GiB or 10%"
UNITS = "B, K/KB/KiB, M/MB/MiB, G/GB/GiB or T/TB/TiB"
OTHER_DIGITS = "\u0661\u0662MiB"  # Arabic-Indic digits: str.isdigit, but not what we read


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lots", f"'lots': {SIZE_EXPECTED}"),
        ("", f"'': {SIZE_EXPECTED}"),
        ("   ", f"'   ': {SIZE_EXPECTED}"),
        ("MiB", f"'MiB': {SIZE_EXPECTED}"),
        (".", f"'.': {SIZE_EXPECTED}"),
        ("%", f"'%': {SIZE_EXPECTED}"),
        ("1..5G", f"'1..5G': {SIZE_EXPECTED}"),
        ("1e9", f"'1e9': {SIZE_EXPECTED}"),
        ("1,5G", f"'1,5G': {SIZE_EXPECTED}"),
        ("5 GiB free", f"'5 GiB free': {SIZE_EXPECTED}"),
        (OTHER_DIGITS, f"{OTHER_DIGITS!r}: {SIZE_EXPECTED}"),
        ("5XB", f"'5XB': unknown unit 'XB' (use {UNITS})"),
        ("1PiB", f"'1PiB': unknown unit 'PiB' (use {UNITS})"),
        ("1e", f"'1e': unknown unit 'e' (use {UNITS})"),
        ("0", "'0': must be more than 0 bytes"),
        ("0.0GiB", "'0.0GiB': must be more than 0 bytes"),
        ("-5MiB", "'-5MiB': must be more than 0 bytes"),
        ("1048577TiB", "'1048577TiB': must be at most 1 EiB (2**60 bytes)"),
        ("1" * 31, f"{'1' * 31!r}: too many digits"),
        ("0%", "'0%': a percentage must be above 0 and below 100"),
        ("100%", "'100%': a percentage must be above 0 and below 100"),
        ("150%", "'150%': a percentage must be above 0 and below 100"),
        ("-10%", "'-10%': a percentage must be above 0 and below 100"),
        ("x" * 50, f"{'x' * 40!r}...: {SIZE_EXPECTED}"),  # a long value is cut short
    ],
)
def test_bad_sizes_say_why(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=r".") as raised:
        parse_memory_size(text)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("text", "expected"), [("4", 4.0), ("2.5", 2.5), (" .5 ", 0.5), ("1e3", 1000.0), ("1e6", 1e6)]
)
def test_max_load(text: str, expected: float) -> None:
    assert parse_max_load(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("busy", "'busy': expected a load average such as 4 or 2.5"),
        ("", "'': expected a load average such as 4 or 2.5"),
        ("nan", "'nan': expected a load average such as 4 or 2.5"),
        ("inf", "'inf': expected a load average such as 4 or 2.5"),
        ("1_000", "'1_000': expected a load average such as 4 or 2.5"),
        ("0", "'0': must be above 0 and at most 1000000"),
        ("-1", "'-1': must be above 0 and at most 1000000"),
        ("1000001", "'1000001': must be above 0 and at most 1000000"),
        ("1e999", "'1e999': must be above 0 and at most 1000000"),
    ],
)
def test_bad_max_loads_say_why(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=r".") as raised:
        parse_max_load(text)
    assert str(raised.value) == message


def test_a_floor_is_bytes_or_a_fraction() -> None:
    assert MemoryFloor(bytes=512 * MIB).required(16 * GIB) == 512 * MIB
    assert MemoryFloor(fraction=0.1).required(1000) == 100
    assert MemoryFloor(fraction=0.25).required(16 * GIB) == 4 * GIB
    for wrong in [
        {},
        {"bytes": 1, "fraction": 0.5},
        {"bytes": 0},
        {"bytes": MAX_MEMORY_BYTES + 1},
        {"bytes": True},
        {"fraction": 0.0},
        {"fraction": 1.0},
        {"fraction": float("nan")},
    ]:
        with pytest.raises(ValueError, match=r"."):
            MemoryFloor(**wrong)  # type: ignore[arg-type]
    floor = MemoryFloor(bytes=1)
    with pytest.raises(AttributeError):
        floor.bytes = 2
    assert hash(floor) == hash(MemoryFloor(bytes=1))


@pytest.mark.parametrize(
    ("text", "described"),
    [
        ("512MiB", "512 MiB"),
        ("2G", "2 GiB"),
        ("1.5GiB", "1.5 GiB"),
        ("2GB", "2 GB"),
        ("4000000KB", "4 GB"),
        ("1234567", "1.2 MiB"),
        ("100", "100 B"),
        ("10%", "10%"),
        ("12.5%", "12.5%"),
    ],
)
def test_floors_describe_themselves(text: str, described: str) -> None:
    assert parse_memory_size(text).describe() == described


def test_format_bytes() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(KIB) == "1 KiB"
    assert format_bytes(300 * MIB) == "300 MiB"
    assert format_bytes(24_269_868 * KIB) == "23.1 GiB"
    assert format_bytes(MAX_MEMORY_BYTES) == "1 EiB"


# --- decisions ---

FLOOR = MemoryFloor(bytes=512 * MIB)


def test_blocked_names_what_holds_a_start_back() -> None:
    assert blocked(FLOOR, 4, 300 * MIB, 16 * GIB, 1.0) == (
        "available memory 300 MiB is below 512 MiB"
    )
    assert blocked(FLOOR, 4, 512 * MIB, 16 * GIB, 5.2) == "load average 5.2 is above 4"
    assert blocked(None, 4, None, None, 4.0) == "load average 4 has reached 4"  # below N only
    assert blocked(None, 2.5, None, None, 2.499) == ""
    assert blocked(FLOOR, 4, 512 * MIB, 16 * GIB, 3.99) == ""
    assert blocked(MemoryFloor(fraction=0.1), None, 1 * GIB, 16 * GIB, None) == (
        "available memory 1 GiB is below 10% of 16 GiB"
    )
    assert blocked(None, None, 0, 16 * GIB, 100.0) == ""


def test_blocked_by_names_the_gate_memory_first() -> None:
    assert blocked_by(FLOOR, 4, 300 * MIB, 16 * GIB, 9.0) == (
        MEMORY,
        "available memory 300 MiB is below 512 MiB",
    )
    assert blocked_by(FLOOR, 4, GIB, 16 * GIB, 9.0) == (LOAD, "load average 9 is above 4")
    assert blocked_by(FLOOR, 4, GIB, 16 * GIB, 1.0) == ("", "")


def test_an_unread_value_holds_nothing_back() -> None:
    assert blocked_by(FLOOR, 4, None, None, None) == ("", "")
    assert blocked_by(FLOOR, 4, 300 * MIB, None, None) == ("", "")


def test_a_floor_above_the_machine_can_never_be_met() -> None:
    assert beyond_total(MemoryFloor(bytes=32 * GIB), 16 * GIB) == (
        "min free memory 32 GiB is more than this machine's memory (16 GiB)"
    )
    assert beyond_total(MemoryFloor(bytes=16 * GIB), 16 * GIB) == ""
    assert beyond_total(MemoryFloor(fraction=0.99), 16 * GIB) == ""


def test_describe_gates() -> None:
    assert describe_gates(FLOOR, 4.0) == "min free memory 512 MiB, max load 4"
    assert describe_gates(None, 2.5) == "max load 2.5"
    assert describe_gates(None, None) == ""


def test_settle_counts_from_the_latest_start() -> None:
    assert settle_remaining_ns(10 * SECOND, None) == 0
    assert settle_remaining_ns(10 * SECOND, 10 * SECOND) == SETTLE_NS
    assert settle_remaining_ns(10 * SECOND, 10 * SECOND - SETTLE_NS // 4) == 3 * SETTLE_NS // 4
    assert settle_remaining_ns(10 * SECOND, 9 * SECOND, settle_ns=SECOND) == 0
    assert settle_remaining_ns(10 * SECOND, 5 * SECOND, settle_ns=0) == 0


MEMINFO = (
    b"MemTotal:       24683652 kB\n"
    b"MemFree:        23959432 kB\n"
    b"MemAvailable:   24269868 kB\n"
    b"Buffers:            3420 kB\n"
)


def test_meminfo() -> None:
    assert parse_meminfo(MEMINFO) == (24_269_868 * KIB, 24_683_652 * KIB)
    assert parse_meminfo(MEMINFO.replace(b"MemAvailable", b"MemSpare")) is None  # Linux < 3.14
    assert parse_meminfo(b"") is None
    assert parse_meminfo(b"MemTotal: 12 kB\nMemAvailable: lots kB\n") is None


# --- the machine's readings ---


def test_this_machine_reads_sane_values() -> None:
    readings = SystemReadings()
    if os.path.exists("/proc/meminfo"):
        memory = readings.memory()
        assert memory is not None
        available, total = memory
        assert 0 <= available <= total
        assert total > 16 * MIB
    load = readings.load()
    assert load is not None
    assert load >= 0
    assert readings.supported(need_memory=os.path.exists("/proc/meminfo"), need_load=True) == ""


class FakePsutil(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("psutil")

    def virtual_memory(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(available=3 * GIB, total=8 * GIB)

    def getloadavg(self) -> tuple[float, float, float]:
        return (1.5, 1.0, 0.5)


def test_psutil_only_where_proc_and_getloadavg_are_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "psutil", FakePsutil())
    meminfo = tmp_path / "meminfo"
    meminfo.write_bytes(MEMINFO)
    readings = SystemReadings(str(meminfo))
    assert readings.memory() == (24_269_868 * KIB, 24_683_652 * KIB)
    meminfo.unlink()
    assert readings.memory() == (3 * GIB, 8 * GIB)
    monkeypatch.delattr(os, "getloadavg", raising=False)
    assert readings.load() == 1.5
    assert readings.supported(need_memory=True, need_load=True) == ""


def test_a_machine_without_any_reading_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil raises ImportError
    monkeypatch.delattr(os, "getloadavg", raising=False)
    missing = str(tmp_path / "meminfo")
    readings = SystemReadings(missing)
    assert readings.memory() is None
    assert readings.load() is None
    assert readings.supported(need_memory=False, need_load=False) == ""
    assert readings.supported(need_memory=True, need_load=False) == (
        f"cannot read the available memory on this machine (no MemAvailable in {missing}, "
        "and psutil is not installed or failed)"
    )
    assert readings.supported(need_memory=True, need_load=True).count("cannot read") == 2
    assert "load average" in readings.supported(need_memory=False, need_load=True)


# --- the gate ---


class FakeReadings:
    """Readings that change over (fake) time: each a list of ``(from_seconds, value)``,
    seconds after the clock's start; every read recorded with its time."""

    def __init__(
        self,
        clock: FakeClock,
        memory: list[tuple[float, tuple[int, int] | None]] | None = None,
        load: list[tuple[float, float | None]] | None = None,
    ) -> None:
        self._clock = clock
        self._origin = clock.now_ns()
        self._memory = memory or [(0, (8 * GIB, 16 * GIB))]
        self._load = load or [(0, 0.5)]
        self.reads: list[tuple[str, float]] = []

    def _elapsed(self) -> float:
        return (self._clock.now_ns() - self._origin) / SECOND

    def memory(self) -> tuple[int, int] | None:
        elapsed = self._elapsed()
        self.reads.append((MEMORY, elapsed))
        return [value for since, value in self._memory if since <= elapsed][-1]

    def load(self) -> float | None:
        elapsed = self._elapsed()
        self.reads.append((LOAD, elapsed))
        return [value for since, value in self._load if since <= elapsed][-1]


LOW = (300 * MIB, 16 * GIB)
HIGH = (8 * GIB, 16 * GIB)


def gate(
    clock: FakeClock,
    readings: FakeReadings,
    floor: MemoryFloor | None = FLOOR,
    max_load: float | None = 4.0,
) -> MachineGate:
    return MachineGate(floor, max_load, readings, clock)


def test_the_gate_passes_at_once_on_a_good_reading(clock: FakeClock) -> None:
    readings = FakeReadings(clock)
    machine = gate(clock, readings)
    assert machine.wait(None, clock.sleep) == (0, "")
    assert clock.sleeps == []
    assert readings.reads == [(MEMORY, 0), (LOAD, 0)]
    assert machine.last_bound == ""


def test_without_gates_nothing_is_read(clock: FakeClock) -> None:
    readings = FakeReadings(clock)
    machine = gate(clock, readings, floor=None, max_load=None)
    assert not machine.active
    machine.started()
    assert machine.wait(clock.now_ns(), clock.sleep) == (0, "")
    assert machine.wait(None, clock.sleep) == (0, "")
    assert readings.reads == []
    assert clock.sleeps == []


def test_each_gate_reads_only_what_it_needs(clock: FakeClock) -> None:
    readings = FakeReadings(clock)
    assert gate(clock, readings, max_load=None).wait(None, clock.sleep) == (0, "")
    assert gate(clock, readings, floor=None).wait(None, clock.sleep) == (0, "")
    assert [what for what, _ in readings.reads] == [MEMORY, LOAD]


def test_the_gate_waits_until_memory_frees(clock: FakeClock) -> None:
    readings = FakeReadings(clock, memory=[(0, LOW), (1.1, HIGH)])
    machine = gate(clock, readings)
    waited, reason = machine.wait(None, clock.sleep)
    assert (waited, reason) == (round(1.25 * SECOND), "")
    assert clock.sleeps == [POLL_SECONDS] * 5
    assert machine.last_bound == MEMORY
    # While memory held the start back, the load was not read.
    assert readings.reads == [(MEMORY, 0.25 * n) for n in range(5)] + [
        (MEMORY, 1.25),
        (LOAD, 1.25),
    ]


def test_the_gate_waits_until_the_load_falls(clock: FakeClock) -> None:
    readings = FakeReadings(clock, load=[(0, 6.0), (0.5, 4.0), (0.7, 3.5)])
    machine = gate(clock, readings)
    assert machine.wait(None, clock.sleep) == (round(0.75 * SECOND), "")
    assert machine.last_bound == LOAD


def test_readings_after_a_start_wait_for_the_settle_time(clock: FakeClock) -> None:
    readings = FakeReadings(clock)
    machine = gate(clock, readings)
    machine.started()
    clock.advance(0.4)
    assert machine.wait(None, clock.sleep) == (round(0.6 * SECOND), "")
    assert clock.sleeps == [0.6]  # the rest of the settle, then one reading
    assert readings.reads == [(MEMORY, 1.0), (LOAD, 1.0)]


def test_a_pass_counts_as_a_start_so_two_never_pass_on_one_reading(clock: FakeClock) -> None:
    readings = FakeReadings(clock)
    machine = gate(clock, readings)
    assert machine.wait(None, clock.sleep) == (0, "")
    assert machine.wait(None, clock.sleep) == (SETTLE_NS, "")
    assert clock.sleeps == [SETTLE_NS / SECOND]


def test_the_settle_counts_from_the_latest_start(clock: FakeClock) -> None:
    readings = FakeReadings(clock)
    machine = MachineGate(FLOOR, None, readings, clock, settle_ns=2 * SECOND)
    assert machine.wait(None, clock.sleep) == (0, "")
    clock.advance(1.5)
    machine.started()  # the test's actual start, after its tokens
    assert machine.wait(None, clock.sleep) == (2 * SECOND, "")


def test_a_settled_gate_polls_while_held_back(clock: FakeClock) -> None:
    readings = FakeReadings(clock, memory=[(0, LOW), (2.0, HIGH)])
    machine = MachineGate(FLOOR, None, readings, clock, settle_ns=0, poll_seconds=0.5)
    assert machine.wait(None, clock.sleep) == (2 * SECOND, "")
    assert clock.sleeps == [0.5] * 4


@pytest.mark.parametrize(
    ("memory", "load", "reason"),
    [
        ([(0, LOW)], [(0, 0.5)], "waited for memory: available memory 300 MiB is below 512 MiB"),
        ([(0, HIGH)], [(0, 5.2)], "waited for load: load average 5.2 is above 4"),
        ([(0, LOW)], [(0, 5.2)], "waited for memory: available memory 300 MiB is below 512 MiB"),
        ([(0, HIGH), (0.6, LOW)], [(0, 5.2)], "waited for memory: available memory 300 MiB is "),
    ],
)
def test_the_gate_gives_up_exactly_at_the_deadline(
    clock: FakeClock,
    memory: list[tuple[float, tuple[int, int] | None]],
    load: list[tuple[float, float | None]],
    reason: str,
) -> None:
    readings = FakeReadings(clock, memory=memory, load=load)
    machine = gate(clock, readings)
    began = clock.now_ns()
    deadline = began + round(1.1 * SECOND)

    def sleep(seconds: float) -> None:
        assert clock.now_ns() + round(seconds * SECOND) <= deadline  # never past it
        clock.sleep(seconds)

    waited, said = machine.wait(deadline, sleep)
    assert waited == deadline - began
    assert clock.now_ns() == deadline
    assert said.startswith(reason)
    assert clock.sleeps == [POLL_SECONDS] * 4 + [pytest.approx(0.1)]
    assert machine.last_bound == said.split(":")[0].removeprefix("waited for ")


def test_a_deadline_already_passed_takes_one_reading(clock: FakeClock) -> None:
    readings = FakeReadings(clock, memory=[(0, LOW)])
    machine = gate(clock, readings)
    assert machine.wait(clock.now_ns() - SECOND, clock.sleep) == (
        0,
        "waited for memory: available memory 300 MiB is below 512 MiB",
    )
    assert clock.sleeps == []
    assert gate(clock, FakeReadings(clock)).wait(clock.now_ns(), clock.sleep) == (0, "")


def test_a_deadline_within_the_settle_time_is_not_slept_past(clock: FakeClock) -> None:
    readings = FakeReadings(clock, load=[(0, 9.0)])
    machine = gate(clock, readings)
    machine.started()
    deadline = clock.now_ns() + SECOND // 2
    assert machine.wait(deadline, clock.sleep) == (
        SECOND // 2,
        "waited for load: load average 9 is above 4",
    )
    assert clock.sleeps == [0.5]
    # The reading at the deadline decides, settled or not; a good one lets the start go.
    fine = gate(clock, FakeReadings(clock))
    fine.started()
    assert fine.wait(clock.now_ns() + SECOND // 4, clock.sleep) == (SECOND // 4, "")


class Stopped(Exception):
    pass


def test_a_stop_during_the_wait_propagates(clock: FakeClock) -> None:
    readings = FakeReadings(clock, memory=[(0, LOW)])
    machine = gate(clock, readings)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise Stopped
        clock.sleep(seconds)

    with pytest.raises(Stopped):
        machine.wait(clock.now_ns() + 10 * SECOND, sleep)
    assert sleeps == [POLL_SECONDS] * 3


def test_an_unreadable_value_holds_nothing_back(clock: FakeClock) -> None:
    readings = FakeReadings(clock, memory=[(0, None)], load=[(0, None)])
    assert gate(clock, readings).wait(None, clock.sleep) == (0, "")


def test_the_gate_checks_its_values(clock: FakeClock) -> None:
    readings = FakeReadings(clock)
    with pytest.raises(ValueError, match=r"max_load must be"):
        MachineGate(FLOOR, 0.0, readings, clock)
    with pytest.raises(ValueError, match=r"max_load must be"):
        MachineGate(FLOOR, float("nan"), readings, clock)
    with pytest.raises(ValueError, match=r"settle_ns must be"):
        MachineGate(FLOOR, 4.0, readings, clock, settle_ns=-1)
    for poll in (0.0, float("inf")):
        with pytest.raises(ValueError, match=r"poll_seconds must be"):
            MachineGate(FLOOR, 4.0, readings, clock, poll_seconds=poll)


def test_the_gate_describes_itself_and_a_floor_it_can_never_meet(clock: FakeClock) -> None:
    readings = FakeReadings(clock)
    assert gate(clock, readings).describe() == "min free memory 512 MiB, max load 4"
    assert gate(clock, readings).unreachable() == ""
    assert gate(clock, readings, floor=None).unreachable() == ""
    assert gate(clock, readings, floor=MemoryFloor(bytes=32 * GIB)).unreachable() == (
        "min free memory 32 GiB is more than this machine's memory (16 GiB)"
    )


class LockedClock(FakeClock):
    """A fake clock that threads may share: its sleeps advance it atomically."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def sleep(self, seconds: float) -> None:
        with self._lock:
            super().sleep(seconds)


def test_threads_pass_one_at_a_time_a_settle_time_apart() -> None:
    clock = LockedClock()
    readings = FakeReadings(clock)
    machine = MachineGate(FLOOR, 4.0, readings, clock)
    reasons: list[str] = []

    def start() -> None:
        reasons.append(machine.wait(None, clock.sleep)[1])

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert reasons == [""] * 8
    # Every reading passed, and each pass was claimed under the gate's lock as it was read:
    # the next reading waited for the settle time after it, whichever thread slept.
    passes = [elapsed for what, elapsed in readings.reads if what == LOAD]
    assert len(passes) == 8
    gaps = [later - earlier for earlier, later in itertools.pairwise(passes)]
    assert all(gap >= SETTLE_NS / SECOND - 1e-9 for gap in gaps)
