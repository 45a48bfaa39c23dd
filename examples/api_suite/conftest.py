"""Start the rate-limited API once per session and hand the tests a tiny client for it.

The server runs in the process that is not a pytest-xdist worker: with ``-n 4`` every worker
calls the same server through ``$RATE_LIMITED_API_URL``, which the workers inherit because
they are spawned after ``pytest_configure``. Set that variable yourself to test a server
started elsewhere (e.g. ``python rate_limited_api.py --port 8000``).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import pytest
from rate_limited_api import ApiServer, start_server

if TYPE_CHECKING:
    from _pytest.terminal import TerminalReporter

URL_ENV = "RATE_LIMITED_API_URL"
SERVER_KEY = pytest.StashKey[ApiServer]()
TIMEOUT = 10.0  # seconds per call; the local server answers in milliseconds


class RateLimitExceeded(AssertionError):
    """The API answered 429: the suite called it faster than its rate limit allows."""


class ApiClient:
    """``get`` and ``post`` return ``(status, parsed JSON body)``; a 429 fails the test."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")

    def get(self, path: str) -> tuple[int, Any]:
        return self._call("GET", path, None)

    def post(self, path: str, json_body: Mapping[str, Any]) -> tuple[int, Any]:
        return self._call("POST", path, json.dumps(json_body).encode())

    def _call(self, method: str, path: str, data: bytes | None) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.base_url + path,
            data=data,
            method=method,
            headers={"Accept": "application/json", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            # 4xx and 5xx are answers to assert on, except 429: that one is the suite's fault.
            status, raw, retry_after = error.code, error.read(), error.headers.get("Retry-After")
            error.close()
            if status == HTTPStatus.TOO_MANY_REQUESTS:
                # Chained: pytest-ratebatch finds the 429 and its Retry-After in the cause.
                raise RateLimitExceeded(
                    "429 Too Many Requests from the API: the suite exceeded the rate limit "
                    f"({method} {path}, Retry-After: {retry_after}, body: {raw.decode()!r})"
                ) from error
        return status, json.loads(raw) if raw else None


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    if _is_worker(config) or os.environ.get(URL_ENV):
        return  # a worker, or somebody else's server: use $RATE_LIMITED_API_URL as it is
    server = start_server()
    config.stash[SERVER_KEY] = server
    os.environ[URL_ENV] = server.url


def pytest_unconfigure(config: pytest.Config) -> None:
    server = config.stash.get(SERVER_KEY, None)
    if server is None:
        return
    server.stop()
    # The variable was unset before: a later session in this process starts its own server.
    os.environ.pop(URL_ENV, None)


def _stats(config: pytest.Config) -> tuple[dict[str, Any], str]:
    server = config.stash.get(SERVER_KEY, None)
    if server is not None:
        return server.stats(), ""
    _, stats = ApiClient(os.environ[URL_ENV]).get("/_stats")
    return stats, f" (server at {os.environ[URL_ENV]}, counted since it started)"


def pytest_terminal_summary(terminalreporter: TerminalReporter, config: pytest.Config) -> None:
    if _is_worker(config) or not os.environ.get(URL_ENV):
        return
    try:
        stats, where = _stats(config)
    except OSError as error:  # somebody else's server may be gone by now
        terminalreporter.write_line(f"rate-limited API: no stats ({error})")
        return
    terminalreporter.write_line(
        f"rate-limited API: {stats['requests']} requests, "
        f"{stats['rejected']} rejected with 429{where}"
    )


@pytest.fixture(scope="session")
def api() -> ApiClient:
    url = os.environ.get(URL_ENV)
    if not url:
        pytest.fail(f"${URL_ENV} is not set: the API server did not start", pytrace=False)
    return ApiClient(url)
