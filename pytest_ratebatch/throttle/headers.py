"""How long a server asks to wait, and how much budget it says is left, from its headers.

Precedence for the wait, the most explicit first: ``Retry-After`` (seconds, or an HTTP date),
then the IETF draft ``RateLimit`` field (``t=`` or, in older drafts, ``reset=``), then
``RateLimit-Reset`` (seconds), then ``X-RateLimit-Reset`` (epoch seconds, as GitHub sends it;
a small number is taken as seconds). Header containers differ between clients (requests,
httpx, urllib, aiohttp, botocore's dict of lower-case names); ``header`` reads any of them.
"""

from __future__ import annotations

import math
import re
from email.utils import parsedate_to_datetime
from typing import Any

__all__ = ["Budget", "header", "remaining", "wait_seconds"]

#: An ``X-RateLimit-Reset`` above this is an epoch time (2001-09-09), below it seconds.
EPOCH_THRESHOLD = 1_000_000_000


def header(headers: Any, name: str) -> str | None:
    """The value of header ``name`` (case-insensitive), or ``None``."""
    if headers is None:
        return None
    get = getattr(headers, "get", None)
    if get is not None:
        for candidate in (name, name.lower(), name.title()):
            try:
                value = get(candidate)
            except Exception:  # a header container may refuse odd keys
                value = None
            if value is not None:
                return str(value)
    try:
        items = headers.items() if hasattr(headers, "items") else headers
        wanted = name.lower()
        for key, value in items:
            if str(key).lower() == wanted:
                return str(value)
    except (TypeError, ValueError, AttributeError):
        pass
    return None


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text.strip().split(",")[0].strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _retry_after(text: str | None, now_wall: float) -> float | None:
    """``Retry-After``: delta-seconds, or an HTTP date (in the past: 0)."""
    if text is None:
        return None
    seconds = _number(text)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now_wall)


_PARAMETER = re.compile(r"(?:^|[;,\s])([a-z]+)\s*=\s*\"?([0-9.]+)", re.IGNORECASE)


def _structured(text: str | None) -> dict[str, float]:
    """The numeric parameters of a ``RateLimit`` field: ``"default";r=50;t=30`` (drafts 08
    and later) or ``limit=100, remaining=50, reset=30`` (draft 07)."""
    if text is None:
        return {}
    return {key.lower(): float(value) for key, value in _PARAMETER.findall(text)}


def _reset_epoch(text: str | None, now_wall: float) -> float | None:
    value = _number(text)
    if value is None:
        return None
    return max(0.0, value - now_wall) if value > EPOCH_THRESHOLD else value


def wait_seconds(headers: Any, now_wall: float) -> tuple[float, str] | None:
    """How long the server asks to wait, and which header said so; ``None`` if none does."""
    value = _retry_after(header(headers, "Retry-After"), now_wall)
    if value is not None:
        return value, "Retry-After"
    fields = _structured(header(headers, "RateLimit"))
    for key in ("t", "reset"):
        if key in fields:
            return fields[key], "RateLimit"
    value = _number(header(headers, "RateLimit-Reset"))
    if value is not None:
        return value, "RateLimit-Reset"
    value = _reset_epoch(header(headers, "X-RateLimit-Reset"), now_wall)
    if value is not None:
        return value, "X-RateLimit-Reset"
    value = _go_duration(header(headers, OPENAI_RESET))
    if value is not None:
        return value, OPENAI_RESET
    return None


#: OpenAI's budget of requests: what is left, and when it is whole again (``1.2s``, ``6m0s``).
OPENAI_REMAINING = "x-ratelimit-remaining-requests"
OPENAI_RESET = "x-ratelimit-reset-requests"
_GO_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?)(ms|us|µs|ns|h|m|s)")
_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def _go_duration(text: str | None) -> float | None:
    """A duration as Go prints it (``1.2s``, ``6m0s``, ``850ms``, ``1h2m3s``), or ``None``."""
    if text is None:
        return None
    text = text.strip()
    parts = _GO_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return _number(text)  # plain seconds
    return sum(float(number) * _GO_UNITS[unit] for number, unit in parts)


class Budget:
    """What a server says is left: ``remaining`` requests until ``reset`` seconds from now."""

    __slots__ = ("remaining", "reset", "source")

    def __init__(self, remaining: int, reset: float | None, source: str) -> None:
        self.remaining = remaining
        self.reset = reset
        self.source = source

    def __repr__(self) -> str:
        return f"Budget({self.remaining}, {self.reset!r}, {self.source!r})"


def remaining(headers: Any, now_wall: float) -> Budget | None:
    """The budget a server publishes (``RateLimit`` / ``RateLimit-Remaining`` /
    ``X-RateLimit-Remaining``, with their reset), or ``None``."""
    fields = _structured(header(headers, "RateLimit"))
    for key in ("r", "remaining"):
        if key in fields:
            reset = fields.get("t", fields.get("reset"))
            return Budget(int(fields[key]), reset, "RateLimit")
    for prefix in ("RateLimit", "X-RateLimit"):
        left = _number(header(headers, f"{prefix}-Remaining"))
        if left is not None:
            wait = wait_seconds(headers, now_wall)
            return Budget(int(left), None if wait is None else wait[0], f"{prefix}-Remaining")
    left = _number(header(headers, OPENAI_REMAINING))
    if left is not None:
        return Budget(int(left), _go_duration(header(headers, OPENAI_RESET)), OPENAI_REMAINING)
    return None
