"""The pytest entry point: options, the marker, the fixture, and nothing else until asked.

Every pytest run imports this module, so it stays small: with no option of this plugin set,
``pytest_configure`` reads the options, finds none and returns, and no other module of the
package is imported. With a policy (or a report) it hands over to ``session``, which wires
the parts this process needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from .options import add_options, read_raw_options

if TYPE_CHECKING:
    from .fixture import RateBatch

__all__ = ["PACER_KEY", "ratebatch"]

#: The pacer of this process, when a policy is in force.
PACER_KEY = pytest.StashKey["Pacer"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "ratebatch(cost=1): tokens this test takes at its start; cost=0 exempts it from the "
        "rate and from batches (pytest-ratebatch).",
    )
    if config.option.help or config.option.version:
        return
    raw = read_raw_options(config)
    if raw:
        from .session import configure

        configure(config, raw, PACER_KEY)


@pytest.fixture
def ratebatch(request: pytest.FixtureRequest) -> RateBatch:
    """Take tokens inside a test, from the same bucket as the session (``acquire(cost=1)``)."""
    from .fixture import RateBatch

    return RateBatch(request.config.stash.get(PACER_KEY, None), request.node.nodeid)
