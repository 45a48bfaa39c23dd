"""The ``ratebatch`` fixture's object: tokens taken inside a running test.

Kept apart from the pacer so that a test asking for the fixture in a session without a
policy imports nothing more.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["RateBatch", "TokenSource"]


class TokenSource(Protocol):
    def acquire(self, nodeid: str, cost: int) -> None: ...


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
