"""The parts of an active session registered with pytest as hook holders, cheaply."""

from __future__ import annotations

from types import ModuleType

import pytest

__all__ = ["register_hooks"]


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
