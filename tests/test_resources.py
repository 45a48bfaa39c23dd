"""Declared resources: the parsing and arithmetic (``limits.resources``), and each pool alone
(threads, real processes, a real redis-server): amounts that fit, a strict line by priority
then arrival, waits that run out, holders that die."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from pytest_ratebatch.limits.resources import (
    admissible,
    check_request,
    describe_amounts,
    fits,
    parse_request,
    parse_resources,
    total_amounts,
)
from pytest_ratebatch.stores.base import ResourcePool, Slot, StoreError
from pytest_ratebatch.stores.files import OWNER_PREFIX, RESOURCES_FILE, FileResourcePool
from pytest_ratebatch.stores.memory import MemoryResourcePool
from pytest_ratebatch.stores.redis import RedisResourcePool
from tests.redis_server import RedisServer, free_port

SECOND = 1_000_000_000
REPO_ROOT = Path(__file__).resolve().parent.parent
CAPACITY = {"memory": 8, "gpu": 2}


def eventually(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Wait (really) until ``condition()`` holds: for another thread or process to get going."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


# --- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("memory=8, gpu=2", {"memory": 8, "gpu": 2}),
        ("memory = 8\ngpu=1.5", {"memory": 8, "gpu": 1.5}),
        ("memory=8 gpu=2,", {"memory": 8, "gpu": 2}),
        ("GPU=1, gpu=2", {"GPU": 1, "gpu": 2}),  # names are case-sensitive
        ("_db.pool-1=.5 big=1e12 tiny=2.5e-3", {"_db.pool-1": 0.5, "big": 1e12, "tiny": 0.0025}),
        ("", {}),
        ("  \n\t ", {}),
    ],
)
def test_parse_resources_reads_name_amount_pairs(text: str, expected: dict[str, float]) -> None:
    parsed = parse_resources(text)
    assert parsed == expected
    assert all(isinstance(amount, float) for amount in parsed.values())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("memory", 'expected NAME=AMOUNT, got "memory"'),
        ("memory 8", 'expected NAME=AMOUNT, got "memory"'),
        ("gpu=-1", '"gpu=-1": an amount must be a positive number'),
        ("gpu=0", '"gpu=0": an amount must be a positive number'),
        ("gpu=+1", '"gpu=+1": an amount must be a positive number'),
        ("gpu=", '"gpu=": an amount must be a positive number'),
        ("gpu=two", '"gpu=two": an amount must be a positive number'),
        ("gpu=nan", '"gpu=nan": an amount must be a positive number'),
        ("gpu=inf", '"gpu=inf": an amount must be a positive number'),
        ("gpu=\u0661", '"gpu=\u0661": an amount must be a positive number'),  # Arabic-Indic 1
        ("gpu=1=2", '"gpu=1=2": an amount must be a positive number'),
        ("gpu=2e12", '"gpu=2e12": an amount must be at most 1e12'),
        ("gpu=1e999", '"gpu=1e999": an amount must be at most 1e12'),
        ("memory=8, memory=4", 'name "memory" given twice'),
        ("1gpu=1", '"1gpu=1": a name starts with a letter or _'),
        ("=2", '"=2": a name starts with a letter or _'),
        ("gp\u00fc=1", '"gp\u00fc=1": a name starts with a letter or _'),
        ("memory=8, " + "x" * 60 + "=y", '"' + "x" * 40 + '..."'),  # long parts cut short
    ],
)
def test_parse_resources_names_the_bad_part(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        parse_resources(text)


def test_parse_request_takes_a_dict_of_positive_numbers() -> None:
    assert parse_request({"memory": 2, "gpu": 0.5}) == {"memory": 2.0, "gpu": 0.5}
    assert parse_request({}) == {}
    assert parse_request({"big": 10**12}) == {"big": 1e12}
    request = {"memory": 2}
    copy = parse_request(request)
    assert copy is not request
    assert isinstance(copy["memory"], float)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("memory=2", 'resources must be a dict of names to amounts (e.g. {"memory": 2}), not'),
        (["memory"], "resources must be a dict"),
        ({1: 2}, "a resource name must be a string, not"),
        ({"1gpu": 1}, 'resource "1gpu": a name starts with a letter or _'),
        ({"gpu": True}, 'resource "gpu": an amount must be a number, not "True"'),
        ({"gpu": "2"}, 'resource "gpu": an amount must be a number, not "\'2\'"'),
        ({"gpu": None}, 'resource "gpu": an amount must be a number, not "None"'),
        ({"gpu": 0}, 'resource "gpu": an amount must be a positive number, not "0"'),
        ({"gpu": -1.5}, 'resource "gpu": an amount must be a positive number, not "-1.5"'),
        ({"gpu": math.nan}, 'resource "gpu": an amount must be a positive number, not "nan"'),
        ({"gpu": math.inf}, 'resource "gpu": an amount must be at most 1e12, not "inf"'),
        ({"gpu": 10**12 + 1}, 'resource "gpu": an amount must be at most 1e12'),
        ({"gpu": 10**400}, 'resource "gpu": an amount must be at most 1e12'),
        ({"gpu": -(10**400)}, 'resource "gpu": an amount must be a positive number'),
    ],
)
def test_parse_request_names_the_problem(value: object, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        parse_request(value)


def test_check_request_says_why_a_request_can_never_fit() -> None:
    capacity = parse_resources("memory=8, gpu=2")
    assert check_request({"memory": 8, "gpu": 2}, capacity) == ""
    assert check_request({}, capacity) == ""
    assert check_request({"tpu": 1}, capacity) == "needs tpu=1 but --resources has no tpu"
    assert check_request({"memory": 10}, capacity) == (
        "needs memory=10, more than the capacity memory=8"
    )
    assert check_request({"memory": 8.5, "tpu": 1.5}, capacity) == (
        "needs memory=8.5, more than the capacity memory=8; "
        "needs tpu=1.5 but --resources has no tpu"
    )


def test_fits_allows_for_rounding_and_nothing_more() -> None:
    capacity = {"memory": 8.0, "cpu": 0.3}
    assert fits({"memory": 8}, {}, capacity)
    assert fits({"memory": 2}, {"memory": 6}, capacity)
    assert not fits({"memory": 2.001}, {"memory": 6}, capacity)
    assert fits({"cpu": 0.2}, {"cpu": 0.1}, capacity)  # 0.1 + 0.2 > 0.3 in floats
    assert 0.1 + 0.2 > 0.3
    assert not fits({"cpu": 0.2}, {"cpu": 0.1 + 1e-6}, capacity)
    assert not fits({"gpu": 1}, {}, capacity)  # a resource the capacity lacks: none of it
    assert fits({}, {"memory": 8}, capacity)  # nothing always fits
    assert fits({"memory": 1}, {"gpu": 5}, capacity)  # other names held do not matter


def test_admissible_stops_at_the_first_request_that_does_not_fit() -> None:
    capacity = {"memory": 8.0}
    line = [{"memory": 3.0}, {"memory": 3.0}, {"memory": 4.0}, {"memory": 1.0}]
    assert admissible(line, {}, capacity) == 2  # the 1 behind the 4 does not jump the line
    assert admissible(line, {"memory": 6.0}, capacity) == 0
    assert admissible([], {}, capacity) == 0
    assert admissible(line[:2], {"memory": 2.0}, capacity) == 2


def test_total_and_description_of_amounts() -> None:
    assert total_amounts([{"memory": 2.0}, {"memory": 1.5, "gpu": 1.0}, {}]) == {
        "memory": 3.5,
        "gpu": 1.0,
    }
    assert describe_amounts({"memory": 2.0, "gpu": 1.0}) == "gpu=1, memory=2"
    assert describe_amounts({"memory": 1.5, "big": 1e12}) == "big=1000000000000, memory=1.5"
    assert describe_amounts({}) == ""


# --- the pools: one set of tests for every backend -----------------------------------------


class Harness:
    """Pools of one kind sharing one capacity: ``pool()`` gives another sharer (another
    thread's view of the one memory pool, another worker's file pool, another session's
    Redis pool); ``waiting()`` counts the line."""

    def __init__(self, kind: str, tmp_path: Path, redis_url: str = "", key: str = "") -> None:
        self.kind = kind
        self.directory = tmp_path
        self.redis_url = redis_url
        self.key = key
        self.pools: list[ResourcePool] = []

    def pool(self, capacity: Mapping[str, float] = CAPACITY) -> ResourcePool:
        made: ResourcePool
        if self.kind == "memory":
            if self.pools:
                return self.pools[0]
            made = MemoryResourcePool(capacity)
        elif self.kind == "file":
            made = FileResourcePool(self.directory, capacity)
        else:
            made = RedisResourcePool(self.redis_url, self.key, capacity)
        self.pools.append(made)
        return made

    def waiting(self) -> int:
        pool = self.pools[0]
        if isinstance(pool, MemoryResourcePool):
            return len(pool._line)
        if isinstance(pool, FileResourcePool):
            return file_line_length(self.directory)
        assert isinstance(pool, RedisResourcePool)
        client = pool._client
        return int(client.zcard(pool.keys[1]))

    def close(self) -> None:
        for pool in self.pools:
            pool.close()


def file_line_length(directory: Path) -> int:
    try:
        record = json.loads((directory / RESOURCES_FILE).read_bytes())
    except FileNotFoundError:
        return 0
    return len(record["line"])


@pytest.fixture(params=["memory", "file", "redis"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")  # missing: fails
        key = f"resources-{os.getpid()}-{request.node.name}".replace("[", "-").replace("]", "")
        made = Harness("redis", tmp_path, server.url, key)
    else:
        made = Harness(request.param, tmp_path)
    yield made
    made.close()


class Waiter(threading.Thread):
    """A thread that asks ``pool`` for ``amounts`` and notes what it got."""

    def __init__(
        self,
        pool: ResourcePool,
        name: str,
        amounts: Mapping[str, float],
        log: list[str],
        max_wait_ns: int | None = None,
        priority: int = 0,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.pool = pool
        self.amounts = amounts
        self.log = log
        self.max_wait_ns = max_wait_ns
        self.priority = priority
        self.slot: Slot | None = None

    def run(self) -> None:
        self.slot = self.pool.acquire(self.amounts, self.max_wait_ns, self.priority)
        self.log.append(self.name if self.slot is not None else f"{self.name}: none")

    def served(self) -> Slot:
        self.join(timeout=15)
        assert not self.is_alive(), f"{self.name} was not served"
        assert self.slot is not None
        return self.slot


def stand_in_line(
    harness: Harness,
    name: str,
    amounts: Mapping[str, float],
    log: list[str],
    max_wait_ns: int | None = None,
    priority: int = 0,
) -> Waiter:
    """A waiter started in a thread, once it is in line."""
    before = harness.waiting()
    waiter = Waiter(harness.pool(), name, amounts, log, max_wait_ns, priority)
    waiter.start()
    eventually(lambda: harness.waiting() == before + 1)
    return waiter


def test_amounts_that_fit_are_held_and_given_back_once(harness: Harness) -> None:
    pool, other = harness.pool(), harness.pool()
    assert pool.capacity == {"memory": 8.0, "gpu": 2.0}
    first = pool.acquire({"memory": 6})
    assert first is not None
    assert first.token
    assert other.acquire({"memory": 4}, 0) is None  # 6 + 4 > 8
    second = other.acquire({"memory": 2, "gpu": 2}, 0)
    assert second is not None
    assert second.token != first.token
    assert pool.in_use() == {"memory": 8, "gpu": 2}
    assert other.acquire({"gpu": 0.5}, 0) is None
    pool.release(first)
    pool.release(first)  # a second release of the same handle does nothing
    assert other.in_use() == {"memory": 2, "gpu": 2}
    third = other.acquire({"memory": 4}, 0)
    assert third is not None
    other.release(second)
    other.release(third)
    assert pool.in_use() == {}
    assert harness.waiting() == 0


def test_a_request_of_nothing_takes_nothing_and_never_waits(harness: Harness) -> None:
    pool = harness.pool()
    held = pool.acquire({"memory": 8, "gpu": 2})
    assert held is not None
    log: list[str] = []
    waiter = stand_in_line(harness, "waiter", {"memory": 1}, log)
    nothing = harness.pool().acquire({}, 0)
    assert nothing is not None
    assert pool.in_use() == {"memory": 8, "gpu": 2}
    pool.release(nothing)
    assert pool.in_use() == {"memory": 8, "gpu": 2}
    pool.release(held)
    pool.release(waiter.served())


def test_a_request_that_can_never_fit_is_refused_at_once(harness: Harness) -> None:
    pool = harness.pool()
    with pytest.raises(ValueError, match="needs memory=9, more than the capacity memory=8"):
        pool.acquire({"memory": 9})
    with pytest.raises(ValueError, match="needs tpu=1 but --resources has no tpu"):
        pool.acquire({"tpu": 1})
    with pytest.raises(ValueError, match="an amount must be a positive number"):
        pool.acquire({"memory": -1})
    assert harness.waiting() == 0


def test_a_release_hands_the_amounts_to_the_head_waiter(harness: Harness) -> None:
    pool = harness.pool()
    held = pool.acquire({"memory": 8})
    assert held is not None
    log: list[str] = []
    waiter = stand_in_line(harness, "waiter", {"memory": 5, "gpu": 1}, log)
    assert log == []
    pool.release(held)
    got = waiter.served()
    assert log == ["waiter"]
    assert pool.in_use() == {"memory": 5, "gpu": 1}
    assert harness.waiting() == 0
    pool.release(got)


def test_a_large_request_at_the_head_is_not_overtaken_by_small_ones(harness: Harness) -> None:
    pool = harness.pool()
    held = pool.acquire({"memory": 6})
    assert held is not None
    log: list[str] = []
    large = stand_in_line(harness, "large", {"memory": 8}, log)
    # 2 are free, and 1 would fit: it waits all the same, behind the large request.
    assert harness.pool().acquire({"memory": 1}, 0) is None
    small = stand_in_line(harness, "small", {"memory": 1}, log)
    smaller = stand_in_line(harness, "smaller", {"memory": 0.5}, log)
    assert pool.in_use() == {"memory": 6}
    pool.release(held)
    large_slot = large.served()
    assert log == ["large"]  # the small ones still wait: the large one took everything
    assert pool.in_use() == {"memory": 8}
    assert small.is_alive()
    assert smaller.is_alive()
    pool.release(large_slot)
    slots = [small.served(), smaller.served()]
    assert sorted(log) == ["large", "small", "smaller"]
    assert pool.in_use() == {"memory": 1.5}
    for slot in slots:
        pool.release(slot)


def test_waiters_are_served_by_priority_then_arrival(harness: Harness) -> None:
    pool = harness.pool()
    held = pool.acquire({"memory": 8})
    assert held is not None
    log: list[str] = []
    waiters = [
        stand_in_line(harness, name, {"memory": 8}, log, priority=priority)
        for name, priority in [("low", -1), ("first", 0), ("high", 5), ("second", 0)]
    ]
    by_name = {waiter.name: waiter for waiter in waiters}
    for name in ("high", "first", "second", "low"):
        pool.release(held)
        held = by_name[name].served()
        assert log[-1] == name
    assert log == ["high", "first", "second", "low"]
    pool.release(held)
    assert pool.in_use() == {}


def test_a_newcomer_of_a_higher_priority_than_every_waiter_starts_if_it_fits(
    harness: Harness,
) -> None:
    pool = harness.pool()
    held = pool.acquire({"memory": 6})
    assert held is not None
    log: list[str] = []
    waiter = stand_in_line(harness, "waiter", {"memory": 4}, log)
    assert harness.pool().acquire({"memory": 2}, 0, priority=0) is None  # behind the waiter
    urgent = harness.pool().acquire({"memory": 2}, 0, priority=1)  # nobody waits ahead
    assert urgent is not None
    assert pool.in_use() == {"memory": 8}
    pool.release(held)
    pool.release(urgent)
    pool.release(waiter.served())


def test_no_wait_refuses_while_anyone_waits_ahead(harness: Harness) -> None:
    pool = harness.pool()
    held = pool.acquire({"memory": 7})
    assert held is not None
    assert pool.acquire({"memory": 2}, 0) is None  # does not fit
    assert harness.waiting() == 0  # and does not stand in line
    log: list[str] = []
    waiter = stand_in_line(harness, "waiter", {"memory": 2}, log)
    assert pool.acquire({"memory": 1}, 0) is None  # fits, but someone waits ahead
    pool.release(held)
    pool.release(waiter.served())


def test_a_wait_that_runs_out_leaves_the_line_and_lets_the_next_one_in(
    harness: Harness,
) -> None:
    pool = harness.pool()
    held = pool.acquire({"memory": 6})
    assert held is not None
    log: list[str] = []
    # The large request gives up after 2 s; the small one behind it fits in what is free.
    large = stand_in_line(harness, "large", {"memory": 4}, log, max_wait_ns=2 * SECOND)
    small = stand_in_line(harness, "small", {"memory": 2}, log)
    small_slot = small.served()  # without any release: the line moved on
    large.join(timeout=15)
    assert large.slot is None
    assert sorted(log) == ["large: none", "small"]  # (the two threads note it in any order)
    assert harness.waiting() == 0
    assert pool.in_use() == {"memory": 8}
    pool.release(small_slot)
    pool.release(held)
    assert pool.in_use() == {}


def test_a_timed_wait_is_served_if_a_release_comes_first(harness: Harness) -> None:
    pool = harness.pool()
    held = pool.acquire({"gpu": 2})
    assert held is not None
    log: list[str] = []
    waiter = stand_in_line(harness, "waiter", {"gpu": 1}, log, max_wait_ns=30 * SECOND)
    pool.release(held)
    got = waiter.served()
    assert pool.in_use() == {"gpu": 1}
    pool.release(got)


def test_pools_refuse_a_bad_capacity(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="an amount must be a positive number"):
        MemoryResourcePool({"memory": 0})
    with pytest.raises(ValueError, match="a resource name must be a string"):
        FileResourcePool(tmp_path, {1: 2})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="resources must be a dict"):
        RedisResourcePool("redis://127.0.0.1:1/0", "x", "memory=8")  # type: ignore[arg-type]


def test_descriptions_name_the_capacity_and_no_password(tmp_path: Path) -> None:
    assert MemoryResourcePool(CAPACITY).describe() == "memory, resources gpu=2, memory=8"
    files = FileResourcePool(tmp_path, CAPACITY)
    assert files.describe() == "file (shared by this session's workers), resources gpu=2, memory=8"
    files.close()
    redis_pool = RedisResourcePool("redis://:s3cret@127.0.0.1:1/0", "k", CAPACITY)
    described = redis_pool.describe()
    assert "s3cret" not in described
    assert "pytest-ratebatch:k:resources" in described
    assert "resources gpu=2, memory=8" in described
    redis_pool.close()


# --- the memory pool: threads --------------------------------------------------------------


def test_many_threads_never_hold_more_than_the_capacity() -> None:
    pool = MemoryResourcePool({"memory": 8, "gpu": 2})
    lock = threading.Lock()
    most: dict[str, float] = {"memory": 0, "gpu": 0}
    errors: list[str] = []

    def work(amounts: dict[str, float]) -> None:
        for _ in range(20):
            slot = pool.acquire(amounts)
            assert slot is not None
            used = pool.in_use()
            with lock:
                for name, amount in used.items():
                    most[name] = max(most[name], amount)
                    if amount > pool.capacity[name]:
                        errors.append(f"{name}={amount}")
            time.sleep(0.001)
            pool.release(slot)

    requests = [{"memory": 3.0}, {"memory": 2.5, "gpu": 1.0}, {"gpu": 1.5}, {"memory": 0.1}] * 2
    threads = [threading.Thread(target=work, args=(amounts,)) for amounts in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert most["memory"] <= 8
    assert most["gpu"] <= 2
    assert pool.in_use() == {}
    assert not pool._line


# --- the file pool: processes --------------------------------------------------------------

# A process that holds ``amounts`` ``rounds`` times for ``hold`` seconds, noting each start
# and end (on the system-wide monotonic clock) in a shared timeline.
HOLDER = """
import json, sys, time
from pathlib import Path

