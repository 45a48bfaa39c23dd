"""The rate-limited call server of the end-to-end tests and benchmarks, checked on its own."""

from __future__ import annotations

import http.client
import itertools
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.call_server import CallServer, go_duration, max_in_window, start_call_server

OPENAI_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
)


def call(
    server: CallServer, path: str = "/", method: str = "GET", body: bytes | None = None
) -> tuple[int, dict[str, str], Any]:
    """One request on a new connection: (status, lower-cased headers, JSON body)."""
    request = urllib.request.Request(server.url + path, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            status, headers, data = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, headers, data = error.code, error.headers, error.read()
    return status, {name.lower(): value for name, value in headers.items()}, json.loads(data)


@pytest.fixture
def server() -> Iterator[CallServer]:
    with CallServer.start("3 per 1 second") as running:
        yield running


def test_the_limit_is_enforced_with_retry_after(server: CallServer) -> None:
    for _ in range(3):
        status, headers, body = call(server, "/v1/things?x=1", "POST", b'{"a": 1}')
        assert status == 200
        assert body == {"ok": True, "method": "POST", "path": "/v1/things?x=1", "body_length": 8}
        assert "retry-after" not in headers
        assert not any(name.startswith("x-ratelimit") for name in headers)
    status, headers, body = call(server, "/other", "DELETE")
    assert status == 429
    assert headers["retry-after"] == "1"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert server.stats() == {"requests": 4, "rejected": 1}
    arrivals = server.arrivals()
    assert [(a.method, a.path, a.status) for a in arrivals] == [
        ("POST", "/v1/things?x=1", 200),
        ("POST", "/v1/things?x=1", 200),
        ("POST", "/v1/things?x=1", 200),
        ("DELETE", "/other", 429),
    ]
    assert all(b.at >= a.at for a, b in itertools.pairwise(arrivals))


def test_every_method_counts() -> None:
    with start_call_server("5 per 10 seconds") as server:
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
            assert call(server, "/x", method, b"" if method != "GET" else None)[0] == 200
        assert call(server, "/x", "PATCH", b"{}")[0] == 429


def test_openai_headers_on_every_answer_and_no_retry_after() -> None:
    with CallServer.start("2 per 1 minute", headers="openai") as server:
        seen = [call(server, "/v1/chat/completions", "POST", b"{}") for _ in range(3)]
    assert [status for status, _, _ in seen] == [200, 200, 429]
    for _, headers, _ in seen:
        assert all(name in headers for name in OPENAI_HEADERS)
        assert headers["x-ratelimit-limit-requests"] == "2"
        assert re.fullmatch(r"(\d+m)?\d+(\.\d+)?s|\d+ms", headers["x-ratelimit-reset-requests"])
        assert "retry-after" not in headers
    assert [h["x-ratelimit-remaining-requests"] for _, h, _ in seen] == ["1", "0", "0"]
    # The oldest call leaves the one-minute window in just under a minute.
    assert seen[2][1]["x-ratelimit-reset-requests"].startswith("59.")


def test_none_mode_answers_a_bare_429() -> None:
    with CallServer.start("1 per 1 second", headers="none") as server:
        assert call(server)[0] == 200
        status, headers, _ = call(server)
    assert status == 429
    assert "retry-after" not in headers
    assert not any(name.startswith("x-ratelimit") for name in headers)


def test_bad_header_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="headers must be one of"):
        CallServer.start(headers="bogus")  # type: ignore[arg-type]


def test_keep_alive_and_a_chunked_body(server: CallServer) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        connection.request("GET", "/first", headers={"X-Test": "one"})
        first = connection.getresponse()
        assert first.status == 200
        assert json.loads(first.read())["path"] == "/first"
        local = connection.sock.getsockname()
        # No Content-Length, an iterable body: http.client sends it chunked.
        chunks = iter([b"hello ", b"chunked ", b"world"])
        connection.request("PUT", "/second", body=chunks, encode_chunked=True)
        second = connection.getresponse()
        assert second.status == 200
        assert json.loads(second.read()) == {
            "ok": True,
            "method": "PUT",
            "path": "/second",
            "body_length": 19,
        }
        assert connection.sock.getsockname() == local  # the same connection
    finally:
        connection.close()
    assert [a.x_test for a in server.arrivals()] == ["one", None]


