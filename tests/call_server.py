"""A real HTTP server on 127.0.0.1 that rate-limits calls: for end-to-end tests and benchmarks.

Every request to any path (GET, POST, PUT, DELETE, PATCH) counts against one moving window
(the ``limits`` library's ``MovingWindowRateLimiter``, one key), except ``GET /_stats`` and
``POST /_reset``. Within the limit a request answers 200 with
``{"ok": true, "method": ..., "path": ..., "body_length": n}``; over it, 429 with a JSON error.
Request bodies are read in full (``Content-Length`` or ``Transfer-Encoding: chunked``), and
connections are kept alive (HTTP/1.1, every answer has a ``Content-Length``).

``headers`` decides what the answers say about the limit:

* ``"retry-after"``: a 429 carries ``Retry-After`` (whole seconds, rounded up); 200s nothing.
* ``"openai"``: every answer carries ``x-ratelimit-limit-requests``,
  ``x-ratelimit-remaining-requests`` and ``x-ratelimit-reset-requests`` (a Go duration such as
  ``1.2s``, ``850ms`` or ``6m0s``: when the oldest call in the window leaves it); no
  ``Retry-After``.
* ``"none"``: a bare 429.

``GET /_stats`` answers ``{"requests": n, "rejected": m, "limit": ..., "arrivals":
[[seconds since the server started, status], ...]}``; ``POST /_reset`` forgets the calls.

In a test: ``with CallServer.start("3 per 1 second") as server: ... server.url ...``.
From another process: ``python tests/call_server.py --limit "20 per 2 seconds" --headers openai``
prints the URL as its first line and serves until it is killed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, Literal, NamedTuple, cast
from urllib.parse import urlsplit

from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

__all__ = [
    "DEFAULT_LIMIT",
    "HEADER_MODES",
    "Arrival",
    "CallServer",
    "HeaderMode",
    "go_duration",
    "max_in_window",
    "start_call_server",
]

DEFAULT_LIMIT = "10 per 2 seconds"
HeaderMode = Literal["retry-after", "openai", "none"]
HEADER_MODES: tuple[HeaderMode, ...] = ("retry-after", "openai", "none")
KEY = "call-server"  # every client shares one key: one global window

JsonObject = dict[str, Any]


class Arrival(NamedTuple):
    """One counted request: when the limiter judged it (``time.monotonic()``), and how."""

    at: float
    method: str
    path: str
    status: int
    x_test: str | None  # the request's ``X-Test`` header, if it had one


class _BadRequest(Exception):
    pass


def go_duration(seconds: float) -> str:
    """``seconds`` as a Go duration, rounded up to the ms: ``850ms``, ``1.2s``, ``6m0s``."""
    millis = max(0, math.ceil(round(seconds * 1000, 3)))
    if millis == 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, fraction = divmod(rest, 1000)
    text = f"{whole}.{fraction:03d}".rstrip("0") if fraction else str(whole)
    if hours:
        return f"{hours}h{minutes}m{text}s"
    if minutes:
        return f"{minutes}m{text}s"
    return f"{text}s"


def max_in_window(times: list[float], window: float) -> int:
    """The most of ``times`` inside any window ``[t, t + window)`` (any order of ``times``)."""
    ordered = sorted(times)
    best = 0
    first = 0
    for last, at in enumerate(ordered):
        while at - ordered[first] >= window:
            first += 1
        best = max(best, last - first + 1)
    return best


class _Limiter:
    """The moving window and the record of the calls; safe to use from many threads."""

    def __init__(self, limit: str) -> None:
        self.limit_text = limit
        self.item: RateLimitItem = parse(limit)
        self._storage = MemoryStorage()
        self._limiter = MovingWindowRateLimiter(self._storage)
        self._lock = threading.Lock()
        self._arrivals: list[Arrival] = []

    def admit(self, method: str, path: str, x_test: str | None) -> tuple[bool, int, float]:
        """Count one call: (admitted, calls left in the window, seconds until it frees one)."""
        with self._lock:
            admitted = self._limiter.hit(self.item, KEY)
            # Stamped inside the lock, right after the limiter's decision: the record keeps
            # the limiter's order, so the admitted arrivals never exceed the limit.
            at = time.monotonic()
            stats = self._limiter.get_window_stats(self.item, KEY)
            status = HTTPStatus.OK if admitted else HTTPStatus.TOO_MANY_REQUESTS
            self._arrivals.append(Arrival(at, method, path, int(status), x_test))
        return admitted, max(0, stats.remaining), stats.reset_time - time.time()

    def arrivals(self) -> list[Arrival]:
        with self._lock:
            return list(self._arrivals)

    def reset(self) -> None:
        with self._lock:
            self._storage.reset()
            self._arrivals.clear()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive; every answer sends Content-Length
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms stalls

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, open_=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, open_=False)

    def do_GET(self) -> None:
        self._call("GET")

    def do_POST(self) -> None:
        self._call("POST")

    def do_PUT(self) -> None:
        self._call("PUT")

    def do_DELETE(self) -> None:
        self._call("DELETE")

    def do_PATCH(self) -> None:
        self._call("PATCH")

    def _call(self, method: str) -> None:
        # Read the body whatever the answer: unread data would break the next request.
        try:
            body_length = self._read_body()
        except _BadRequest as error:
            self.close_connection = True
            self._send(HTTPStatus.BAD_REQUEST, {"error": {"message": str(error)}})
            return
        server = self.server
        route = urlsplit(self.path).path
        if (method, route) == ("GET", "/_stats"):
            self._send(HTTPStatus.OK, server.owner.stats_json())
            return
        if (method, route) == ("POST", "/_reset"):
            server.owner.reset()
            self._send(HTTPStatus.OK, {"ok": True, "reset": True})
            return
        admitted, remaining, reset_in = server.limiter.admit(
            method, self.path, self.headers.get("X-Test")
        )
        headers: dict[str, str] = {}
        mode = server.owner.headers
        if mode == "openai":
            headers = {
                "x-ratelimit-limit-requests": str(server.limiter.item.amount),
                "x-ratelimit-remaining-requests": str(remaining),
                "x-ratelimit-reset-requests": go_duration(reset_in),
            }
        elif mode == "retry-after" and not admitted:
            # Whole seconds, rounded up: retrying earlier would only be rejected again.
            headers = {"Retry-After": str(max(1, math.ceil(reset_in)))}
        if server.owner.delay > 0:
            time.sleep(server.owner.delay)
        if admitted:
            payload: JsonObject = {
                "ok": True,
                "method": method,
                "path": self.path,
                "body_length": body_length,
            }
            self._send(HTTPStatus.OK, payload, headers)
        else:
            message = f"Rate limit reached: {server.limiter.limit_text}"
            details = {"message": message, "type": "requests", "code": "rate_limit_exceeded"}
            self._send(HTTPStatus.TOO_MANY_REQUESTS, {"error": details}, headers)

    def _read_body(self) -> int:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        text = self.headers.get("Content-Length")
        if text is None:
            return 0
        try:
            length = int(text)
        except ValueError:
            raise _BadRequest(f"bad Content-Length: {text!r}") from None
        if length < 0:
            raise _BadRequest(f"bad Content-Length: {text!r}")
        data = self.rfile.read(length)
        if len(data) != length:
            raise _BadRequest("the body ended early")
        return length

    def _read_chunked(self) -> int:
        total = 0
        while True:
            line = self.rfile.readline(65537)
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _BadRequest(f"bad chunk size: {line!r}") from None
            if size < 0:
                raise _BadRequest(f"bad chunk size: {line!r}")
            if size == 0:
                break
            data = self.rfile.read(size)
            if len(data) != size:
                raise _BadRequest("a chunk ended early")
            total += size
            self.rfile.readline(65537)  # the CRLF after the chunk's data
        while True:  # trailers, up to the empty line
            line = self.rfile.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                return total

    def _send(
        self, status: HTTPStatus, payload: JsonObject, headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request on stderr would drown pytest's output


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung client must not keep the process alive
    request_queue_size = 256  # many clients connect at once: a full backlog costs 1 s SYN retries

    def __init__(self, address: tuple[str, int], owner: CallServer) -> None:
        self.owner = owner
        self.limiter = owner.limiter
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, connection: socket.socket, *, open_: bool) -> None:
        with self._connections_lock:
            if open_:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def close_connections(self) -> None:
        """End the kept-alive connections: a stopped server answers nobody."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by its client
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client that hangs up is no news
        super().handle_error(request, client_address)


