"""One rate across sessions through a real redis-server; the store's faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pytest_ratebatch.limits import gcra
from pytest_ratebatch.limits.policy import RateLimit
from pytest_ratebatch.stores.base import StoreError
from pytest_ratebatch.stores.redis import KEY_PREFIX, RedisBucketStore
from pytest_ratebatch.views.report import worst_excess
from tests.redis_server import RedisServer, free_port

pytest_plugins = ["pytester"]

SECOND = 1_000_000_000


def load_report(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


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
