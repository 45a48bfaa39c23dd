"""Window limits ("N per window"): exact over every sliding window, greedy, bounded state."""

from __future__ import annotations

import heapq
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from pytest_ratebatch.engine.limiter import UNLIMITED, WINDOW_MARGIN_NS, RateLimiter
from pytest_ratebatch.limits import gcra, windows
from pytest_ratebatch.limits.policy import RateLimit, WindowLimit, parse_windows
from pytest_ratebatch.stores.base import BucketStore
from pytest_ratebatch.stores.files import FileBucketStore
from pytest_ratebatch.stores.memory import MemoryBucketStore

from .fakes import FakeClock
from .redis_server import RedisServer

pytest_plugins = ["pytester"]

SECOND = 1_000_000_000

StoreFactory = Callable[[FakeClock], BucketStore]


def memory_store(clock: FakeClock) -> BucketStore:
    return MemoryBucketStore(clock)


@pytest.fixture(params=["memory", "file"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    if request.param == "memory":
        return memory_store

    def file_store(clock: FakeClock) -> BucketStore:
        return FileBucketStore(tmp_path, clock)

    return file_store


def greedy(
    costs: Sequence[int], limits: Sequence[WindowLimit], start: int
) -> list[tuple[int, int]]:
    """The best schedule, by brute force: each start as early as every window allows, in
    order (a start at ``s`` counts in the window ``(t - length, t]`` while ``t < s + length``)."""
    starts: list[tuple[int, int]] = []
    moment = start
    for cost in costs:
        while True:
            full = [
                limit
                for limit in limits
                if sum(c for s, c in starts if s > moment - limit.window_ns) + cost > limit.count
            ]
            if not full:
                break
            moment = min(
                s + limit.window_ns
                for limit in full
                for s, _ in starts
                if s + limit.window_ns > moment
            )
        starts.append((moment, cost))
    return starts


def worst_window(starts: Sequence[tuple[int, int]], limit: WindowLimit) -> int:
    """The most cost started in any window of the limit's length (sliding)."""
    times = sorted(starts)
    worst = 0
    for index, (end, _) in enumerate(times):
        inside = sum(c for s, c in times[: index + 1] if s > end - limit.window_ns)
        worst = max(worst, inside)
    return worst


def test_parse_and_describe_round_trip() -> None:
    limits = parse_windows("10/2s, 25/10s; 10000/day")
    assert [limit.describe() for limit in limits] == ["10/2s", "25/10s", "10000/1d"]


def test_a_start_waits_for_the_cost_th_oldest_of_the_last_n() -> None:
    # 3 per second; two starts logged at 0 and one at 0.5 s: one more fits at 1 s.
    earliest = [max(0, windows.EMPTY) + SECOND]
    result = windows.take(0, 0, SECOND // 2, 1, 0, 2**31, None, True, earliest, SECOND // 2)
    _reserved, _admitted, status, wait, bound = result
    assert (status, wait, bound) == (gcra.RESERVED, SECOND // 2, 1)


def test_the_bucket_is_the_bound_when_it_is_later() -> None:
    interval = SECOND
    # The bucket is empty until 3 s; the window would allow 2 s.
    result = windows.take(3 * SECOND, 3 * SECOND, 0, 1, interval, 1, None, True, [2 * SECOND], 0)
    assert result[2:] == (gcra.RESERVED, 3 * SECOND, windows.RATE)


@pytest.mark.parametrize(
    ("text", "costs"),
    [
        ("10/2s, 25/10s", [1] * 60),
        ("3/s", [1, 2, 1, 3, 1, 1, 2] * 4),
        ("5/s, 7/3s, 20/10s", [2, 1, 3, 1, 1] * 8),
    ],
)
def test_one_process_runs_the_greedy_schedule(
    make_store: StoreFactory, clock: FakeClock, text: str, costs: list[int]
) -> None:
    limits = parse_windows(text)
    limiter = RateLimiter(
        UNLIMITED, make_store(clock), clock=clock, windows=limits, window_margin_ns=0
    )
    start = clock.now
    admitted = []
    for cost in costs:
        at = limiter.take(cost)
        assert at is not None
        admitted.append((at, cost))
    assert admitted == greedy(costs, limits, start)


def test_the_example_policy_takes_the_time_the_windows_allow(clock: FakeClock) -> None:
    # 60 one-call tests under "10/2s, 25/10s": 25 per 10 s leaves 10 for the last window.
    limits = parse_windows("10/2s, 25/10s")
    limiter = RateLimiter(
        UNLIMITED, MemoryBucketStore(clock), clock=clock, windows=limits, window_margin_ns=0
    )
    times = [limiter.take(1) for _ in range(60)]
    assert times[-1] is not None
    assert times[0] is not None
    assert (times[-1] - times[0]) / SECOND == 20.0


def test_windows_and_a_rate_hold_together(make_store: StoreFactory, clock: FakeClock) -> None:
    limits = parse_windows("4/s")
    rate = RateLimit(600, 3)  # 10/s, 3 at once
    limiter = RateLimiter(rate, make_store(clock), clock=clock, windows=limits, window_margin_ns=0)
    admitted = [(limiter.take(1), 1) for _ in range(40)]
    starts = [(at, cost) for at, cost in admitted if at is not None]
    assert worst_window(starts, limits[0]) <= 4
    assert gcra_excess(starts, rate) <= 0
    # Each second: 3 at once (the burst), the 4th a tenth later (the rate), then the
    # window is full until the first three leave it.
    assert [at - starts[0][0] for at, _ in starts[:8]] == [
        0, 0, 0, SECOND // 10, SECOND, SECOND, SECOND, SECOND * 11 // 10
    ]  # fmt: skip
    assert starts[-1][0] - starts[0][0] == 9 * SECOND + SECOND // 10


def gcra_excess(starts: Sequence[tuple[int, int]], rate: RateLimit) -> float:
    from pytest_ratebatch.views.report import worst_excess

    return worst_excess(starts, rate.interval_ns, rate.burst)


def test_a_batch_takes_its_whole_cost_in_every_window(
    make_store: StoreFactory, clock: FakeClock
) -> None:
    limits = parse_windows("6/s")
    limiter = RateLimiter(
        UNLIMITED, make_store(clock), clock=clock, windows=limits, window_margin_ns=0
    )
    starts = []
    for _ in range(3):  # batches of 4: reserve, then each member commits
        admission = limiter.admit(4, reserve_only=True)
        assert admission is not None
        for _ in range(4):
            starts.append((limiter.commit(1), 1))
    assert worst_window(starts, limits[0]) <= 6
    batch_starts = sorted({at for at, _ in starts})
    assert [at - batch_starts[0] for at in batch_starts] == [0, SECOND, 2 * SECOND]


def test_the_outcome_names_the_limit_that_set_the_wait(clock: FakeClock) -> None:
    limits = parse_windows("100/h, 2/s")
    limiter = RateLimiter(
        UNLIMITED, MemoryBucketStore(clock), clock=clock, windows=limits, window_margin_ns=0
    )
    waits: list[tuple[float, str]] = []

    def note(seconds: float) -> None:
        waits.append((seconds, limiter.limit_names[limiter.last_bound]))

    for _ in range(3):
        limiter.take(1, on_wait=note)
    assert waits == [(1.0, "2/1s")]


def test_a_cost_above_the_smallest_window_is_an_error(clock: FakeClock) -> None:
    limiter = RateLimiter(
        RateLimit(60, 10), MemoryBucketStore(clock), clock=clock, windows=parse_windows("3/s")
    )
    with pytest.raises(ValueError, match=r"exceed the smallest window \(3\)"):
        limiter.acquire(4)


def test_available_tokens_count_every_window(make_store: StoreFactory, clock: FakeClock) -> None:
    limits = parse_windows("3/s, 5/10s")
    limiter = RateLimiter(
        UNLIMITED, make_store(clock), clock=clock, windows=limits, window_margin_ns=0
    )
    assert limiter.available_tokens == 3
    limiter.take(2)
    assert limiter.available_tokens == 1
    clock.advance(1)
    assert limiter.available_tokens == 3  # 5 per 10 s: 3 of 5 left
    limiter.take(3)
    clock.advance(1)
    assert limiter.available_tokens == 0


def simulate(
    make_store: StoreFactory,
    limits: tuple[WindowLimit, ...],
    rate: RateLimit,
    processes: int,
    tests: int,
    lateness: float,
    seed: int,
) -> list[tuple[int, int]]:
    """Processes that reserve, sleep (waking up to ``lateness`` seconds late), commit and
    queue again if overtaken, as ``RateLimiter`` does; the admissions a real run records."""
    rng = random.Random(seed)
    clock = FakeClock()
    store = make_store(clock)
    pairs = tuple((limit.count, limit.window_ns) for limit in limits)
    interval, burst = rate.interval_ns, rate.burst
    most = min([burst] + [limit.count for limit in limits])
    events: list[tuple[int, int, str, int, int]] = []  # time, order, action, cost, slot
    for order in range(processes):
        heapq.heappush(events, (clock.now, order, "take", rng.randint(1, most), 0))
    order = processes
    admitted: list[tuple[int, int]] = []
    while events and len(admitted) < tests:
        clock.now, _, action, cost, slot = heapq.heappop(events)
        if action == "take":
            status, now, wait, _ = store.take_windowed(cost, interval, burst, None, True, pairs)
            slot = now + wait
        else:
            status, now, wait, _ = store.commit_windowed(cost, interval, burst, slot, pairs)
            if status == gcra.OVERTAKEN:
                status, now, wait, _ = store.take_windowed(cost, interval, burst, None, True, pairs)
                slot = now + wait
        if status == gcra.ADMITTED:
            admitted.append((now, cost))
            next_action, delay = "take", rng.randint(0, SECOND // 2)
            cost = rng.randint(1, most)
        else:
            next_action, delay = "commit", wait + rng.randint(0, int(lateness * SECOND))
        heapq.heappush(events, (clock.now + delay, order, next_action, cost, slot))
        order += 1
    return admitted


@pytest.mark.parametrize("seed", range(12))
def test_late_wakers_never_break_a_window(make_store: StoreFactory, seed: int) -> None:
    text, rate = [
        ("10/2s, 25/10s", UNLIMITED),
        ("3/s", RateLimit(600, 2)),
        ("5/s, 8/3s", RateLimit(240, 4)),
    ][seed % 3]
    limits = parse_windows(text)
    admitted = simulate(make_store, limits, rate, 4, 150, lateness=0.3, seed=seed)
    assert len(admitted) == 150
    for limit in limits:
        assert worst_window(admitted, limit) <= limit.count
    if rate is not UNLIMITED:
        assert gcra_excess(admitted, rate) <= 0


def test_a_day_long_window_keeps_its_file_small_and_its_checks_cheap(
    tmp_path: Path, clock: FakeClock
) -> None:
    limits = parse_windows("10000/day")
    store = FileBucketStore(tmp_path, clock)
    limiter = RateLimiter(UNLIMITED, store, clock=clock, windows=limits)
    for _ in range(12_000):
        limiter.take(1)
        clock.advance(0.001)
    assert (tmp_path / "bucket").stat().st_size <= 64 + 16 + 2 * 10_000 * 8
    # The 10,001st start had to wait a day after the first.
    assert clock.sleeps
    assert max(clock.sleeps) > 86_000


# --- Redis: the same logs on the server, on its clock ------------------------------------


def test_redis_holds_every_window_across_clients(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    from pytest_ratebatch.stores.redis import RedisBucketStore

    key = f"windows-{request.node.name}"
    limits = parse_windows("3/200ms, 5/600ms")
    stores = [RedisBucketStore(redis_server.url, key) for _ in range(2)]
    limiters = [RateLimiter(UNLIMITED, store, windows=limits) for store in stores]
    admitted: list[tuple[int, int]] = []
    lock = threading.Lock()

    def client(limiter: RateLimiter, costs: list[int]) -> None:
        for cost in costs:
            at = limiter.take(cost)
            assert at is not None
            with lock:
                admitted.append((at, cost))

    threads = [
        threading.Thread(target=client, args=(limiters[0], [1, 2, 1, 1, 2, 1])),
        threading.Thread(target=client, args=(limiters[1], [2, 1, 1, 3, 1, 1])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(cost for _, cost in admitted) == 17
    for limit in limits:
        assert worst_window(admitted, limit) <= limit.count  # on the server's clock
    # 17 starts: within each log's slack, not trimmed yet (``test_redis_logs_stay_bounded``)
    client_ = redis_server.client()
    lengths = {name: client_.llen(name) for name in client_.keys(f"*{key}:window:*")}
    assert lengths == dict.fromkeys(lengths, 17)
    assert len(lengths) == 4
    # 17 cost at 5 per 0.6 s: the last start is at least 3 windows after the first.
    times = sorted(at for at, _ in admitted)
    assert times[-1] - times[0] >= 3 * 600_000_000
    assert stores[0].level(UNLIMITED.interval_ns, UNLIMITED.burst, limiters[0]._windows) >= 0


def test_redis_logs_stay_bounded_and_outlive_their_windows(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    """A log is trimmed to its count once it holds LOG_SLACK more; its expiry (the window
    and the idle time) is renewed every half of the idle time, and on the list's birth."""
    from pytest_ratebatch.stores.redis import LOG_SLACK, RedisBucketStore

    key = f"windows-{request.node.name}"
    store = RedisBucketStore(redis_server.url, key, idle_expiry_ms=600)
    limiter = RateLimiter(UNLIMITED, store, windows=parse_windows("2/1ms"))
    client = redis_server.client()
    for _ in range(3 * LOG_SLACK):
        assert limiter.take(1) is not None
    names = client.keys(f"*{key}:window:*")
    assert len(names) == 2
    for name in names:
        assert 2 <= client.llen(name) <= 2 + LOG_SLACK
        assert 0 < client.pttl(name) <= 1 + 50 + 600  # the window, its margin, idle time
    time.sleep(0.4)  # past half the idle time: the next start renews
    assert limiter.take(1) is not None
    for name in names:
        assert client.pttl(name) > 400  # (not renewed: 221 ms or less)
    store.close()


def test_redis_renews_both_logs_whichever_a_start_writes(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    """A reservation writes only the reserved logs, an admission only the admitted ones: the
    renewal due at either gives every list its expiry, or a log still counting starts could
    expire (and a window admit more than its count)."""
    from pytest_ratebatch.stores.redis import KEY_PREFIX, RedisBucketStore, _dump, _load

    key = f"windows-{request.node.name}"
    store = RedisBucketStore(redis_server.url, key, idle_expiry_ms=2000)
    limits = ((2, 3 * SECOND),)  # each list kept 3 s + 2 s past a renewal
    client = redis_server.client()
    name = f"{store.key}:window:2/3000000us"
    assert store.commit_windowed(1, 1000, 1000, None, limits)[0] == gcra.ADMITTED
    assert 4800 < client.pttl(f"{name}:admitted") <= 5000
    time.sleep(1.2)  # past half the idle time: the next start renews
    assert store.take_windowed(1, 1000, 1000, None, False, limits)[0] == gcra.RESERVED
    assert client.pttl(f"{name}:admitted") > 4400  # (not renewed: 3800 or less)
    assert client.pttl(f"{name}:reserved") > 4400
    # A server clock gone back (the last renewal now in the future) renews at once.
    state, (epoch, loss, _renewed, latest) = _load(client.get(KEY_PREFIX + key))
    seconds, micros = client.time()
    future = seconds * 1_000_000 + micros + 600_000_000
    client.set(KEY_PREFIX + key, _dump(state, (epoch, loss, future, latest)), px=60_000)
    client.pexpire(f"{name}:admitted", 1000)
    assert store.take_windowed(1, 1000, 1000, None, False, limits)[0] == gcra.RESERVED
    assert client.pttl(f"{name}:admitted") > 4400
    store.close()


def test_redis_windowed_outcomes_name_the_bound(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    from pytest_ratebatch.stores.redis import RedisBucketStore

    store = RedisBucketStore(redis_server.url, f"windows-{request.node.name}")
    pairs = ((100, 3600 * SECOND), (2, SECOND))
    interval, burst = UNLIMITED.interval_ns, UNLIMITED.burst
    assert store.take_windowed(1, interval, burst, None, True, pairs)[0] == gcra.ADMITTED
    assert store.take_windowed(1, interval, burst, None, True, pairs)[0] == gcra.ADMITTED
    status, now, wait, bound = store.take_windowed(1, interval, burst, None, True, pairs)
    assert (status, bound) == (gcra.RESERVED, 2)
    assert SECOND - 100_000_000 < wait <= SECOND
    assert store.commit_windowed(1, interval, burst, now + wait, pairs)[0] == gcra.WAIT
    refused = store.take_windowed(1, interval, burst, 0, True, pairs)
    assert refused[0] == gcra.REFUSED


# --- in real sessions ------------------------------------------------------------------


def load_report(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def report_starts(report: dict[str, Any]) -> list[tuple[int, int]]:
    """Each admission on one clock: the store's if it has one (Redis), else the session's."""
    return [
        (test["store_ns"] if test["store_ns"] is not None else test["start_ns"], test["tokens"])
        for test in report["tests"]
    ]


@pytest.mark.parametrize("workers", [[], ["-n", "3"], ["-n", "2", "--batch-size=3"]])
def test_a_session_holds_every_window_and_says_which_bound(
    pytester: pytest.Pytester, workers: list[str]
) -> None:
    pytester.makepyfile(
        test_calls="""
        import pytest

        @pytest.mark.parametrize("n", range(14))
        def test_call(n):
            pass

        @pytest.mark.ratebatch(cost=2)
        def test_expensive():
            pass
        """
    )
    result = pytester.runpytest_subprocess(
        *workers, "--rate-limit=4/400ms, 6/1.2s", "--ratebatch-report=r.json"
    )
    result.assert_outcomes(passed=15)
    result.stdout.fnmatch_lines(
        [
            "ratebatch: limits 4/0.4s, 6/1.2s*; store: *",
            "policy: limits 4/0.4s, 6/1.2s*",
            "waited on 6/1.2s for *s, on 4/0.4s for *s",
        ]
    )
    report = load_report(pytester.path / "r.json")
    starts = report_starts(report)
    assert sum(cost for _, cost in starts) == 16
    for limit in parse_windows("4/400ms, 6/1.2s"):
        assert worst_window(starts, limit) <= limit.count
    # 16 cost at 6 per 1.2 s: the greedy schedule needs 2 windows of 1.2 s after the first.
    times = sorted(at for at, _ in starts)
    assert times[-1] - times[0] >= 2.4 * SECOND
    assert times[-1] - times[0] < 2.4 * SECOND + 1.5 * SECOND  # generous: start-up jitter
    assert {test["limit"] for test in report["tests"]} <= {"", "6/1.2s", "4/0.4s"}
    assert any(test["limit"] == "6/1.2s" for test in report["tests"])
    assert report["policy"]["rate_limit"][1] == {
        "count": 6,
        "window": 1.2,
        "window_ns": 1_200_000_000,
        "text": "6/1.2s",
    }


def test_sessions_on_one_redis_key_share_the_windows(
    pytester: pytest.Pytester, redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    pytester.makepyfile(
        test_calls="import pytest\n@pytest.mark.parametrize('n', range(6))\ndef test_call(n): pass"
    )
    key = f"sessions-{os.getpid()}-{request.node.name}"
    command = [
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--rate-limit=3/500ms",
        f"--ratebatch-store={redis_server.url}", f"--ratebatch-key={key}",
    ]  # fmt: skip
    sessions = [
        subprocess.Popen(
            [*command, f"--ratebatch-report=r{index}.json"],
            cwd=pytester.path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for index in range(2)
    ]
    for session in sessions:
        output, _ = session.communicate(timeout=60)
        assert session.returncode == 0, output.decode()
    starts = []
    for index in range(2):
        starts += report_starts(load_report(pytester.path / f"r{index}.json"))
    assert len(starts) == 12
    assert worst_window(starts, parse_windows("3/500ms")[0]) <= 3
    times = sorted(at for at, _ in starts)
    assert times[-1] - times[0] >= 3 * SECOND // 2  # 12 at 3 per 0.5 s: 3 windows at least


def test_a_marker_above_the_smallest_window_stops_before_any_test(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_big="""
        import pytest

        @pytest.mark.ratebatch(cost=5)
        def test_big():
            raise AssertionError("ran")
        """
    )
    result = pytester.runpytest("--rate-limit=10/s, 3/s")
    result.stdout.fnmatch_lines(["*cost 5 exceeds 3/1s (3)*raise 3/1s or lower the cost*"])
    assert "ran" not in result.stdout.str()
    assert result.ret != 0


def test_a_bad_limit_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nrate_limit = 10/2\n")
    result = pytester.runpytest()
    result.stderr.fnmatch_lines(
        ["ERROR: ratebatch: rate_limit='10/2' (ini file *): '10/2': the window needs a unit*"]
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_windows_keep_a_margin_for_the_way_to_the_server(clock: FakeClock) -> None:
    limiter = RateLimiter(
        UNLIMITED, MemoryBucketStore(clock), clock=clock, windows=parse_windows("2/s")
    )
    times = [limiter.take(1) for _ in range(3)]
    assert times[2] is not None
    assert times[0] is not None
    assert times[2] - times[0] == SECOND + WINDOW_MARGIN_NS
    assert WINDOW_MARGIN_NS == 50_000_000  # as the README states


def test_a_start_queued_behind_window_bound_starts_names_the_window(
    redis_server: RedisServer, request: pytest.FixtureRequest, clock: FakeClock
) -> None:
    from pytest_ratebatch.stores.redis import RedisBucketStore

    pairs = ((2, SECOND),)
    interval, burst = UNLIMITED.interval_ns, UNLIMITED.burst
    stores: list[BucketStore] = [
        MemoryBucketStore(clock),
        RedisBucketStore(redis_server.url, f"windows-{request.node.name}"),
    ]
    for store in stores:
        outcomes = [store.take_windowed(1, interval, burst, None, True, pairs) for _ in range(4)]
        # Two at once, then two in line for the window: both waits are the window's.
        assert [status for status, *_ in outcomes] == [gcra.ADMITTED] * 2 + [gcra.RESERVED] * 2
        assert [bound for *_, bound in outcomes[2:]] == [1, 1], store.describe()