class CallServer:
    """A running rate-limited server: ``url``, ``port``, ``stats()``, ``arrivals()``, ``stop()``.

    ``limit`` is a ``limits`` string (``"10 per 2 seconds"``); ``headers`` is one of
    ``HEADER_MODES``; ``delay`` seconds pass before each counted request is answered.
    """

    def __init__(
        self,
        limit: str = DEFAULT_LIMIT,
        *,
        headers: HeaderMode = "retry-after",
        port: int = 0,
        delay: float = 0.0,
    ) -> None:
        if headers not in HEADER_MODES:
            raise ValueError(f"headers must be one of {HEADER_MODES}, not {headers!r}")
        if delay < 0:
            raise ValueError(f"delay must not be negative, not {delay!r}")
        self.headers: HeaderMode = headers
        self.delay = delay
        self.limiter = _Limiter(limit)
        self.started_at = time.monotonic()
        self._server = _Server(("127.0.0.1", port), self)
        self._stopped = False
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="call-server",
            daemon=True,
        )
        self._thread.start()

    @classmethod
    def start(
        cls,
        limit: str = DEFAULT_LIMIT,
        *,
        headers: HeaderMode = "retry-after",
        port: int = 0,
        delay: float = 0.0,
    ) -> CallServer:
        """Serve on 127.0.0.1 (a free port by default) from a daemon thread."""
        return cls(limit, headers=headers, port=port, delay=delay)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def limit(self) -> str:
        """The limit as written, e.g. ``"10 per 2 seconds"``."""
        return self.limiter.limit_text

    @property
    def amount(self) -> int:
        """Calls allowed per window."""
        return int(self.limiter.item.amount)

    @property
    def window(self) -> float:
        """The window's length in seconds."""
        return float(self.limiter.item.get_expiry())

    def stats(self) -> dict[str, int]:
        """``{"requests": n, "rejected": m}``: every counted request, and the 429s among them."""
        arrivals = self.limiter.arrivals()
        rejected = sum(1 for arrival in arrivals if arrival.status != HTTPStatus.OK)
        return {"requests": len(arrivals), "rejected": rejected}

    def arrivals(self) -> list[Arrival]:
        """Every counted request so far, in the limiter's order (a copy)."""
        return self.limiter.arrivals()

    def admitted(self) -> list[float]:
        """The arrival times of the requests that got a 200: for ``max_in_window``."""
        return [arrival.at for arrival in self.arrivals() if arrival.status == HTTPStatus.OK]

    def stats_json(self) -> JsonObject:
        """What ``GET /_stats`` answers."""
        arrivals = self.limiter.arrivals()
        rejected = sum(1 for arrival in arrivals if arrival.status != HTTPStatus.OK)
        return {
            "requests": len(arrivals),
            "rejected": rejected,
            "limit": self.limit,
            "arrivals": [
                [round(arrival.at - self.started_at, 6), arrival.status] for arrival in arrivals
            ],
        }

    def reset(self) -> None:
        """Forget every call: an empty window, no records."""
        self.limiter.reset()

    def stop(self) -> None:
        """Stop serving and close the port and the kept-alive connections (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        self._thread.join(timeout=5)

    def __enter__(self) -> CallServer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def start_call_server(
    limit: str = DEFAULT_LIMIT,
    *,
    headers: HeaderMode = "retry-after",
    port: int = 0,
    delay: float = 0.0,
) -> CallServer:
    """Same as ``CallServer.start``."""
    return CallServer.start(limit, headers=headers, port=port, delay=delay)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A rate-limited HTTP server on 127.0.0.1.")
    parser.add_argument("--limit", default=DEFAULT_LIMIT, help=f"default: {DEFAULT_LIMIT!r}")
    parser.add_argument("--headers", choices=HEADER_MODES, default="retry-after")
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per counted call")
    args = parser.parse_args(argv)
    server = CallServer.start(
        args.limit, headers=cast(HeaderMode, args.headers), port=args.port, delay=args.delay
    )
    print(server.url, flush=True)  # the first line: the callers wait for it

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, terminate)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