from pytest_ratebatch.stores.files import FileResourcePool

directory, capacity, amounts, rounds, hold = sys.argv[1:]
pool = FileResourcePool(Path(directory), json.loads(capacity))
for _ in range(int(rounds)):
    slot = pool.acquire(json.loads(amounts))
    with open(Path(directory) / "timeline", "a") as out:
        out.write(f"start {time.monotonic_ns()}\\n")
    print("held", flush=True)
    time.sleep(float(hold))
    with open(Path(directory) / "timeline", "a") as out:
        out.write(f"end {time.monotonic_ns()}\\n")
    pool.release(slot)
pool.close()
"""


def holder(
    directory: Path, amounts: Mapping[str, float], rounds: int, hold: float
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory), json.dumps(CAPACITY),
         json.dumps(amounts), str(rounds), str(hold)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )  # fmt: skip


def most_in_flight(timeline: Path) -> int:
    events = []
    for line in timeline.read_text().splitlines():
        kind, stamp = line.split()
        events.append((int(stamp), 0 if kind == "end" else 1))  # an end first at a tie
    in_flight = most = 0
    for _, starts in sorted(events):
        in_flight += 1 if starts else -1
        most = max(most, in_flight)
    return most


def owner_files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.glob(f"{OWNER_PREFIX}*"))


def test_processes_share_the_capacity(tmp_path: Path) -> None:
    # 3 of memory each, of 8: two at a time at most, whichever processes they run in.
    processes = [holder(tmp_path, {"memory": 3}, 4, 0.03) for _ in range(3)]
    for process in processes:
        _, errors = process.communicate(timeout=60)
        assert process.returncode == 0, errors
    assert most_in_flight(tmp_path / "timeline") <= 2
    assert (tmp_path / "timeline").read_text().count("start") == 12
    pool = FileResourcePool(tmp_path, CAPACITY)
    assert pool.in_use() == {}
    assert owner_files(tmp_path) == []  # each closed pool removed its own file
    pool.close()


def test_a_killed_holder_gives_its_amounts_back(tmp_path: Path) -> None:
    process = holder(tmp_path, {"memory": 6, "gpu": 2}, 1, 600)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "held\n"
        pool = FileResourcePool(tmp_path, CAPACITY)
        assert pool.in_use() == {"memory": 6, "gpu": 2}
        assert pool.acquire({"memory": 4}, 0) is None
        log: list[str] = []
        waiter = Waiter(pool, "waiter", {"memory": 4, "gpu": 1}, log, max_wait_ns=30 * SECOND)
        waiter.start()
        eventually(lambda: file_line_length(tmp_path) == 1)
        # No release, and not reaped yet (a zombie): the kernel let go of its lock at exit.
        process.send_signal(signal.SIGKILL)
        got = waiter.served()
        assert log == ["waiter"]
        assert pool.in_use() == {"memory": 4, "gpu": 1}
        assert len(owner_files(tmp_path)) == 1  # the dead process's file was removed
        pool.release(got)
        pool.close()
    finally:
        process.kill()
        process.communicate(timeout=30)


def test_a_waiter_killed_in_line_does_not_hold_it_up(tmp_path: Path) -> None:
    pool = FileResourcePool(tmp_path, CAPACITY)
    held = pool.acquire({"memory": 8})
    assert held is not None
    dead = holder(tmp_path, {"memory": 8}, 1, 600)  # waits in line, at its head
    try:
        eventually(lambda: file_line_length(tmp_path) == 1)
        log: list[str] = []
        waiter = Waiter(FileResourcePool(tmp_path, CAPACITY), "waiter", {"memory": 8}, log)
        waiter.start()
        eventually(lambda: file_line_length(tmp_path) == 2)
        dead.send_signal(signal.SIGKILL)
        dead.communicate(timeout=30)
        pool.release(held)
        got = waiter.served()
        assert log == ["waiter"]
        assert pool.in_use() == {"memory": 8}
        waiter.pool.release(got)
        waiter.pool.close()
    finally:
        dead.kill()
        dead.communicate(timeout=30)
    pool.close()


# A process that waits in line until it is interrupted.
WAITS = """
import sys
from pathlib import Path

