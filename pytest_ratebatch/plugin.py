"""The pytest entry point: options, the marker, the fixture, and nothing more until asked.

Every pytest run imports this module, so it stays small: with no option of this plugin set,
``pytest_configure`` finds none and returns, and only the option table is loaded besides.
With a policy (or a report) it hands over to ``session``, which wires what the process needs.

PYTEST_DONT_REWRITE
"""

from __future__ import annotations

import sys
from importlib.machinery import PathFinder
from importlib.util import module_from_spec
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .fixture import RateBatch
    from .pacing import Pacer

__all__ = ["PACER_KEY", "ratebatch"]

#: The pacer of this process, when a policy is in force.
PACER_KEY: pytest.StashKey[Pacer] = pytest.StashKey()


def import_compiled(name: str) -> ModuleType:
    """A submodule of this package, loaded from its bytecode by Python's own loader.

    pytest would rewrite it as part of a plugin's package: parse its source anew on every
    run where bytecode is not written (``PYTHONDONTWRITEBYTECODE``), a cost for every session.
    """
    fullname = f"{__package__}.{name}"
    module = sys.modules.get(fullname)
    if module is None:
        spec = PathFinder.find_spec(fullname, sys.modules[__package__].__path__)
        assert spec is not None
        assert spec.loader is not None
        module = sys.modules[fullname] = module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def pytest_addoption(parser: pytest.Parser) -> None:
    import_compiled("options").add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "ratebatch(cost=1): tokens this test takes at its start; cost=0 exempts it from the "
        "rate and from batches (pytest-ratebatch).",
    )
    if config.option.help or config.option.version:
        return
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
