"""The plugin's hooks: options, the marker, the fixture, and nothing more until asked.

Every pytest run loads this module (from bytecode, through ``pytest_ratebatch_entry``), so
it stays small: with no option of this plugin set, ``pytest_configure`` finds none and
returns, and only the option table is loaded besides. With a policy (or a report) it hands
over to ``session``, which wires what the process needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .fixture import RateBatch
    from .pacing import Pacer

__all__ = ["PACER_KEY", "pytest_addoption", "pytest_configure", "ratebatch"]

#: The pacer of this process, when a policy is in force.
PACER_KEY: pytest.StashKey[Pacer] = pytest.StashKey()


def pytest_addoption(parser: pytest.Parser) -> None:
    from .. import import_compiled  # in the function: hooks may be imported first

    import_compiled("plugin.options").add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "ratebatch(cost=1, priority=0, resources={}, pace_calls=True): tokens this test "
        "takes at its start; cost=0 exempts it from the rate, from batches and from the "
        "concurrency cap; higher priorities start first; resources: amounts of --resources it "
        "holds while it runs; pace_calls=False leaves its HTTP calls out of the call limits "
        "(pytest-ratebatch).",
    )
    if config.option.help or config.option.version:
        return
    from .. import import_compiled

    raw = import_compiled("plugin.options").read_raw_options(config)
    if raw:
        import_compiled("plugin.bytecode").install()  # the rest of the package, from bytecode too
        from .session import configure

        configure(config, raw, PACER_KEY)


@pytest.fixture
def ratebatch(request: pytest.FixtureRequest) -> RateBatch:
    """Take tokens inside a test, from the same bucket as the session (``acquire(cost=1)``)."""
    from .fixture import RateBatch

    return RateBatch(request.config.stash.get(PACER_KEY, None), request.node.nodeid)
