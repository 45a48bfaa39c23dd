"""Small immutable value objects, cheap to define.

``dataclasses`` and ``typing.NamedTuple`` generate their methods when a module is imported,
which costs a session more than everything the plugin does per test for a thousand tests;
a class with ``__slots__`` costs almost nothing to define.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Value"]


class Value:
    """Equality, hash and repr from the ``__slots__``; attributes are set once, in
    ``__init__``, through ``_set``."""

    __slots__ = ()

    def _set(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def _names(self) -> tuple[str, ...]:
        names: tuple[str, ...] = self.__slots__
        return names

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._names())

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Value)
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._names())
        return f"{type(self).__name__}({fields})"
