"""How long to pause after a throttle that says nothing of its own: a doubling backoff.

Apart from ``headers`` (which loads the standard library's e-mail package to read HTTP
dates) so that a session loads it only at its first throttle.
"""

from __future__ import annotations

import random

__all__ = ["BACKOFF_CAP", "BACKOFF_FIRST", "backoff"]

#: Without a header, the first pause, doubled for each further attempt.
BACKOFF_FIRST = 0.5
#: ... up to this, in seconds.
BACKOFF_CAP = 60.0


def backoff(attempt: int) -> float:
    """Seconds to pause without a header: 0.5 s, 1 s, 2 s, ... up to a minute, +-10% jitter."""
    base: float = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** max(0, attempt - 1))
    return base * random.uniform(0.9, 1.1)
