"""The package's layout: subpackages by concern, imports flowing one way (ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pytest_ratebatch"

#: What each subpackage may import of the package, besides itself ("" is the package root).
ALLOWED = {
    "limits": set(),
    "stores": {"limits"},
    "engine": {"stores", "limits"},
    "throttle": {"engine", "stores", "limits"},
    "views": {"engine", "stores", "limits"},
    "calls": {"throttle", "views", "engine", "stores", "limits"},
    "plugin": {"", "calls", "throttle", "views", "engine", "stores", "limits"},
}
#: The only modules that import pytest when they run (the others at most for type checking).
KNOW_PYTEST = {"plugin", "throttle.retrying"}


def modules() -> dict[tuple[str, ...], Path]:
    """Each module's dotted name as parts (a package by its own name), and its file."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[parts[:-1] if parts[-1] == "__init__" else parts] = path
    return found


def runtime_imports(name: tuple[str, ...], path: Path) -> list[tuple[str, ...]]:
    """What the module imports when it runs, at any depth (not under ``TYPE_CHECKING``), as
    absolute names: the package's modules without the package's name, others whole."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    here = name if path.name == "__init__.py" else name[:-1]
    found: list[tuple[str, ...]] = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [("<external>", *alias.name.split(".")) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = tuple(node.module.split(".")) if node.module else ()
            if node.level:
                found.append(here[: len(here) - node.level + 1] + target)
            elif target[:1] == ("pytest_ratebatch",):
                found.append(target[1:])
            else:
                found.append(("<external>", *target))
    return found


def test_few_modules_sit_directly_in_the_package() -> None:
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "api.py"]
    subpackages = sorted(path.parent.name for path in PACKAGE.glob("*/__init__.py"))
    assert subpackages == sorted(ALLOWED)


@pytest.mark.parametrize("subpackage", sorted(ALLOWED))
def test_imports_between_subpackages_flow_one_way(subpackage: str) -> None:
    wrong = []
    for name, path in modules().items():
        if name[:1] != (subpackage,):
            continue
        for target in runtime_imports(name, path):
            if target[:1] == ("<external>",):
                continue
            other = target[0] if target else ""
            if other != subpackage and other not in ALLOWED[subpackage]:
                wrong.append(f"{'.'.join(name)} imports {'.'.join(target) or 'the package'}")
    assert wrong == []


def test_only_the_glue_imports_pytest() -> None:
    knowing = set()
    for name, path in modules().items():
        imported = {
            target[1] for target in runtime_imports(name, path) if target[:1] == ("<external>",)
        }
        if imported & {"pytest", "_pytest"}:
            knowing.add(".".join(name))
    assert {
        module
        for module in knowing
        if not any(module == known or module.startswith(f"{known}.") for known in KNOW_PYTEST)
    } == set()
    assert "plugin.hooks" in knowing  # the check sees a real import


@pytest.mark.parametrize("subpackage", sorted(ALLOWED))
def test_each_subpackage_says_what_it_holds_and_stays_light(subpackage: str) -> None:
    tree = ast.parse((PACKAGE / subpackage / "__init__.py").read_text(encoding="utf-8"))
    docstring = ast.get_docstring(tree)
    assert docstring
    assert "Imports:" in docstring  # what it may import, in its own words
    assert [type(node).__name__ for node in tree.body] == ["Expr"]  # the docstring alone


def test_the_check_sees_a_wrong_import(tmp_path: Path) -> None:
    module = tmp_path / "limits" / "gcra.py"
    module.parent.mkdir()
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ..plugin import hooks\n"
        "def f():\n    from ..engine.limiter import RateLimiter\n",
        encoding="utf-8",
    )
    assert runtime_imports(("limits", "gcra"), module) == [
        ("<external>", "typing"),
        ("engine", "limiter"),
    ]
