"""Patch the client libraries for a session, and only those the tests use.

``http.client`` (standard library) is patched at once; ``httpx``, ``httpx2`` and
``aiohttp`` when they are imported: at once if they already are, else right after their
import, by a finder on ``sys.meta_path`` that is removed with the patches. Nothing is
imported that the tests do not import themselves.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from .pacer import CallPacer

__all__ = ["CLIENTS", "install"]

#: The client libraries patched when imported (``http.client`` always is).
CLIENTS = ("httpx", "httpx2", "aiohttp")

Undo = Callable[[], None]


def _patch(pacer: CallPacer, name: str, module: ModuleType) -> Undo:
    if name == "aiohttp":
        from . import aiohttp

        return aiohttp.patch(pacer, module)
    from . import httpx

    return httpx.patch(pacer, module)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Patches a watched library once its module has run."""

    def __init__(self, patch: Callable[[str, ModuleType], None]) -> None:
        self._patch = patch
        self.waiting = set(CLIENTS)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.waiting:
            return None
        self.waiting.discard(fullname)  # also keeps find_spec below from finding us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader: Any = spec.loader
        exec_module = loader.exec_module
        patch = self._patch

        def exec_then_patch(module: ModuleType) -> None:
            exec_module(module)
            patch(fullname, module)

        loader.exec_module = exec_then_patch  # this spec's loader only: a new one per import
        return spec


def install(pacer: CallPacer) -> Undo:
    """Patch every client library for ``pacer``; returns what removes every patch."""
    from . import http_client

    undo: list[Undo] = [http_client.patch(pacer)]

    def patch(name: str, module: ModuleType) -> None:
        undo.append(_patch(pacer, name, module))

    finder = _AfterImport(patch)
    for name in CLIENTS:
        module = sys.modules.get(name)
        if module is not None:
            finder.waiting.discard(name)
            patch(name, module)
    sys.meta_path.insert(0, finder)

    def uninstall() -> None:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)
        while undo:
            undo.pop()()

    return uninstall
