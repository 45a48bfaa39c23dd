"""The ``ratebatch`` fixture's object: tokens taken inside a running test.

Kept apart from the pacer so that a test asking for the fixture in a session without a
policy imports nothing more.
"""

from __future__ import annotations

from typing import Any, NoReturn, Protocol

__all__ = ["RateBatch", "TokenSource"]


class TokenSource(Protocol):
    def acquire(self, nodeid: str, cost: int) -> None: ...

    async def acquire_async(self, nodeid: str, cost: int) -> None: ...

    def observe(self, nodeid: str, response: Any) -> None: ...


class RateBatch:
    """What the ``ratebatch`` fixture gives a test: tokens from the session's own bucket."""

    def __init__(self, pacer: TokenSource | None, nodeid: str) -> None:
        self._pacer = pacer
        self._nodeid = nodeid

    @property
    def active(self) -> bool:
        """Whether a policy is in force (else ``acquire`` returns at once)."""
        return self._pacer is not None

    def acquire(self, cost: int = 1) -> None:
        """Take ``cost`` tokens from the bucket the session's tests start from, waiting as
        long as the rate requires; a cost above the burst is taken a burst at a time.

        If the session has stopped (max failures, total timeout, store lost) the test is
        skipped as cancelled instead, like the tests that did not start.
        """
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
            raise ValueError(f"cost must be a whole number >= 0, not {cost!r}")
        if self._pacer is not None and cost:
            self._pacer.acquire(self._nodeid, cost)

    async def acquire_async(self, cost: int = 1) -> None:
        """``acquire`` for async tests: ``await ratebatch.acquire_async()`` waits with
        ``asyncio.sleep``, so the event loop (other tasks of the test) keeps running."""
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
            raise ValueError(f"cost must be a whole number >= 0, not {cost!r}")
        if self._pacer is not None and cost:
            await self._pacer.acquire_async(self._nodeid, cost)

    def observe(self, response: Any) -> Any:
        """Read a response's status and rate-limit headers (requests, httpx, urllib,
        aiohttp, or a botocore response dict), and return it.

        A 429 (or 503 with Retry-After) pauses everyone sharing the bucket for the server's
        wait and lowers the rate, as a throttled test does; a published budget at zero
        (``RateLimit`` / ``RateLimit-Remaining`` / ``X-RateLimit-Remaining``) pauses until
        its reset, so the next request is not refused. Handy in a client hook::

            session.hooks["response"].append(lambda r, *a, **k: ratebatch.observe(r))
        """
        if self._pacer is not None:
            self._pacer.observe(self._nodeid, response)
        return response

    def throttled(self, retry_after: float | None = None) -> NoReturn:
        """Say the server throttled this test, for code that detects it itself: raises an
        exception that makes the test a throttled one (paused for ``retry_after`` seconds,
        or a backoff, and run again)."""
        from ..throttle.detect import Throttled

        raise Throttled(retry_after)