def test_stats_and_reset_are_not_counted(server: CallServer) -> None:
    for _ in range(4):
        call(server)
    for _ in range(3):
        status, _, stats = call(server, "/_stats")
        assert status == 200
    assert stats["requests"] == 4
    assert stats["rejected"] == 1
    assert [s for _, s in stats["arrivals"]] == [200, 200, 200, 429]
    assert all(0 <= offset < 10 for offset, _ in stats["arrivals"])
    status, _, _ = call(server, "/_reset", "POST", b"")
    assert status == 200
    assert server.stats() == {"requests": 0, "rejected": 0}
    assert call(server)[0] == 200  # the window is empty again
    assert server.stats() == {"requests": 1, "rejected": 0}


def test_delay_slows_every_counted_call() -> None:
    with CallServer.start("10 per 1 second", delay=0.1) as server:
        started = time.monotonic()
        assert call(server)[0] == 200
        assert time.monotonic() - started >= 0.1
        started = time.monotonic()
        call(server, "/_stats")
        assert time.monotonic() - started < 0.1


def test_concurrent_calls_never_exceed_the_limit() -> None:
    statuses: list[int] = []
    with CallServer.start("5 per 1 second") as server:

        def worker() -> None:
            for _ in range(4):
                statuses.append(call(server)[0])

        threads = [threading.Thread(target=worker) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        admitted = server.admitted()
    assert sorted(statuses) == [200] * 5 + [429] * 19
    assert max_in_window(admitted, 1.0) == 5


def test_stop_ends_kept_alive_connections() -> None:
    server = CallServer.start("10 per 1 second")
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    connection.request("GET", "/")
    connection.getresponse().read()
    server.stop()
    server.stop()  # idempotent

    def call_again() -> None:
        connection.request("GET", "/")
        connection.getresponse()

    with pytest.raises((http.client.HTTPException, OSError)):
        call_again()
    connection.close()


def test_script_mode_prints_the_url_and_serves() -> None:
    script = Path(__file__).with_name("call_server.py")
    process = subprocess.Popen(
        [sys.executable, str(script), "--limit", "1 per 2 seconds", "--headers", "openai"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        with urllib.request.urlopen(url + "/ping", timeout=5) as response:
            assert response.status == 200
            assert response.headers["x-ratelimit-remaining-requests"] == "0"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + "/ping", timeout=5)
        assert refused.value.code == 429
        refused.value.close()
        with urllib.request.urlopen(url + "/_stats", timeout=5) as response:
            stats = json.loads(response.read())
        assert (stats["requests"], stats["rejected"]) == (2, 1)
    finally:
        process.terminate()
        assert process.wait(timeout=5) == 0


def test_max_in_window() -> None:
    assert max_in_window([], 1.0) == 0
    assert max_in_window([5.0], 1.0) == 1
    assert max_in_window([0.0, 0.5, 0.99, 1.0, 1.5, 1.6], 1.0) == 4  # 0.99 .. 1.6 (half-open)
    assert max_in_window([3.0, 0.0, 2.0, 1.0], 1.0) == 1
    assert max_in_window([3.0, 0.0, 2.0, 1.0], 1.0001) == 2
    assert max_in_window([0.0, 0.0, 0.0], 0.5) == 3


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (-1.0, "0s"),
        (0.85, "850ms"),
        (0.0001, "1ms"),
        (1.2, "1.2s"),
        (2.0, "2s"),
        (59.125, "59.125s"),
        (360.0, "6m0s"),
        (61.5, "1m1.5s"),
        (3600.0, "1h0m0s"),
    ],
)
def test_go_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text
