"""The catalog: health, listing and fetching items. Each test makes exactly one API call."""

from __future__ import annotations

import pytest
from conftest import ApiClient
from rate_limited_api import ITEMS

ITEM_FIELDS = {"id", "name", "category", "price_cents", "stock"}


def test_health(api: ApiClient) -> None:
    status, body = api.get("/health")
    assert status == 200
    assert body == {"status": "ok"}


def test_list_items(api: ApiClient) -> None:
    status, body = api.get("/items")
    assert status == 200
    items = body["items"]
    assert [item["id"] for item in items] == [item["id"] for item in ITEMS]
    assert all(set(item) == ITEM_FIELDS for item in items)
    assert all(item["price_cents"] > 0 for item in items)


@pytest.mark.parametrize(("category", "expected"), [("coffee", [1, 2]), ("tea", [3, 4])])
def test_list_items_by_category(api: ApiClient, category: str, expected: list[int]) -> None:
    status, body = api.get(f"/items?category={category}")
    assert status == 200
    assert [item["id"] for item in body["items"]] == expected
    assert {item["category"] for item in body["items"]} == {category}


@pytest.mark.parametrize("expected", ITEMS, ids=lambda item: f"item{item['id']}")
def test_get_item(api: ApiClient, expected: dict[str, object]) -> None:
    status, body = api.get(f"/items/{expected['id']}")
    assert status == 200
    assert body == expected


@pytest.mark.parametrize("item_id", ["999", "abc"])
def test_unknown_item_is_404(api: ApiClient, item_id: str) -> None:
    status, body = api.get(f"/items/{item_id}")
    assert status == 404
    assert body["error"] == "not_found"
