"""Import this package's modules from their bytecode, past pytest's assertion rewriting.

pytest rewrites the asserts of every module of a package that registers a pytest11 plugin,
parsing its source anew on every run when bytecode is not written (``PYTHONDONTWRITEBYTECODE``,
common in containers). This package's asserts need no rewriting, and once a policy is set it
imports a dozen modules: ``install`` puts a finder before pytest's that answers only for this
package's submodules, with Python's own loader (which reads their ``.pyc``). A finder costs
every later import a little, so an unconfigured session does without it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec, PathFinder
from types import ModuleType

__all__ = ["install"]

PACKAGE_PREFIX = __name__.partition(".")[0] + "."


class PlainImporter:
    """A meta path finder for this package's submodules only."""

    @staticmethod
    def find_spec(
        fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if not fullname.startswith(PACKAGE_PREFIX):
            return None
        return PathFinder.find_spec(fullname, path, target)


def install() -> None:
    if PlainImporter not in sys.meta_path:
        sys.meta_path.insert(0, PlainImporter)
