"""A real HTTP server on 127.0.0.1 that throttles like an API: for the end-to-end tests.

``GET /`` is limited by a token bucket (``rate`` per second, ``capacity``) or refuses the
first ``refuse_first`` requests; a refused request gets ``status`` (429) and, if set, a
``Retry-After`` header. ``GET /budget`` is a fixed window of ``window_limit`` requests per
``window`` seconds that publishes ``X-RateLimit-Remaining`` and ``X-RateLimit-Reset`` (epoch
seconds) on every answer. Every request is logged with its time and status.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


class ThrottlingServer:
    def __init__(
        self,
        rate: float = 1000.0,
        capacity: float = 1000.0,
        retry_after: str | None = None,
        refuse_first: int = 0,
        status: int = 429,
        window_limit: int = 10,
        window: float = 2.0,
    ) -> None:
        self.rate = rate
        self.capacity = capacity
        self.retry_after = retry_after
        self.refuse_first = refuse_first
        self.status = status
        self.window_limit = window_limit
        self.window = window
        self.log: list[tuple[float, str, int]] = []  # (monotonic time, path, status)
        self._tokens = capacity
        self._refill_at = time.monotonic()
        self._window_start = time.time()
        self._window_used = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def refused(self) -> list[float]:
        return [at for at, _, status in self.log if status != 200]

    def accepted(self) -> list[float]:
        return [at for at, _, status in self.log if status == 200]

    def __enter__(self) -> ThrottlingServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _limited(self, now: float) -> bool:
        if self.refuse_first:
            self.refuse_first -= 1
            return True
        self._tokens = min(self.capacity, self._tokens + (now - self._refill_at) * self.rate)
        self._refill_at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return False
        return True

    def _budget(self) -> tuple[bool, dict[str, str]]:
        now = time.time()
        if now - self._window_start >= self.window:
            elapsed = int((now - self._window_start) // self.window)
            self._window_start += elapsed * self.window
            self._window_used = 0
        refused = self._window_used >= self.window_limit
        if not refused:
            self._window_used += 1
        headers = {
            "X-RateLimit-Limit": str(self.window_limit),
            "X-RateLimit-Remaining": str(self.window_limit - self._window_used),
            "X-RateLimit-Reset": f"{self._window_start + self.window:.3f}",
        }
        return refused, headers

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                now = time.monotonic()
                headers: dict[str, str] = {}
                with server._lock:
                    if self.path.startswith("/budget"):
                        refused, headers = server._budget()
                    else:
                        refused = server._limited(now)
                        if refused and server.retry_after is not None:
                            headers["Retry-After"] = server.retry_after
                    status = server.status if refused else 200
                    server.log.append((now, self.path, status))
                body = b"slow down" if refused else b"ok"
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler
