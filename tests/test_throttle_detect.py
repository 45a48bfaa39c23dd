"""Recognising a throttled test from its exception, and reading the server's wait."""

from __future__ import annotations

import email.message
import urllib.error
from email.utils import formatdate
from typing import Any

import pytest

from pytest_ratebatch.throttle.detect import Throttled, find_throttle
from pytest_ratebatch.throttle.headers import remaining, wait_seconds

NOW = 1_800_000_000.0  # a fixed wall clock for the tests, on a whole second


class CaseInsensitiveHeaders(dict[str, str]):
    """Like requests' and httpx's headers: ``get`` ignores case."""

    def get(self, key: str, default: Any = None) -> Any:
        for name, value in self.items():
            if name.lower() == key.lower():
                return value
        return default


class Response:
    def __init__(self, status_code: int, headers: dict[str, str] | None = None) -> None:
        self.status_code = status_code
        self.headers = CaseInsensitiveHeaders(headers or {})


class RequestsHTTPError(Exception):
    """requests.HTTPError / httpx.HTTPStatusError: the response on ``.response``."""

    def __init__(self, response: Response) -> None:
        super().__init__(f"{response.status_code} error")
        self.response = response


class SDKError(Exception):
    """openai / anthropic style: ``.status_code`` and ``.response``."""

    def __init__(self, status_code: int, headers: dict[str, str]) -> None:
        super().__init__("rate limited")
        self.status_code = status_code
        self.response = Response(status_code, headers)


class ClientResponseError(Exception):
    """aiohttp: ``.status`` and ``.headers``."""

    def __init__(self, status: int, headers: dict[str, str]) -> None:
        super().__init__("client error")
        self.status = status
        self.headers = CaseInsensitiveHeaders(headers)


