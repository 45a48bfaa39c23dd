"""pytest-ratebatch: a global token-bucket rate, batches and stop conditions for pytest.

pytest imports this package on every run, so it holds nothing: the public API lives in
``pytest_ratebatch.api`` and is imported from there on first use.
"""

from __future__ import annotations

import sys
from importlib import import_module
from importlib.machinery import PathFinder
from importlib.util import module_from_spec
from types import ModuleType

__version__ = "0.1.0"

# Spelled out (and checked against ``api.__all__`` by the tests) so that other names, such as
# a submodule's in ``from . import gcra``, never import the API midway through its own import.
__all__ = [
    "MONOTONIC",
    "UNLIMITED",
    "Admission",
    "BucketStore",
    "Clock",
    "ExecutionPolicy",
    "FileBucketStore",
    "FileLedger",
    "FileSlotPool",
    "Ledger",
    "MemoryBucketStore",
    "MemoryLedger",
    "MemorySlotPool",
    "MonotonicClock",
    "PolicyError",
    "RateLimit",
    "RateLimiter",
    "RedisBucketStore",
    "RedisSlotPool",
    "Slot",
    "SlotPool",
    "StoreError",
    "TaskScheduler",
    "Ticket",
    "WindowLimit",
    "format_duration",
    "parse_duration",
    "parse_windows",
    "worst_excess",
]


def __getattr__(name: str) -> object:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.api"), name)
    globals()[name] = value
    return value


def import_compiled(name: str) -> ModuleType:
    """A submodule (``"plugin.hooks"``), loaded from its bytecode by Python's own loader, past
    pytest's (which would parse its source anew: see ``pytest_ratebatch_entry``), and the
    subpackages on its way the same."""
    fullname = f"{__name__}.{name}"
    module = sys.modules.get(fullname)
    if module is None:
        parent, _, _ = name.rpartition(".")
        path = import_compiled(parent).__path__ if parent else __path__
        spec = PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot find {fullname}", name=fullname)
        module = sys.modules[fullname] = module_from_spec(spec)
        spec.loader.exec_module(module)
    return module
