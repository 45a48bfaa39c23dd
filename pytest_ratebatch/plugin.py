"""The pytest11 entry point, kept tiny: pytest parses its source on every run.

pytest rewrites the modules of a plugin's package, and where bytecode is not written
(``PYTHONDONTWRITEBYTECODE``) it parses them anew each time. So this module only loads
``hooks`` from its bytecode, with Python's own loader, and exposes what pytest looks for.

PYTEST_DONT_REWRITE
"""

import sys
from importlib.machinery import PathFinder
from importlib.util import module_from_spec
from types import ModuleType


def import_compiled(name: str) -> ModuleType:
    """A submodule of this package, loaded from its bytecode by Python's own loader."""
    fullname = f"{__package__}.{name}"
    module = sys.modules.get(fullname)
    if module is None:
        spec = PathFinder.find_spec(fullname, sys.modules[__package__].__path__)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot find {fullname}", name=fullname)
        module = sys.modules[fullname] = module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


_hooks = import_compiled("hooks")
pytest_addoption = _hooks.pytest_addoption
pytest_configure = _hooks.pytest_configure
ratebatch = _hooks.ratebatch
