"""Orders: create, validate, read. Each test makes exactly one API call and depends on no
other test (they may run in any order, on different xdist workers): reading an order uses
one of the orders the server is seeded with."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import ApiClient
from rate_limited_api import ITEMS, SEED_ORDERS

PRICES = {item["id"]: item["price_cents"] for item in ITEMS}


@pytest.mark.parametrize(
    ("item_id", "quantity", "customer"),
    [
        (1, 1, "grace@example.com"),
        (2, 3, "edsger@example.com"),
        (3, 10, "barbara@example.com"),
        (4, 2, "ken@example.com"),
        (5, 1, "margaret@example.com"),
    ],
    ids=["espresso", "filter-coffee", "green-tea-x10", "earl-grey", "grinder"],
)
def test_create_order(api: ApiClient, item_id: int, quantity: int, customer: str) -> None:
    status, order = api.post(
        "/orders", {"item_id": item_id, "quantity": quantity, "customer": customer}
    )
    assert status == 201
    assert order["id"] > max(seed["id"] for seed in SEED_ORDERS)
    assert order["item_id"] == item_id
    assert order["quantity"] == quantity
    assert order["customer"] == customer
    assert order["total_cents"] == PRICES[item_id] * quantity
    assert order["status"] == "created"


@pytest.mark.parametrize(
    ("payload", "bad_field"),
    [
        ({"item_id": 1, "quantity": 1}, "customer"),
        ({"item_id": 1, "quantity": 0, "customer": "ada@example.com"}, "quantity"),
        ({"item_id": 1, "quantity": "two", "customer": "ada@example.com"}, "quantity"),
        ({"item_id": 999, "quantity": 1, "customer": "ada@example.com"}, "item_id"),
    ],
    ids=["missing-customer", "zero-quantity", "text-quantity", "unknown-item"],
)
def test_invalid_order_is_422(api: ApiClient, payload: dict[str, Any], bad_field: str) -> None:
    status, body = api.post("/orders", payload)
    assert status == 422
    assert body["error"] == "invalid_order"
    assert list(body["fields"]) == [bad_field]


def test_order_out_of_stock_is_409(api: ApiClient) -> None:
    sold_out = next(item for item in ITEMS if item["stock"] == 0)
    status, body = api.post(
        "/orders", {"item_id": sold_out["id"], "quantity": 1, "customer": "ada@example.com"}
    )
    assert status == 409
    assert body == {"error": "out_of_stock", "item_id": sold_out["id"]}


@pytest.mark.parametrize("expected", SEED_ORDERS, ids=lambda order: f"order{order['id']}")
def test_get_order(api: ApiClient, expected: dict[str, Any]) -> None:
    status, order = api.get(f"/orders/{expected['id']}")
    assert status == 200
    assert order == expected


def test_unknown_order_is_404(api: ApiClient) -> None:
    status, body = api.get("/orders/424242")
    assert status == 404
    assert body["error"] == "not_found"
