"""pytest-ratebatch: a global token-bucket rate, batches and stop conditions for pytest.

pytest imports this package on every run, so it holds nothing: the public API lives in
``pytest_ratebatch.api`` and is imported from there on first use.

PYTEST_DONT_REWRITE
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    api = import_module(f"{__name__}.api")
    if name != "__all__" and name not in api.__all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(api, name)
    globals()[name] = value
    return value
