"""Whether an exception says the server throttled the test, and how long it asks to wait.

Recognised by duck typing, without importing any client library, in the exception and every
exception in its ``__cause__`` / ``__context__`` chain (and in exception groups):

- an HTTP status 429, or 503 with a ``Retry-After`` header, found as ``.response.status_code``
  (requests, httpx), ``.status_code`` with ``.response`` (openai, anthropic and the SDKs built
  the same way), ``.code`` with ``.headers`` (``urllib.error.HTTPError``) or ``.status``
  (aiohttp's ``ClientResponseError``);
- botocore's ``ClientError`` with a throttling error code (``Throttling``, ``SlowDown``, ...);
- google-api-core's ``TooManyRequests`` and ``ResourceExhausted``;
- the user's own exception types (``ratebatch_throttle_exceptions``) and ``Throttled``, which
  the ``ratebatch`` fixture's ``throttled()`` raises.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from .headers import header, wait_seconds

__all__ = ["THROTTLING_ERROR_CODES", "Throttle", "Throttled", "find_throttle", "response_status"]

#: botocore's throttling error codes (its standard retry mode's list).
THROTTLING_ERROR_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
    }
)
_GOOGLE_THROTTLES = frozenset({"TooManyRequests", "ResourceExhausted"})
#: How many exceptions of a chain are looked at, at most.
CHAIN_LIMIT = 32


class Throttled(Exception):
    """Raised by ``ratebatch.throttled()``: the test saw throttling in its own way."""

    def __init__(self, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        wait = "" if retry_after is None else f", retry after {retry_after:g}s"
        super().__init__(f"throttled by the server{wait}")


class Throttle:
    """A throttled test: the HTTP status (if known), the wait the server asked for (seconds,
    if it said) and which header said so, and what was recognised."""

    __slots__ = ("source", "status", "wait", "wait_source")

    def __init__(
        self, status: int | None, wait: float | None, wait_source: str, source: str
    ) -> None:
        self.status = status
        self.wait = wait
        self.wait_source = wait_source
        self.source = source

    def describe(self) -> str:
        what = f"HTTP {self.status}" if self.status else "throttled"
        return f"{what} ({self.source})"

    def __repr__(self) -> str:
        return f"Throttle({self.status!r}, {self.wait!r}, {self.wait_source!r}, {self.source!r})"


def _get(obj: object, name: str) -> Any:
    try:
        return getattr(obj, name, None)
    except Exception:  # a property of a foreign object may raise anything
        return None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def response_status(response: Any) -> tuple[int | None, Any]:
    """The status and headers of a response object of any common client, or a dict."""
    if isinstance(response, dict):
        metadata = response.get("ResponseMetadata") or {}
        return _int(metadata.get("HTTPStatusCode")), metadata.get("HTTPHeaders")
    for name in ("status_code", "status", "code"):
        status = _int(_get(response, name))
        if status is not None:
            break
    else:
        getcode = _get(response, "getcode")
        status = _int(getcode()) if callable(getcode) else None
    headers = _get(response, "headers")
    if headers is None:
        headers = _get(response, "hdrs")
    return status, headers


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    pending = [error]
    while pending and len(seen) < CHAIN_LIMIT:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        nested = _get(current, "exceptions")  # an exception group
        if isinstance(nested, (list, tuple)):
            pending.extend(e for e in nested if isinstance(e, BaseException))
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                pending.append(linked)


def _name(error: BaseException) -> str:
    kind = type(error)
    return f"{kind.__module__}.{kind.__qualname__}".removeprefix("builtins.")


def _recognise(
    error: BaseException, extra: tuple[type[BaseException], ...], now_wall: float
) -> Throttle | None:
    if isinstance(error, Throttled):
        return Throttle(None, error.retry_after, "throttled()", "ratebatch.throttled()")
    response = _get(error, "response")
    if isinstance(response, dict) and "Error" in response:  # botocore's ClientError
        code = str((response.get("Error") or {}).get("Code", ""))
        if code in THROTTLING_ERROR_CODES:
            status, headers = response_status(response)
            return _throttle(status, headers, now_wall, f"{_name(error)} {code}")
    status = None
    headers = None
    if response is not None and not isinstance(response, dict):
        status, headers = response_status(response)
    if status is None:
        status, own_headers = response_status(error)
        headers = headers if headers is not None else own_headers
    elif headers is None:
        headers = _get(error, "headers")
    if status == 429 or (status == 503 and header(headers, "Retry-After") is not None):
        return _throttle(status, headers, now_wall, _name(error))
    names = {kind.__name__ for kind in type(error).__mro__}
    if names & _GOOGLE_THROTTLES and type(error).__module__.startswith("google."):
        return _throttle(429, headers, now_wall, _name(error))
    if extra and isinstance(error, extra):
        return _throttle(status, headers, now_wall, _name(error))
    return None


def _throttle(status: int | None, headers: Any, now_wall: float, source: str) -> Throttle:
    wait = wait_seconds(headers, now_wall)
    if wait is None:
        return Throttle(status, None, "", source)
    return Throttle(status, wait[0], wait[1], source)


def find_throttle(
    error: BaseException,
    extra: tuple[type[BaseException], ...] = (),
    now_wall: float | None = None,
) -> Throttle | None:
    """The throttle that ``error`` or an exception of its chain reports, or ``None``."""
    now = time.time() if now_wall is None else now_wall
    for current in _chain(error):
        found = _recognise(current, extra, now)
        if found is not None:
            return found
    return None
