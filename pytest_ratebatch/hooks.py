"""The plugin's hooks: options, the marker, the fixture, and nothing more until asked.

Every pytest run loads this module (from bytecode, through ``pytest_ratebatch_entry``), so
it stays small: with no option of this plugin set, ``pytest_configure`` finds none and
returns, and only the option table is loaded besides. With a policy (or a report) it hands
over to ``session``, which wires what the process needs.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .fixture import RateBatch
    from .pacing import Pacer

__all__ = ["PACER_KEY", "pytest_addoption", "pytest_configure", "ratebatch", "register_hooks"]

#: The pacer of this process, when a policy is in force.
PACER_KEY: pytest.StashKey[Pacer] = pytest.StashKey()


def pytest_addoption(parser: pytest.Parser) -> None:
    from . import import_compiled  # in the function: hooks may be imported first

    import_compiled("options").add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "ratebatch(cost=1): tokens this test takes at its start; cost=0 exempts it from the "
        "rate, from batches and from the concurrency cap (pytest-ratebatch).",
    )
    if config.option.help or config.option.version:
        return
    from . import import_compiled

    raw = import_compiled("options").read_raw_options(config)
    if raw:
        import_compiled("bytecode").install()  # the rest of the package, from bytecode too
        from .session import configure

        configure(config, raw, PACER_KEY)


@pytest.fixture
def ratebatch(request: pytest.FixtureRequest) -> RateBatch:
    """Take tokens inside a test, from the same bucket as the session (``acquire(cost=1)``)."""
    from .fixture import RateBatch

    return RateBatch(request.config.stash.get(PACER_KEY, None), request.node.nodeid)


def register_hooks(manager: pytest.PytestPluginManager, name: str, *parts: object) -> None:
    """Register the ``pytest_*`` methods of ``parts`` with pytest, on as few plugins as can be.

    pytest examines every attribute of every plugin it registers, for hooks and for fixtures:
    about a million instructions per object (it inherits some 25 attributes from ``object``)
    and some 35,000 per further attribute. So the parts, with their state and helpers, are
    not registered themselves: a module object holding only their bound hook methods is
    (``name``; a second one, ``name-2``, if two parts implement the same hook).
    """
    holders: list[ModuleType] = []
    for part in parts:
        for attribute in dir(type(part)):
            if not attribute.startswith("pytest_"):
                continue
            holder = next((h for h in holders if attribute not in h.__dict__), None)
            if holder is None:
                holder = ModuleType(name if not holders else f"{name}-{len(holders) + 1}")
                holders.append(holder)
            setattr(holder, attribute, getattr(part, attribute))
    for holder in holders:
        manager.register(holder, holder.__name__)
