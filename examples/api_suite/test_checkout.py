"""Checkout flows: each test makes several API calls, a different number in each (3 to 6),
as real API suites do. Pacing test starts cannot keep such a suite under the API's limit
without guessing each test's cost; pacing the calls (``call_limits`` in pytest.ini) does."""

from __future__ import annotations

import pytest
from conftest import ApiClient
from rate_limited_api import ITEMS


def _in_stock(api: ApiClient, category: str) -> list[dict[str, object]]:
    status, body = api.get(f"/items?category={category}")
    assert status == 200
    return [item for item in body["items"] if isinstance(item["stock"], int) and item["stock"]]


@pytest.mark.parametrize("category", ["coffee", "tea"])
def test_browse_then_buy(api: ApiClient, category: str) -> None:
    """List a category, look at its first item, order it, read the order back: 4 calls."""
    item = _in_stock(api, category)[0]
    status, detail = api.get(f"/items/{item['id']}")
    assert status == 200
    assert detail == item
    status, order = api.post(
        "/orders", {"item_id": item["id"], "quantity": 1, "customer": "ada@example.com"}
    )
    assert status == 201
    status, read_back = api.get(f"/orders/{order['id']}")
    assert status == 200
    assert read_back == order


def test_basket_of_three(api: ApiClient) -> None:
    """Three orders, one per item of a basket, then a check of the first: 4 calls."""
    basket = [1, 3, 4]
    orders = []
    for item_id in basket:
        status, order = api.post(
            "/orders", {"item_id": item_id, "quantity": 2, "customer": "grace@example.com"}
        )
        assert status == 201
        orders.append(order)
    assert [order["item_id"] for order in orders] == basket
    status, first = api.get(f"/orders/{orders[0]['id']}")
    assert status == 200
    assert first["quantity"] == 2


def test_compare_prices_across_the_catalog(api: ApiClient) -> None:
    """Health check, the whole catalog, then every piece of equipment: 4 calls."""
    status, _ = api.get("/health")
    assert status == 200
    status, body = api.get("/items")
    assert status == 200
    equipment = [item for item in body["items"] if item["category"] == "equipment"]
    prices = []
    for item in equipment:
        status, detail = api.get(f"/items/{item['id']}")
        assert status == 200
        prices.append(detail["price_cents"])
    assert prices == [item["price_cents"] for item in ITEMS if item["category"] == "equipment"]


def test_sold_out_item_then_an_alternative(api: ApiClient) -> None:
    """A sold-out item is refused; the customer picks another piece of equipment: 5 calls."""
    sold_out = next(item for item in ITEMS if item["stock"] == 0)
    status, _ = api.post(
        "/orders", {"item_id": sold_out["id"], "quantity": 1, "customer": "alan@example.com"}
    )
    assert status == 409
    alternatives = _in_stock(api, "equipment")
    assert alternatives
    choice = alternatives[0]
    status, detail = api.get(f"/items/{choice['id']}")
    assert status == 200
    assert detail["stock"] > 0
    status, order = api.post(
        "/orders", {"item_id": choice["id"], "quantity": 1, "customer": "alan@example.com"}
    )
    assert status == 201
    status, read_back = api.get(f"/orders/{order['id']}")
    assert read_back["status"] == "created"


def test_fix_an_invalid_order(api: ApiClient) -> None:
    """An order refused for each bad field, then the corrected one: 3 calls."""
    status, body = api.post("/orders", {"item_id": 2, "quantity": 0, "customer": "ken@example.com"})
    assert status == 422
    assert list(body["fields"]) == ["quantity"]
    status, body = api.post("/orders", {"item_id": 2, "quantity": 1})
    assert status == 422
    assert list(body["fields"]) == ["customer"]
    status, order = api.post(
        "/orders", {"item_id": 2, "quantity": 1, "customer": "ken@example.com"}
    )
    assert status == 201
    assert order["total_cents"] == next(i["price_cents"] for i in ITEMS if i["id"] == 2)
