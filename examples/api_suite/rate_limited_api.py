"""A small JSON shop API on 127.0.0.1 that enforces a rate limit, like many real APIs do.

The limit is enforced with the ``limits`` library's moving window, an implementation that
has nothing to do with pytest-ratebatch: the example suite passes only if the plugin really
keeps the calls under the limit. All clients share one API key, so there is one global key.

Endpoints (every one counts against the limit, except ``/_stats``)::

    GET  /health           {"status": "ok"}
    GET  /items            {"items": [...]}; ?category=NAME filters
    GET  /items/<id>       one item, or 404
    POST /orders           {"item_id", "quantity", "customer"} -> 201 and the order;
                           400 for a body that is not a JSON object, 422 for invalid fields,
                           409 for an item out of stock
    GET  /orders/<id>      one order, or 404
    GET  /_stats           {"requests": n, "rejected": m} (not rate limited)

Over the limit every endpoint answers 429 with a JSON error and a ``Retry-After`` header.
Run it on its own with ``python rate_limited_api.py [--port N] [--limit "10 per 2 seconds"]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

__all__ = ["DEFAULT_LIMIT", "LIMIT_ENV", "ApiServer", "ShopApi", "start_server"]

DEFAULT_LIMIT = "10 per 2 seconds"
LIMIT_ENV = "RATE_LIMITED_API_LIMIT"
API_KEY = "shared-api-key"  # every client of the suite uses the same key: one global bucket
MAX_QUANTITY = 100

JsonObject = dict[str, Any]


def _item(item_id: int, name: str, category: str, price_cents: int, stock: int) -> JsonObject:
    return {
        "id": item_id,
        "name": name,
        "category": category,
        "price_cents": price_cents,
        "stock": stock,
    }


ITEMS: tuple[JsonObject, ...] = (
    _item(1, "Espresso beans 1 kg", "coffee", 2490, 40),
    _item(2, "Filter coffee 500 g", "coffee", 1290, 75),
    _item(3, "Green tea 100 g", "tea", 890, 120),
    _item(4, "Earl Grey 250 g", "tea", 1150, 60),
    _item(5, "Hand grinder", "equipment", 5900, 12),
    _item(6, "Pour-over kettle", "equipment", 4500, 0),  # out of stock: orders get 409
)

# Pre-seeded orders, so a test can read an order without creating one first (one call each).
SEED_ORDERS: tuple[JsonObject, ...] = (
    {
        "id": 1,
        "item_id": 1,
        "quantity": 2,
        "customer": "ada@example.com",
        "total_cents": 4980,
        "status": "shipped",
    },
    {
        "id": 2,
        "item_id": 3,
        "quantity": 5,
        "customer": "alan@example.com",
        "total_cents": 4450,
        "status": "created",
    },
)


class ShopApi:
    """The API's state and logic, independent of HTTP; safe to call from many threads."""

    def __init__(self, limit: str) -> None:
        self.limit = parse(limit)
        self.limit_text = limit  # as written: str(self.limit) says "10 per 2 second"
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._lock = threading.Lock()
        self._items = {item["id"]: dict(item) for item in ITEMS}
        self._orders = {order["id"]: dict(order) for order in SEED_ORDERS}
        self._next_order_id = max(self._orders) + 1
        self._requests = 0
        self._rejected = 0

    def admit(self) -> int | None:
        """Count a request against the limit; ``None`` if allowed, else Retry-After seconds."""
        with self._lock:
            self._requests += 1
            if self._limiter.hit(self.limit, API_KEY):
                return None
            self._rejected += 1
            stats = self._limiter.get_window_stats(self.limit, API_KEY)
        # Whole seconds, rounded up: retrying earlier would only be rejected again.
        return max(1, math.ceil(stats.reset_time - time.time()))

    def stats(self) -> JsonObject:
        with self._lock:
            return {"requests": self._requests, "rejected": self._rejected}

    def list_items(self, category: str | None) -> list[JsonObject]:
        with self._lock:
            items = [dict(item) for item in self._items.values()]
        return [item for item in items if category is None or item["category"] == category]

    def get_item(self, item_id: int) -> JsonObject | None:
        with self._lock:
            item = self._items.get(item_id)
            return None if item is None else dict(item)

    def get_order(self, order_id: int) -> JsonObject | None:
        with self._lock:
            order = self._orders.get(order_id)
            return None if order is None else dict(order)

    def create_order(self, body: JsonObject) -> tuple[HTTPStatus, JsonObject]:
        errors = validate_order(body)
        if errors:
            return HTTPStatus.UNPROCESSABLE_ENTITY, {"error": "invalid_order", "fields": errors}
        with self._lock:
            item = self._items.get(body["item_id"])
            if item is None:
                return HTTPStatus.UNPROCESSABLE_ENTITY, {
                    "error": "invalid_order",
                    "fields": {"item_id": "no such item"},
                }
            # Stock is checked but not reserved: orders stay independent of each other, so
            # the suite can run in any order, on any number of workers, as often as needed.
            if item["stock"] < body["quantity"]:
                return HTTPStatus.CONFLICT, {"error": "out_of_stock", "item_id": item["id"]}
            order = {
                "id": self._next_order_id,
                "item_id": item["id"],
                "quantity": body["quantity"],
                "customer": body["customer"],
                "total_cents": item["price_cents"] * body["quantity"],
                "status": "created",
            }
            self._orders[order["id"]] = order
            self._next_order_id += 1
            return HTTPStatus.CREATED, dict(order)