class ClientError(Exception):
    """botocore: a parsed response dict."""

    def __init__(self, code: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(code)
        self.response = {
            "Error": {"Code": code, "Message": "slow down"},
            "ResponseMetadata": {"HTTPStatusCode": 400, "HTTPHeaders": headers or {}},
        }


def google_error(name: str, code: int = 429) -> BaseException:
    kind = type(name, (Exception,), {"__module__": "google.api_core.exceptions"})
    error: BaseException = kind("quota exceeded")
    error.code = code  # type: ignore[attr-defined]
    error.response = None  # type: ignore[attr-defined]
    return error


def urllib_error(code: int, headers: dict[str, str]) -> urllib.error.HTTPError:
    message = email.message.Message()
    for name, value in headers.items():
        message[name] = value
    return urllib.error.HTTPError("http://127.0.0.1/x", code, "status", message, None)


def chained(outer: BaseException, inner: BaseException, cause: bool = True) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as error:
            if cause:
                raise outer from error
            raise outer  # noqa: B904 (the implicit __context__ is the point)
    except BaseException as raised:
        return raised


@pytest.mark.parametrize(
    ("error", "status", "wait"),
    [
        (RequestsHTTPError(Response(429, {"Retry-After": "3"})), 429, 3.0),
        (RequestsHTTPError(Response(503, {"retry-after": "7"})), 503, 7.0),
        (SDKError(429, {"retry-after": "1.5"}), 429, 1.5),
        (ClientResponseError(429, {"RateLimit-Reset": "4"}), 429, 4.0),
        (urllib_error(429, {"Retry-After": "2"}), 429, 2.0),
        (urllib_error(429, {}), 429, None),
        (ClientError("ThrottlingException", {"retry-after": "5"}), 400, 5.0),
        (ClientError("SlowDown"), 400, None),
        (google_error("TooManyRequests"), 429, None),
        (google_error("ResourceExhausted"), 429, None),
        (Throttled(retry_after=9), None, 9.0),
        (Throttled(), None, None),
    ],
)
def test_each_client_shape_is_recognised(
    error: BaseException, status: int | None, wait: float | None
) -> None:
    throttle = find_throttle(error, now_wall=NOW)
    assert throttle is not None
    assert (throttle.status, throttle.wait) == (status, wait)


@pytest.mark.parametrize(
    "error",
    [
        RequestsHTTPError(Response(500)),
        RequestsHTTPError(Response(503)),  # 503 without Retry-After: an outage, not a throttle
        RequestsHTTPError(Response(404, {"Retry-After": "1"})),
        urllib_error(403, {}),
        ClientError("AccessDenied"),
        AssertionError("429 in a message is not a status"),
        SystemExit(2),
        google_error("NotFound", 404),
    ],
)
def test_other_failures_are_not_throttles(error: BaseException) -> None:
    assert find_throttle(error, now_wall=NOW) is None


class Group(Exception):
    """An exception group (``ExceptionGroup``, or the ``exceptiongroup`` backport)."""

    def __init__(self, exceptions: list[BaseException]) -> None:
        super().__init__("many")
        self.exceptions = tuple(exceptions)


def test_the_chain_is_searched_through_cause_context_and_groups() -> None:
    throttled = RequestsHTTPError(Response(429, {"Retry-After": "2"}))
    assert find_throttle(chained(RuntimeError("wrapped"), throttled)) is not None
    assert find_throttle(chained(KeyError("during handling"), throttled, cause=False)) is not None
    group = Group([ValueError("x"), throttled])
    found = find_throttle(chained(RuntimeError("outer"), group), now_wall=NOW)
    assert found is not None
    assert found.wait == 2.0


def test_a_cyclic_chain_ends() -> None:
    first, second = RuntimeError("a"), RuntimeError("b")
    first.__context__ = second
    second.__context__ = first
    assert find_throttle(first) is None


def test_user_types_count() -> None:
    class QuotaError(Exception):
        pass

    assert find_throttle(QuotaError("quota")) is None
    found = find_throttle(chained(RuntimeError("x"), QuotaError("quota")), extra=(QuotaError,))
    assert found is not None
    assert "QuotaError" in found.source


class Exploding(Exception):
    @property
    def response(self) -> Any:
        raise RuntimeError("no response here")


def test_a_foreign_property_that_raises_is_not_a_crash() -> None:
    assert find_throttle(Exploding("x")) is None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "120"}, (120.0, "Retry-After")),
        ({"Retry-After": formatdate(NOW + 30, usegmt=True)}, (30.0, "Retry-After")),
        ({"Retry-After": formatdate(NOW - 30, usegmt=True)}, (0.0, "Retry-After")),
        ({"RateLimit": '"default";r=0;t=12'}, (12.0, "RateLimit")),
        ({"RateLimit": "limit=10, remaining=0, reset=8"}, (8.0, "RateLimit")),
        ({"RateLimit-Reset": "6"}, (6.0, "RateLimit-Reset")),
        ({"X-RateLimit-Reset": str(int(NOW) + 45)}, (45.0, "X-RateLimit-Reset")),
        ({"X-RateLimit-Reset": "20"}, (20.0, "X-RateLimit-Reset")),
        # Precedence: Retry-After, then RateLimit, RateLimit-Reset, X-RateLimit-Reset.
        (
            {"X-RateLimit-Reset": "20", "RateLimit-Reset": "6", "Retry-After": "1"},
            (1.0, "Retry-After"),
        ),
        ({"X-RateLimit-Reset": "20", "RateLimit-Reset": "6"}, (6.0, "RateLimit-Reset")),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "-5"}, None),
        ({}, None),
    ],
)
def test_waits_from_headers(headers: dict[str, str], expected: tuple[float, str] | None) -> None:
    found = wait_seconds(CaseInsensitiveHeaders(headers), NOW)
    if expected is None:
        assert found is None
    else:
        # Whole-second headers on a whole-second clock: the wait is exact, not about right.
        assert found == expected


def test_headers_of_every_container_are_read() -> None:
    message = email.message.Message()
    message["Retry-After"] = "4"
    for headers in (message, {"retry-after": "4"}, [("Retry-After", "4")]):
        assert wait_seconds(headers, NOW) == (4.0, "Retry-After")


@pytest.mark.parametrize(
    ("headers", "left", "reset"),
    [
        ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(NOW) + 2)}, 0, 2.0),
        ({"RateLimit-Remaining": "5", "RateLimit-Reset": "3"}, 5, 3.0),
        ({"RateLimit": '"default";r=1;t=9'}, 1, 9.0),
        ({"RateLimit": "limit=10, remaining=0, reset=8"}, 0, 8.0),
    ],
)
def test_published_budgets(headers: dict[str, str], left: int, reset: float) -> None:
    budget = remaining(CaseInsensitiveHeaders(headers), NOW)
    assert budget is not None
    assert budget.remaining == left
    assert budget.reset == reset  # exact: whole seconds on a whole-second clock
    assert remaining(CaseInsensitiveHeaders({}), NOW) is None
