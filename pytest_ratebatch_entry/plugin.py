"""pytest-ratebatch's pytest11 entry point, outside its package on purpose.

pytest marks every package of a plugin's distribution for assertion rewriting, and a
rewritten module is parsed and compiled from its source on every run where bytecode is not
written (``PYTHONDONTWRITEBYTECODE``, common in containers): some three million instructions
for the two small modules an entry point inside the package would take. This module sits in
a directory without ``__init__.py``, which pytest does not mark, so Python loads it from its
bytecode; it loads the package and its ``plugin.hooks`` the same way, past pytest's import hook.
(Its few names are all pytest sees of it: pytest examines each name of a plugin module.)
"""

import types


def _load_hooks() -> types.ModuleType:
    import sys
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec

    package = sys.modules.get("pytest_ratebatch")
    if package is None:
        spec = PathFinder.find_spec("pytest_ratebatch")
        if spec is None or spec.loader is None:
            raise ImportError("cannot find pytest_ratebatch", name="pytest_ratebatch")
        package = sys.modules["pytest_ratebatch"] = module_from_spec(spec)
        try:
            spec.loader.exec_module(package)
        except BaseException:
            del sys.modules["pytest_ratebatch"]
            raise
    hooks: types.ModuleType = package.import_compiled("plugin.hooks")
    return hooks


_hooks = _load_hooks()
pytest_addoption = _hooks.pytest_addoption
pytest_configure = _hooks.pytest_configure
ratebatch = _hooks.ratebatch
