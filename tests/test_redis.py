"""One rate across sessions through a real redis-server; the store's faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from pytest_ratebatch.engine.limiter import UNLIMITED
from pytest_ratebatch.limits import gcra
from pytest_ratebatch.limits.bucket import UNSET, BucketState, current_interval
from pytest_ratebatch.limits.policy import RateLimit, build_policy
from pytest_ratebatch.plugin.options import COMMAND_LINE, RawValue
from pytest_ratebatch.stores.base import StoreError
from pytest_ratebatch.stores.redis import (
    CLAIM_FORMAT,
    KEY_PREFIX,
    STATE_FORMAT,
    PolicyConflict,
    RedisBucketStore,
    RedisSlotPool,
    _dump,
    _load,
)
from pytest_ratebatch.views.report import worst_excess
from tests.redis_server import RedisServer, free_port

pytest_plugins = ["pytester"]

SECOND = 1_000_000_000


def load_report(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def cli(**values: str) -> dict[str, RawValue]:
    return {name: RawValue(text, COMMAND_LINE) for name, text in values.items()}


def unique_key(request: pytest.FixtureRequest) -> str:
    return f"test-{os.getpid()}-{request.node.name}".replace("[", "-").replace("]", "")


# --- the store itself ----------------------------------------------------------------


def test_store_follows_gcra_on_the_server_clock(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    store = RedisBucketStore(redis_server.url, unique_key(request))
    interval = RateLimit(60, 2).interval_ns  # one token per second
    first = store.take(1, interval, 2, None, True)
    second = store.take(1, interval, 2, None, True)
    third = store.take(1, interval, 2, None, True)
    assert (first[0], second[0]) == (gcra.ADMITTED, gcra.ADMITTED)
    assert third[0] == gcra.RESERVED
    assert SECOND - 50_000_000 < third[2] <= SECOND  # about a second, minus the elapsed time
    assert store.commit(1, interval, 2)[0] == gcra.WAIT  # not before its slot
    slot = third[1] + third[2]
    assert store.commit(1, interval, 2, slot)[0] == gcra.WAIT
    # A waiter whose slot passed a whole interval ago was overtaken.
    assert store.commit(1, interval, 2, third[1] - interval)[0] == gcra.OVERTAKEN
    refused = store.take(1, interval, 2, 0, True)
    assert refused[0] == gcra.REFUSED
    assert 0 <= store.level(interval, 2) < 1
    # The server's clock: epoch microseconds, not this machine's monotonic clock.
    server_seconds, _ = redis_server.client().time()
    assert abs(first[1] / SECOND - server_seconds) < 5
    assert not store.local_clock
    store.close()


def test_a_throttle_pauses_and_adapts_every_sharer(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    ours = RedisBucketStore(redis_server.url, unique_key(request))
    theirs = RedisBucketStore(redis_server.url, unique_key(request))  # another session
    interval = RateLimit(600, 1).interval_ns  # 0.1 s per token
    for _ in range(3):
        ours.take(1, interval, 1, None, True)
    at, before, after, until = ours.throttle(SECOND // 2, interval, 1, True)
    assert (before, after) == (interval, 2 * interval)  # the first throttle halves the rate
    assert until - at == SECOND // 2
    status, now, wait = theirs.take(1, interval, 1, None, True)
    assert status == gcra.RESERVED
    assert until - now - 10_000_000 <= wait <= until - now  # not before the pause ends
    # The adapted interval is shared: the next slot is two intervals later, not one.
    status, now2, wait2 = theirs.take(1, interval, 1, None, True)
    assert now2 + wait2 - (now + wait) == 2 * interval
    # A second throttle with nothing accepted since the first teaches nothing new.
    assert ours.throttle(SECOND // 2, interval, 1, True)[2] == 2 * interval
    ours.close()
    theirs.close()


def test_the_key_expires_once_idle(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    store = RedisBucketStore(redis_server.url, unique_key(request))
    store.take(1, RateLimit(60, 1).interval_ns, 1, None, True)
    ttl_ms = redis_server.client().pttl(KEY_PREFIX + unique_key(request))
    assert 60_000 < ttl_ms <= 61_000  # the debt (1 s) plus a minute of idleness
    store.close()


def test_unreachable_store_is_a_store_error() -> None:
    store = RedisBucketStore(f"redis://127.0.0.1:{free_port()}/0", "x")
    with pytest.raises(StoreError, match=r"redis redis://127\.0\.0\.1:\d+/0 key"):
        store.check()


def test_wrong_password_never_shows_the_password(private_redis: RedisServer) -> None:
    url = private_redis.url.replace(private_redis.password or "", "wrong-password-123")
    store = RedisBucketStore(url, "x")
    with pytest.raises(StoreError) as error:
        store.check()
    assert "wrong-password-123" not in str(error.value)
    assert ":***@" in str(error.value)


# --- sessions sharing a rate ------------------------------------------------------------


def test_concurrent_sessions_share_one_rate_and_burst(
    pytester: pytest.Pytester, redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    pytester.makepyfile(
        test_calls="import pytest\n@pytest.mark.parametrize('n', range(6))\ndef test_call(n): pass"
    )
    key = unique_key(request)
    sessions = []
    for index in range(3):
        command = [
            sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
            "--rate-per-minute=1200", "--burst=2", f"--ratebatch-store={redis_server.url}",
            f"--ratebatch-key={key}", f"--ratebatch-report=r{index}.json",
        ]  # fmt: skip
        sessions.append(
            subprocess.Popen(command, cwd=pytester.path, stdout=subprocess.PIPE, text=True)
        )
    for session in sessions:
        output, _ = session.communicate(timeout=120)
        assert session.returncode == 0, output
    admissions = []
    for index in range(3):
        report = load_report(pytester.path / f"r{index}.json")
        assert report["store"].startswith("redis redis://127.0.0.1")
        admissions += [(test["store_ns"], test["tokens"]) for test in report["tests"]]
    assert len(admissions) == 18
    interval = RateLimit(1200, 2).interval_ns
    # G1 over all three sessions together, on the server's clock.
    assert worst_excess(admissions, interval, 2) <= 0
    times = sorted(time for time, _ in admissions)
    assert times[-1] - times[0] >= (18 - 2) * interval


def test_sessions_under_xdist_share_the_key_too(
    pytester: pytest.Pytester, redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    pytester.makepyfile(
        test_calls="import pytest\n@pytest.mark.parametrize('n', range(8))\ndef test_call(n): pass"
    )
    result = pytester.runpytest_subprocess(
        "-n", "2", "--rate-per-minute=1200", "--burst=2", "--batch-size=2",
        f"--ratebatch-store={redis_server.url}", f"--ratebatch-key={unique_key(request)}",
        "--ratebatch-report=r.json",
    )  # fmt: skip
    result.assert_outcomes(passed=8)
    report = load_report(pytester.path / "r.json")
    admissions = [(test["store_ns"], test["tokens"]) for test in report["tests"]]
    assert worst_excess(admissions, RateLimit(1200, 2).interval_ns, 2) <= 0
    assert {test["worker"] for test in report["tests"]} == {"gw0", "gw1"}


def test_every_worker_takes_from_the_named_key(
    pytester: pytest.Pytester, redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    # Eight tests within a burst of eight, at a token a minute: the key's bucket is empty
    # after the run only if every worker took its tokens from it. A worker on a key of its
    # own would leave one token in it per test it ran, whichever tests it got.
    pytester.makepyfile(
        test_calls="import pytest\n@pytest.mark.parametrize('n', range(8))\ndef test_call(n): pass"
    )
    key = unique_key(request)
    result = pytester.runpytest_subprocess(
        "-n", "2", "--rate-per-minute=1", "--burst=8", f"--ratebatch-store={redis_server.url}",
        f"--ratebatch-key={key}", "--ratebatch-report=r.json",
    )  # fmt: skip
    result.assert_outcomes(passed=8)
    report = load_report(pytester.path / "r.json")
    assert {test["worker"] for test in report["tests"]} == {"gw0", "gw1"}
    store = RedisBucketStore(redis_server.url, key)
    left = store.level(RateLimit(1, 8).interval_ns, 8)
    store.close()
    assert 0 <= left < 1  # a minute refills one token: the run took less


# --- faults ------------------------------------------------------------------------------


def test_password_is_masked_everywhere(
    pytester: pytest.Pytester, private_redis: RedisServer
) -> None:
    pytester.makepyfile(test_one="def test_one(): pass")
    result = pytester.runpytest_subprocess(
        "--rate-per-minute=600",
        f"--ratebatch-store={private_redis.url}",
        "--ratebatch-report=r.json",
    )
    result.assert_outcomes(passed=1)
    masked = f"redis://:***@127.0.0.1:{private_redis.port}/0"
    result.stdout.fnmatch_lines([f"ratebatch: rate 600/min, burst 1; store: redis {masked} key *"])
    secret = private_redis.password or ""
    assert secret not in result.stdout.str() + result.stderr.str()
    assert secret not in (pytester.path / "r.json").read_text()


@pytest.mark.parametrize("fault", ["wrong password", "unreachable", "bad url"])
def test_an_unusable_store_stops_the_run_before_any_test(
    pytester: pytest.Pytester, private_redis: RedisServer, fault: str
) -> None:
    url = {
        "wrong password": private_redis.url.replace(private_redis.password or "", "n0pe-n0pe"),
        "unreachable": f"redis://127.0.0.1:{free_port()}/0",
        "bad url": "redis://127.0.0.1:notaport/0",
    }[fault]
    pytester.makepyfile(test_one="def test_one(): raise AssertionError('ran')")
    result = pytester.runpytest_subprocess("--rate-per-minute=60", f"--ratebatch-store={url}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    if fault == "bad url":  # refused with the option, before any connection
        result.stderr.fnmatch_lines(
            ["ERROR: ratebatch: --ratebatch-store='*' (command line): malformed host*"]
        )
    else:
        result.stderr.fnmatch_lines(["ERROR: ratebatch: the store cannot be used: *"])
    output = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in output
    assert "n0pe-n0pe" not in output
    assert "ran" not in result.stdout.str()


def test_store_lost_mid_run_cancels_the_rest(
    pytester: pytest.Pytester, private_redis: RedisServer
) -> None:
    assert private_redis.process is not None
    pytester.makepyfile(
        test_calls=f"""
        import os, signal, pytest

        @pytest.mark.parametrize("n", range(6))
        def test_call(n):
            if n == 2:
                os.kill({private_redis.process.pid}, signal.SIGKILL)  # the store goes away
        """
    )
    result = pytester.runpytest_subprocess(
        "--rate-per-minute=6000", f"--ratebatch-store={private_redis.url}", "-rs",
        "--junit-xml=junit.xml", "-p", "no:randomly",
    )  # fmt: skip
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=3, skipped=3)
    result.stdout.fnmatch_lines(["*ratebatch: cancelled (store unavailable: *"])
    assert (private_redis.password or "") not in result.stdout.str()
    assert "stop: store unavailable" in result.stdout.str()


# --- a store that lost its state (a restart without persistence) ---------------------------

LOST_LINE = (
    "ratebatch: the Redis store lost its state (restarted?); resuming as if the bucket were empty"
)


def test_a_restarted_store_resumes_as_if_the_bucket_were_empty(
    private_redis: RedisServer,
) -> None:
    store = RedisBucketStore(private_redis.url, "lost")
    found: list[int] = []
    store.on_lost = found.append
    interval = RateLimit(60, 3).interval_ns  # one token per second, burst 3
    for _ in range(3):
        assert store.take(1, interval, 3, None, True)[0] == gcra.ADMITTED
    private_redis.restart()  # killed: the bucket, spent, is gone
    status, now, wait = store.take(1, interval, 3, None, True)
    # Not a fresh burst: the next token one interval after the loss was found.
    assert status == gcra.RESERVED
    assert interval - 50_000_000 < wait <= interval
    assert found == [now]
    assert store.losses == 1
    # Said once: the bucket, emptied, is the one this client now knows.
    status, now2, wait2 = store.take(1, interval, 3, None, True)
    assert now2 + wait2 - (now + wait) == interval
    assert store.losses == 1
    store.close()


def test_an_idle_expiry_is_no_loss(private_redis: RedisServer) -> None:
    store = RedisBucketStore(private_redis.url, "idle", idle_expiry_ms=100)
    interval = RateLimit(600, 3).interval_ns
    assert store.take(1, interval, 3, None, True)[0] == gcra.ADMITTED
    client = private_redis.client()
    deadline = time.monotonic() + 10
    while client.exists(KEY_PREFIX + "idle"):  # full and idle: the key expires by itself
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # Nothing to tell it from a loss but the time: no warning, a start at once, no burst.
    assert store.take(1, interval, 3, None, True)[0] == gcra.ADMITTED
    assert store.take(1, interval, 3, None, True)[0] == gcra.RESERVED
    assert store.losses == 0
    store.close()


def test_a_loss_found_by_one_client_is_told_to_the_others(private_redis: RedisServer) -> None:
    interval = RateLimit(60, 2).interval_ns
    first = RedisBucketStore(private_redis.url, "shared")
    second = RedisBucketStore(private_redis.url, "shared")
    first.take(1, interval, 2, None, True)
    second.take(1, interval, 2, None, True)
    private_redis.restart()
    # A session that starts now knows nothing: it sees a fresh bucket (the limit of what
    # can be told), and takes its burst.
    fresh = RedisBucketStore(private_redis.url, "shared")
    assert fresh.take(1, interval, 2, None, True)[0] == gcra.ADMITTED
    # The first that saw the key before finds the loss and empties the bucket ...
    status, now, wait = second.take(1, interval, 2, None, True)
    assert status == gcra.RESERVED
    assert wait > interval - 50_000_000
    # ... the other finds it too, and queues behind, without emptying it again.
    status, now2, wait2 = first.take(1, interval, 2, None, True)
    assert now2 + wait2 - (now + wait) == interval
    assert (first.losses, second.losses, fresh.losses) == (1, 1, 0)
    for store in (first, second, fresh):
        store.close()


def test_a_state_gone_back_in_time_is_a_loss(private_redis: RedisServer) -> None:
    """A server restarted from an older snapshot (RDB): the bucket's time went back."""
    store = RedisBucketStore(private_redis.url, "snapshot")
    interval = RateLimit(60, 2).interval_ns
    client = private_redis.client()
    store.take(1, interval, 2, None, True)
    snapshot = client.get(KEY_PREFIX + "snapshot")
    assert snapshot is not None
    store.take(1, interval, 2, None, True)
    client.set(KEY_PREFIX + "snapshot", snapshot)
    status, _, wait = store.take(1, interval, 2, None, True)
    assert status == gcra.RESERVED
    assert wait > interval - 50_000_000
    assert store.losses == 1
    store.close()