def validate_order(body: JsonObject) -> dict[str, str]:
    """Field errors of an order body, by field name (empty if the body is valid)."""
    errors: dict[str, str] = {}
    # bool is an int subclass; true is not a quantity or an id.
    item_id = body.get("item_id")
    if not isinstance(item_id, int) or isinstance(item_id, bool):
        errors["item_id"] = "required, an integer"
    quantity = body.get("quantity")
    if not isinstance(quantity, int) or isinstance(quantity, bool):
        errors["quantity"] = "required, an integer"
    elif not 1 <= quantity <= MAX_QUANTITY:
        errors["quantity"] = f"must be between 1 and {MAX_QUANTITY}"
    customer = body.get("customer")
    if not isinstance(customer, str) or "@" not in customer:
        errors["customer"] = "required, an e-mail address"
    unknown = sorted(set(body) - {"item_id", "quantity", "customer"})
    if unknown:
        errors["_unknown"] = "unexpected fields: " + ", ".join(unknown)
    return errors


def _parse_id(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() else None


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        if path == "/_stats":
            # Outside the limit: the suite reads it to prove that nothing was rejected.
            self._send(HTTPStatus.OK, self.server.api.stats())
            return
        if not self._admitted():
            return
        api = self.server.api
        parts = path.strip("/").split("/")
        if path == "/health":
            self._send(HTTPStatus.OK, {"status": "ok"})
        elif path == "/items":
            category = parse_qs(url.query).get("category", [None])[0]
            self._send(HTTPStatus.OK, {"items": api.list_items(category)})
        elif len(parts) == 2 and parts[0] in ("items", "orders"):
            number = _parse_id(parts[1])
            getter = api.get_item if parts[0] == "items" else api.get_order
            found = None if number is None else getter(number)
            if found is None:
                self._not_found(f"no {parts[0][:-1]} {parts[1]!r}")
            else:
                self._send(HTTPStatus.OK, found)
        else:
            self._not_found(f"no resource at {path}")

    def do_POST(self) -> None:
        # Read the body whatever the answer: closing on unread data would reset the connection.
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self._admitted():
            return
        if urlsplit(self.path).path.rstrip("/") != "/orders":
            self._not_found(f"cannot POST to {self.path}")
            return
        try:
            body = json.loads(raw or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = None
        if not isinstance(body, dict):
            self._send(
                HTTPStatus.BAD_REQUEST,
                {"error": "bad_request", "message": "the body must be a JSON object"},
            )
            return
        status, payload = self.server.api.create_order(body)
        self._send(status, payload)

    def _admitted(self) -> bool:
        retry_after = self.server.api.admit()
        if retry_after is None:
            return True
        self._send(
            HTTPStatus.TOO_MANY_REQUESTS,
            {
                "error": "rate_limited",
                "message": f"rate limit exceeded: {self.server.api.limit_text}",
                "retry_after": retry_after,
            },
            {"Retry-After": str(retry_after)},
        )
        return False

    def _not_found(self, message: str) -> None:
        self._send(HTTPStatus.NOT_FOUND, {"error": "not_found", "message": message})

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
    daemon_threads = True  # a hung client must not keep the test process alive

    def __init__(self, address: tuple[str, int], api: ShopApi) -> None:
        super().__init__(address, _Handler)
        self.api = api


class ApiServer:
    """A running API: its base ``url``, its ``stats()``, and ``stop()``."""

    def __init__(self, limit: str, port: int = 0) -> None:
        self.api = ShopApi(limit)
        self._server = _Server(("127.0.0.1", port), self.api)
        host, bound_port = self._server.server_address[:2]
        self.url = f"http://{host!s}:{bound_port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="rate-limited-api", daemon=True
        )
        self._thread.start()

    @property
    def limit(self) -> str:
        return self.api.limit_text

    def stats(self) -> JsonObject:
        """``{"requests": n, "rejected": m}``: every rate-limited request, and the 429s."""
        return self.api.stats()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_server(limit: str | None = None, port: int = 0) -> ApiServer:
    """Serve the API on 127.0.0.1 (a free port by default) from a daemon thread.

    ``limit`` is a ``limits`` string; default: ``$RATE_LIMITED_API_LIMIT``, else
    ``DEFAULT_LIMIT``.
    """
    return ApiServer(limit or os.environ.get(LIMIT_ENV) or DEFAULT_LIMIT, port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--limit", default=None, help=f"default: ${LIMIT_ENV} or {DEFAULT_LIMIT}")
    args = parser.parse_args()
    server = start_server(args.limit, args.port)
    print(f"serving on {server.url} (limit {server.limit}); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        print(f"stopped: {server.stats()}")


if __name__ == "__main__":
    main()