kind, where, key = sys.argv[1:]
capacity = {"memory": 8}
if kind == "file":
    from pytest_ratebatch.stores.files import FileResourcePool
    pool = FileResourcePool(Path(where), capacity)
else:
    from pytest_ratebatch.stores.redis import RedisResourcePool
    pool = RedisResourcePool(where, key, capacity)
print("waiting", flush=True)
pool.acquire({"memory": 8})
print("got it", flush=True)
"""


def interrupted_waiter(kind: str, where: str, key: str, waiting: Callable[[], int]) -> None:
    """A process waits in line; Ctrl-C ends its wait at once, and it leaves the line."""
    process = subprocess.Popen(
        [sys.executable, "-c", WAITS, kind, where, key],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    try:
        eventually(lambda: waiting() == 1)
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=30)
        assert "KeyboardInterrupt" in errors
        assert waiting() == 0
    finally:
        process.kill()
        process.communicate(timeout=30)


def test_ctrl_c_ends_a_wait_in_a_file_pool_and_leaves_the_line(tmp_path: Path) -> None:
    pool = FileResourcePool(tmp_path, {"memory": 8})
    held = pool.acquire({"memory": 1})
    assert held is not None
    interrupted_waiter("file", str(tmp_path), "", lambda: file_line_length(tmp_path))
    assert pool.in_use() == {"memory": 1}
    pool.release(held)
    pool.close()


def test_a_removed_session_directory_is_a_store_error(tmp_path: Path) -> None:
    directory = tmp_path / "session"
    directory.mkdir()
    pool = FileResourcePool(directory, CAPACITY)
    held = pool.acquire({"memory": 1})
    assert held is not None
    shutil.rmtree(directory)
    with pytest.raises(StoreError, match="was removed while the session ran"):
        pool.acquire({"memory": 1})
    pool.release(held)  # never raises
    pool.close()


def test_closing_a_file_pool_gives_back_what_it_holds(tmp_path: Path) -> None:
    ours, theirs = FileResourcePool(tmp_path, CAPACITY), FileResourcePool(tmp_path, CAPACITY)
    assert ours.acquire({"memory": 8}) is not None
    log: list[str] = []
    waiter = Waiter(theirs, "waiter", {"memory": 8}, log)
    waiter.start()
    eventually(lambda: file_line_length(tmp_path) == 1)
    ours.close()
    theirs.release(waiter.served())
    assert theirs.in_use() == {}
    theirs.close()


# --- the Redis pool: sessions ----------------------------------------------------------------


@pytest.fixture
def redis_key(request: pytest.FixtureRequest) -> str:
    return f"resources-{os.getpid()}-{request.node.name}".replace("[", "-").replace("]", "")


@pytest.fixture
def redis_pools() -> Iterator[list[RedisResourcePool]]:
    pools: list[RedisResourcePool] = []
    yield pools
    for pool in pools:
        pool.close()


def test_redis_pools_hand_over_at_a_release_not_at_a_poll(
    redis_server: RedisServer, redis_key: str, redis_pools: list[RedisResourcePool]
) -> None:
    ours, theirs = (
        RedisResourcePool(redis_server.url, redis_key, CAPACITY, poll_seconds=30) for _ in range(2)
    )
    redis_pools += [ours, theirs]
    held = ours.acquire({"memory": 8})
    assert held is not None
    assert ours.keys[0].startswith(f"pytest-ratebatch:{redis_key}:resources:")
    log: list[str] = []
    waiter = Waiter(theirs, "waiter", {"memory": 3}, log)
    waiter.start()
    client = redis_server.client()
    eventually(lambda: client.zcard(ours.keys[1]) == 1)
    ours.release(held)
    got = waiter.served()  # within its 15 s: the release woke it (its poll is every 30 s)
    assert ours.in_use() == {"memory": 3}
    theirs.release(got)


def test_redis_leases_are_renewed_while_held_and_expire_without_a_holder(
    redis_server: RedisServer, redis_key: str, redis_pools: list[RedisResourcePool]
) -> None:
    ours = RedisResourcePool(redis_server.url, redis_key, CAPACITY, lease_seconds=0.3)
    theirs = RedisResourcePool(redis_server.url, redis_key, CAPACITY, poll_seconds=0.05)
    redis_pools += [ours, theirs]
    held = ours.acquire({"memory": 6, "gpu": 1})
    assert held is not None
    time.sleep(1.0)  # three leases long: renewed meanwhile
    assert theirs.in_use() == {"memory": 6, "gpu": 1}
    assert ours.lost == 0
    # The holder vanishes (its renewals stop, it never releases): the lease runs out.
    ours._closing.set()
    assert ours._renewer is not None
    ours._renewer.join(timeout=5)
    got = theirs.acquire({"memory": 8}, 10 * SECOND)
    assert got is not None
    assert theirs.in_use() == {"memory": 8}


HOLDS_A_LEASE = """
import sys, time
from pytest_ratebatch.stores.redis import RedisResourcePool