def test_a_throttle_keeps_the_state_a_loss_is_told_by(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    store = RedisBucketStore(redis_server.url, unique_key(request))
    interval = RateLimit(600, 2).interval_ns
    store.take(1, interval, 2, None, True)
    store.throttle(SECOND // 10, interval, 2, True)
    other = RedisBucketStore(redis_server.url, unique_key(request))
    other.take(1, interval, 2, None, True)
    store.take(1, interval, 2, None, True)
    assert (store.losses, other.losses) == (0, 0)  # the throttle's write kept the epoch
    store.close()
    other.close()


def test_a_throttle_after_a_restart_finds_the_loss(private_redis: RedisServer) -> None:
    store = RedisBucketStore(private_redis.url, "throttled")
    interval = RateLimit(600, 2).interval_ns
    store.take(1, interval, 2, None, True)
    private_redis.restart()
    _at, _, _, until = store.throttle(SECOND // 10, interval, 2, True)
    assert store.losses == 1
    status, now, wait = store.take(1, interval, 2, None, True)
    assert status == gcra.RESERVED
    assert now + wait >= until
    store.close()


def test_windows_count_as_full_after_a_loss(private_redis: RedisServer) -> None:
    store = RedisBucketStore(private_redis.url, "windowed")
    interval = UNLIMITED.interval_ns
    windows = ((5, 2 * SECOND),)  # 5 per 2 s
    status, _, _, _ = store.take_windowed(1, interval, UNLIMITED.burst, None, True, windows)
    assert status == gcra.ADMITTED
    private_redis.restart()
    status, _now, wait, bound = store.take_windowed(
        1, interval, UNLIMITED.burst, None, True, windows
    )
    # The window may have been filled by starts the server forgot: full at the loss.
    assert (status, bound) == (gcra.RESERVED, 1)
    assert 2 * SECOND - 50_000_000 < wait <= 2 * SECOND
    assert store.level(interval, UNLIMITED.burst, windows) == 0
    assert store.losses == 1
    store.close()


def test_a_restart_mid_run_is_said_once_and_sends_no_second_burst(
    pytester: pytest.Pytester, private_redis: RedisServer, dist: list[str]
) -> None:
    restart_at = 5
    pytester.makepyfile(
        test_calls=f"""
        import pathlib, time, pytest

        @pytest.mark.parametrize("n", range(12))
        def test_call(n):
            if n == {restart_at}:
                pathlib.Path("restart-now").touch()
                deadline = time.monotonic() + 60
                while not pathlib.Path("restarted").exists():
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
        """
    )
    command = [
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", *dist,
        "--rate-per-minute=600", "--burst=3", f"--ratebatch-store={private_redis.url}",
        "--ratebatch-report=r.json",
    ]  # fmt: skip
    session = subprocess.Popen(
        command, cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 120
    while not (pytester.path / "restart-now").exists():
        assert session.poll() is None
        assert time.monotonic() < deadline
        time.sleep(0.01)
    private_redis.restart()
    (pytester.path / "restarted").touch()
    output, _ = session.communicate(timeout=120)
    assert session.returncode == 0, output
    assert output.count(LOST_LINE) == 1, output
    report = load_report(pytester.path / "r.json")
    admissions = [(test["store_ns"], test["tokens"]) for test in report["tests"]]
    assert len(admissions) == 12
    # G1 across the restart: no second burst.
    assert worst_excess(admissions, RateLimit(600, 3).interval_ns, 3) <= 0
    assert "store_lost" in {event["event"] for event in report["events"]}
    assert (private_redis.password or "") not in output


@pytest.fixture(params=["one process", "xdist"])
def dist(request: pytest.FixtureRequest) -> list[str]:
    return [] if request.param == "one process" else ["-n", "2"]


def test_slots_come_back_after_a_restart_and_their_holders_lease_them_again(
    private_redis: RedisServer,
) -> None:
    pool = RedisSlotPool(private_redis.url, "slots", 1, lease_seconds=0.6)
    slot = pool.acquire()
    assert slot is not None
    private_redis.restart()
    assert pool.in_use() == 0  # the lease went with the server's state
    # The holder's test still runs: its next renewal (a third of a lease) leases it again,
    # and counts the loss once the reply is in (the lease shows on the server before that).
    deadline = time.monotonic() + 10
    while pool.in_use() == 0 or not pool.lost:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert pool.lost == 1
    assert pool.acquire(0) is None  # the cap holds again
    pool.release(slot)
    assert pool.in_use() == 0
    pool.close()


# --- one key, one limit -----------------------------------------------------------------


def test_a_key_held_with_other_limits_is_refused(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    key = unique_key(request)
    strict = build_policy(cli(rate_per_minute="120")).shared_limits()
    loose = build_policy(cli(rate_per_minute="600")).shared_limits()
    first = RedisBucketStore(redis_server.url, key)
    first.claim(*strict)
    same = RedisBucketStore(redis_server.url, key)
    same.claim(*strict)  # the same limits: shared, as ever
    other = RedisBucketStore(redis_server.url, key)
    with pytest.raises(PolicyConflict) as conflict:
        other.claim(*loose)
    assert (conflict.value.key, conflict.value.theirs, conflict.value.ours) == (
        key,
        "rate 120/min, burst 1",
        "rate 600/min, burst 1",
    )
    first.close()
    with pytest.raises(PolicyConflict):
        other.claim(*loose)  # one session still holds it
    same.close()
    other.claim(*loose)  # once they ended, the key is free for other limits
    other.close()


def test_a_key_held_by_an_older_version_is_refused_clearly(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    """A version that kept the bucket as text claimed without ``CLAIM_FORMAT``: it would
    misread this version's state, so the two refuse each other, whatever the limits."""
    key = unique_key(request)
    fingerprint, text = build_policy(cli(rate_per_minute="120")).shared_limits()
    older = f"0123456789abcdef\t{fingerprint}\t{text}"
    client = redis_server.client()
    claims = f"{KEY_PREFIX}{key}:sessions"
    server_seconds, _ = client.time()
    client.zadd(claims, {older: (server_seconds + 60) * 1_000_000})
    store = RedisBucketStore(redis_server.url, key)
    with pytest.raises(StoreError, match="in use by a session of an older pytest-ratebatch"):
        store.claim(fingerprint, text)
    client.delete(claims)
    store.claim(fingerprint, text)
    (ours,) = client.zrange(claims, 0, -1)
    assert isinstance(ours, bytes)
    assert ours.decode().split("\t")[1] == fingerprint + CLAIM_FORMAT
    store.close()


def test_a_bucket_kept_as_text_by_an_older_version_reads_on(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    """A value of the text format (``reserved:admitted:...`` in us) is read, then written
    back packed (``STATE_FORMAT``); its reservations hold."""
    key = unique_key(request)
    client = redis_server.client()
    server_seconds, micros = client.time()
    now_us = server_seconds * 1_000_000 + micros
    ahead = now_us + 3_000_000  # a bucket reserved 3 s ahead, an epoch, no loss
    client.set(KEY_PREFIX + key, f"{ahead}:{ahead}:-1:7:-1:0:0:0:{now_us}:0", px=60_000)
    store = RedisBucketStore(redis_server.url, key)
    interval = RateLimit(60, 1).interval_ns
    status, _, wait = store.take(1, interval, 1, None, True)
    assert status == gcra.RESERVED
    assert 2 * SECOND < wait <= 3 * SECOND
    stored = client.get(KEY_PREFIX + key)
    assert stored is not None
    assert stored[:1] == STATE_FORMAT
    state, (epoch, loss, *_) = _load(stored)
    assert (state.count, epoch, loss, store.losses) == (7, now_us, 0, 0)
    assert state.reserved == (ahead + 1_000_000) * 1000  # the new reservation, after it
    store.close()


def test_the_packed_state_round_trips_through_python() -> None:
    """The throttle's read-modify-write (``_load``/``_dump``) and the scripts share one form."""
    state = BucketState(
        reserved=1_796_275_561_729_771_000, admitted=5_000, interval=-1, count=3,
        mark_ns=-1, mark_count=2, recover_at=9_000, throttles=1,
    )  # fmt: skip
    tail = (1_796_275_561_000_000, 0, 1_796_275_560_000_000, 1_796_275_562_000_000)
    loaded, loaded_tail = _load(_dump(state, tail))
    assert (loaded.values(), loaded_tail) == (state.values(), tail)
    text, text_tail = _load(b"1796275561729771:5:-1:3:-1:2:9:1")
    assert (text.values(), text_tail) == (state.values(), ())
    # The oldest text (no epoch) and no value at all still write a whole state.
    assert _load(_dump(text, text_tail))[1] == (0, 0, 0, 0)
    assert _load(_dump(*_load(None)))[0].values() == BucketState().values()


def test_an_adapted_interval_of_a_few_microseconds_recovers(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    """An interval under 16 us shortens by 1 us per recovery step (a 16th of it rounds to 0:
    it would stay adapted for good), as ``limits.bucket.current_interval`` does."""
    key = unique_key(request)
    client = redis_server.client()
    server_seconds, micros = client.time()
    now_us = server_seconds * 1_000_000 + micros
    # ten recovery periods (1 s each) due: 10 us down to the configured 0
    adapted = BucketState(interval=10_000, recover_at=(now_us - 10_500_000) * 1000)
    client.set(KEY_PREFIX + key, _dump(adapted, (now_us, 0)), px=60_000)
    store = RedisBucketStore(redis_server.url, key)
    assert store.take(1, 0, 1, None, True)[0] == gcra.ADMITTED
    state, _ = _load(client.get(KEY_PREFIX + key))
    assert state.interval == UNSET
    python = BucketState(interval=10, recover_at=0)  # the same in nanoseconds
    assert current_interval(python, 10 * SECOND + 1, 0) == 0
    assert python.interval == UNSET
    store.close()


def test_a_url_asking_for_decoded_replies_still_works(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    """``?decode_responses=True`` makes redis-py decode replies as text: the packed bucket
    is read as bytes all the same (the throttle reads it itself)."""
    store = RedisBucketStore(f"{redis_server.url}?decode_responses=True", unique_key(request))
    interval = RateLimit(600, 2).interval_ns
    assert store.take(1, interval, 2, None, True)[0] == gcra.ADMITTED
    now, _, _, until = store.throttle(SECOND // 10, interval, 2, True)
    assert until == now + SECOND // 10
    assert store.take(1, interval, 2, None, True)[0] == gcra.RESERVED  # paused
    store.close()


def test_a_call_interrupted_before_its_reply_leaves_none_behind(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    """Ctrl-C (or a timeout's signal) between sending a script and reading its reply: the
    next call must not read that reply as its own."""
    store = RedisBucketStore(redis_server.url, unique_key(request))
    interval, burst = UNLIMITED.interval_ns, UNLIMITED.burst
    store.take(1, interval, burst, None, True)  # the store's own connection, made
    connection = store._redis._connection
    read = connection.read_response
    interrupted: list[bool] = []

    def read_once_interrupted(*args: Any, **kwargs: Any) -> Any:
        if not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        return read(*args, **kwargs)

    connection.read_response = read_once_interrupted
    with pytest.raises(KeyboardInterrupt):
        store.take(1, interval, burst, None, True)
    assert 0 <= store.level(RateLimit(60, 5).interval_ns, 5) <= 5  # its own two numbers
    assert store.take(1, interval, burst, None, True)[0] == gcra.ADMITTED
    store.close()


def test_threads_share_one_store(redis_server: RedisServer, request: pytest.FixtureRequest) -> None:
    """Calls from several threads at once: one goes on the store's own connection, the
    others through redis-py's pool; every take is counted once."""
    store = RedisBucketStore(redis_server.url, unique_key(request))
    interval, burst = UNLIMITED.interval_ns, UNLIMITED.burst

    def takes() -> list[int]:
        return [store.take(1, interval, burst, None, True)[0] for _ in range(200)]

    with ThreadPoolExecutor(4) as pool:
        statuses = [status for result in pool.map(lambda _: takes(), range(4)) for status in result]
    assert statuses == [gcra.ADMITTED] * 800
    state, _ = _load(redis_server.client().get(store.key))
    assert state.count == 800
    store.close()


def test_a_killed_sessions_claim_lapses(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    key = unique_key(request)
    killed = RedisBucketStore(redis_server.url, key, claim_lease_seconds=0.5)
    killed.claim(*build_policy(cli(rate_per_minute="120")).shared_limits())
    killed._closing.set()  # its renewals stop, and nobody gives the claim back
    other = RedisBucketStore(redis_server.url, key)
    loose = build_policy(cli(rate_per_minute="600")).shared_limits()
    with pytest.raises(PolicyConflict):
        other.claim(*loose)
    time.sleep(0.6)
    other.claim(*loose)
    other.close()


def test_sessions_with_other_limits_on_one_key_are_refused(
    pytester: pytest.Pytester, redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    pytester.makepyfile(
        test_calls="""
        import pathlib, time

        def test_waits_for_the_other_session():
            pathlib.Path("running").touch()
            deadline = time.monotonic() + 60
            while not pathlib.Path("done").exists():
                assert time.monotonic() < deadline
                time.sleep(0.01)
        """
    )
    common = [
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
        f"--ratebatch-store={redis_server.url}", f"--ratebatch-key={unique_key(request)}",
    ]  # fmt: skip
    first = subprocess.Popen(
        [*common, "--rate-per-minute=120"], cwd=pytester.path, stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not (pytester.path / "running").exists():
        assert first.poll() is None
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pytester.makepyfile(test_other="def test_other(): pass")
    second = subprocess.run(
        [*common, "--rate-per-minute=600", "test_other.py"],
        cwd=pytester.path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    (pytester.path / "done").touch()
    output, _ = first.communicate(timeout=60)
    assert first.returncode == 0, output
    assert second.returncode == pytest.ExitCode.USAGE_ERROR, second.stdout + second.stderr
    assert "Traceback" not in second.stderr
    message = second.stderr.strip().splitlines()[-1]
    assert message.startswith(f"ERROR: ratebatch: the Redis key {unique_key(request)!r} ")
    assert "it holds rate 120/min, burst 1, this session states rate 600/min, burst 1" in message
    # The first session ended: the key is free for other limits.
    third = subprocess.run(
        [*common, "--rate-per-minute=600", "test_other.py"],
        cwd=pytester.path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert third.returncode == 0, third.stdout + third.stderr


# --- a slow or misaddressed server ---------------------------------------------------------


def test_tls_to_a_plain_port_fails_within_seconds(
    pytester: pytest.Pytester, redis_server: RedisServer
) -> None:
    url = f"rediss://127.0.0.1:{redis_server.port}/0"  # a plain Redis port answers no TLS
    pytester.makepyfile(test_one="def test_one(): pass")
    began = time.monotonic()
    result = pytester.runpytest_subprocess("--rate-per-minute=60", f"--ratebatch-store={url}")
    elapsed = time.monotonic() - began
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: ratebatch: the store cannot be used: redis rediss://127.0.0.1:*: *TLS*"]
    )
    assert elapsed < 15  # the connection's few seconds, and pytest's start


def test_a_hung_store_stops_the_run_within_seconds(
    pytester: pytest.Pytester, private_redis: RedisServer
) -> None:
    """A server that stops answering (SIGSTOP: connections still accepted, no reply) is as
    good as lost after a few seconds: the rest of the run is cancelled, nothing hangs."""
    assert private_redis.process is not None
    pid = private_redis.process.pid
    pytester.makepyfile(
        test_calls=f"""
        import os, signal, pytest

        @pytest.mark.parametrize("n", range(6))
        def test_call(n):
            if n == 2:
                os.kill({pid}, signal.SIGSTOP)
        """
    )
    began = time.monotonic()
    try:
        result = pytester.runpytest_subprocess(
            "--rate-per-minute=6000", f"--ratebatch-store={private_redis.url}", "-rs",
            "-p", "no:randomly",
        )  # fmt: skip
    finally:
        os.kill(pid, signal.SIGCONT)
    elapsed = time.monotonic() - began
    result.assert_outcomes(passed=3, skipped=3)
    result.stdout.fnmatch_lines(["*ratebatch: cancelled (store unavailable: *"])
    assert "stop: store unavailable" in result.stdout.str()
    assert elapsed < 25


# --- passwords ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", ["query", "as user name", "unencoded", "malformed host", "malformed port"]
)
def test_no_output_shows_a_password_whatever_the_url(
    pytester: pytest.Pytester, private_redis: RedisServer, shape: str
) -> None:
    secret, port = private_redis.password or "", private_redis.port
    url = {
        "query": f"redis://127.0.0.1:{port}/0?password={secret}",  # a working URL
        "as user name": f"redis://{secret}@127.0.0.1:{port}/0",
        "unencoded": f"redis://:a/{secret}@127.0.0.1:{port}/0",
        "malformed host": f"redis://:{secret}@[::1:{port}/0",
        "malformed port": f"redis://:{secret}@127.0.0.1:{port}x/0",
    }[shape]
    pytester.makepyfile(test_one="def test_one(): pass")
    result = pytester.runpytest_subprocess(
        "--rate-per-minute=600", f"--ratebatch-store={url}", "--ratebatch-report=r.json"
    )
    output = result.stdout.str() + result.stderr.str()
    assert secret not in output
    assert "Traceback" not in output
    if shape == "query":
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(["ratebatch: *; store: redis redis://*?password=*** key *"])
        assert secret not in (pytester.path / "r.json").read_text()
    else:
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["ERROR: ratebatch: *"])


def test_other_limits_claimed_after_a_restart_are_told(private_redis: RedisServer) -> None:
    ours = RedisBucketStore(private_redis.url, "claims", claim_lease_seconds=0.6)
    told: list[str] = []
    ours.on_conflict = told.append
    ours.claim(*build_policy(cli(rate_per_minute="120")).shared_limits())
    private_redis.restart()  # the claims are gone: another session may claim the key
    theirs = RedisBucketStore(private_redis.url, "claims")
    theirs.claim(*build_policy(cli(rate_per_minute="600")).shared_limits())
    deadline = time.monotonic() + 10
    while not told:  # our next renewal (a third of a lease) finds theirs
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.5)  # and later renewals say nothing more
    assert told == ["rate 600/min, burst 1"]
    ours.close()
    theirs.close()