pool = RedisResourcePool(sys.argv[1], sys.argv[2], {"memory": 8}, lease_seconds=0.6)
slot = pool.acquire({"memory": 8})
print("held", flush=True)
time.sleep(600)
"""


def test_a_killed_session_gives_its_amounts_back_when_the_lease_expires(
    redis_server: RedisServer, redis_key: str, redis_pools: list[RedisResourcePool]
) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDS_A_LEASE, redis_server.url, redis_key],
        stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "held\n"
        pool = RedisResourcePool(redis_server.url, redis_key, {"memory": 8}, poll_seconds=0.05)
        redis_pools.append(pool)
        assert pool.acquire({"memory": 1}, 0) is None
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        assert pool.acquire({"memory": 8}, 10 * SECOND) is not None
    finally:
        process.kill()
        process.communicate(timeout=30)


def test_a_silent_redis_waiter_leaves_the_line(
    redis_server: RedisServer, redis_key: str, redis_pools: list[RedisResourcePool]
) -> None:
    client = redis_server.client()
    holder_pool = RedisResourcePool(redis_server.url, redis_key, CAPACITY)
    silent = RedisResourcePool(redis_server.url, redis_key, CAPACITY, poll_seconds=0.05)
    waiting = RedisResourcePool(redis_server.url, redis_key, CAPACITY)
    redis_pools += [holder_pool, silent, waiting]
    held = holder_pool.acquire({"memory": 8})
    assert held is not None
    # A waiter of a session killed while it waited: in line, never asking again.
    request = ("gone", silent._alive_us, 1, 0, "memory=8.0")
    assert silent._call(silent._acquire, *request) == 0
    log: list[str] = []
    waiter = Waiter(waiting, "waiter", {"memory": 8}, log)
    waiter.start()
    eventually(lambda: client.zcard(silent.keys[1]) == 2)
    holder_pool.release(held)
    waiting.release(waiter.served())  # once the silent one dropped out (8 polls of 0.05 s)
    assert log == ["waiter"]
    assert client.zcard(silent.keys[1]) == 0


def test_ctrl_c_ends_a_wait_in_a_redis_pool_and_leaves_the_line(
    redis_server: RedisServer, redis_key: str, redis_pools: list[RedisResourcePool]
) -> None:
    pool = RedisResourcePool(redis_server.url, redis_key, {"memory": 8})
    redis_pools.append(pool)
    held = pool.acquire({"memory": 1})
    assert held is not None
    client = redis_server.client()
    interrupted_waiter(
        "redis", redis_server.url, redis_key, lambda: int(client.zcard(pool.keys[1]))
    )
    assert pool.in_use() == {"memory": 1}


def test_an_unreachable_redis_pool_is_a_store_error() -> None:
    pool = RedisResourcePool(f"redis://127.0.0.1:{free_port()}/0", "x", CAPACITY)
    with pytest.raises(StoreError, match=r"redis redis://127\.0\.0\.1"):
        pool.acquire({"memory": 1})
    assert pool.acquire({}) is not None  # nothing asked: nothing to reach
    pool.release(Slot(-1, "never-held"))  # never raises: a lease expires by itself
    pool.close()
