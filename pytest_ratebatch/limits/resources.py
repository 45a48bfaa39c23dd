"""Declared resources: a capacity such as ``memory=8, gpu=2``, and the amounts a test asks of
it (``resources={"memory": 2, "gpu": 1}``).

A test starts once its amounts fit in what the tests in flight leave free, and no request
waits ahead of it: waiters are served in a strict line (higher priority first, arrival order
within one), so a large request is never starved by a stream of small ones. The stores keep
the holders and the line (``stores.*ResourcePool``); this module holds their arithmetic:
parsing and checking amounts, whether a request fits, how many of a line's head may start.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "MAX_AMOUNT",
    "admissible",
    "check_request",
    "describe_amounts",
    "fits",
    "parse_request",
    "parse_resources",
    "total_amounts",
]

#: The largest amount of one resource, in a capacity or a request.
MAX_AMOUNT = 1e12
#: Sums of float amounts may be off by a rounding error: this much (relative to the
#: capacity) over it still fits, so that 0.1 + 0.2 fits in a capacity of 0.3.
EPSILON = 1e-9

# Patterns, not compiled objects: re compiles them on first use (and caches them), so a
# session without resources never pays for it. ASCII only, as the policy's numbers.
_NAME = r"[A-Za-z_][A-Za-z0-9_.-]*"
_AMOUNT = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_NAME_RULE = "a name starts with a letter or _, then letters, digits, _ . or -"


def parse_resources(text: str) -> dict[str, float]:
    """The capacity ``memory=8, gpu=2``: ``NAME=AMOUNT`` pairs separated by commas, spaces
    or lines (spaces around ``=`` allowed); names are case-sensitive. Blank: ``{}``."""
    # Spaces around "=" belong to their pair; then commas and whitespace separate pairs.
    compact = re.sub(r"[ \t]*=[ \t]*", "=", text)
    amounts: dict[str, float] = {}
    for part in re.split(r"[\s,]+", compact):
        if not part:
            continue
        name, equals, amount = part.partition("=")
        if not equals:
            raise ValueError(f"expected NAME=AMOUNT, got {_quote(part)}")
        if not re.fullmatch(_NAME, name):
            raise ValueError(f"{_quote(part)}: {_NAME_RULE}")
        if name in amounts:
            raise ValueError(f"name {_quote(name)} given twice")
        value = float(amount) if re.fullmatch(_AMOUNT, amount) else math.nan
        problem = _amount_problem(value)
        if problem:
            raise ValueError(f"{_quote(part)}: {problem}")
        amounts[name] = value
    return amounts


def parse_request(value: object) -> dict[str, float]:
    """What a test asks (a marker's ``resources={"memory": 2}``): a dict of names to
    positive numbers; a copy with float amounts."""
    if not isinstance(value, Mapping):
        raise ValueError(
            f'resources must be a dict of names to amounts (e.g. {{"memory": 2}}), '
            f"not {_quote(repr(value))}"
        )
    amounts: dict[str, float] = {}
    for name, amount in value.items():
        if not isinstance(name, str):
            raise ValueError(f"a resource name must be a string, not {_quote(repr(name))}")
        if not re.fullmatch(_NAME, name):
            raise ValueError(f"resource {_quote(name)}: {_NAME_RULE}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise ValueError(
                f"resource {_quote(name)}: an amount must be a number, not {_quote(repr(amount))}"
            )
        # A huge int as a float would overflow: past the bound, any number past it will do.
        number = float(max(-1, min(amount, 2 * MAX_AMOUNT))) if isinstance(amount, int) else amount
        problem = _amount_problem(number)
        if problem:
            raise ValueError(f"resource {_quote(name)}: {problem}, not {_quote(repr(amount))}")
        amounts[name] = number
    return amounts


def _amount_problem(value: float) -> str:
    """What is wrong with an amount (``""``: nothing)."""
    if math.isnan(value) or value <= 0:
        return "an amount must be a positive number"
    if value > MAX_AMOUNT:
        return "an amount must be at most 1e12"
    return ""


def check_request(request: Mapping[str, float], capacity: Mapping[str, float]) -> str:
    """``""`` if ``request`` can ever fit in ``capacity`` (with nothing else in flight), else
    why not: a request that never fits would wait forever, and hold up the line behind it."""
    problems = []
    for name in sorted(request):
        amount = request[name]
        if name not in capacity:
            problems.append(f"needs {_describe(name, amount)} but --resources has no {name}")
        elif not _within(amount, capacity[name]):
            problems.append(
                f"needs {_describe(name, amount)}, more than the capacity "
                f"{_describe(name, capacity[name])}"
            )
    return "; ".join(problems)


def fits(
    request: Mapping[str, float], in_use: Mapping[str, float], capacity: Mapping[str, float]
) -> bool:
    """Whether ``request`` fits in what ``in_use`` leaves free of ``capacity`` (a resource
    the capacity does not name has none)."""
    return all(
        _within(in_use.get(name, 0.0) + amount, capacity.get(name, 0.0))
        for name, amount in request.items()
    )


def _within(amount: float, capacity: float) -> bool:
    return amount <= capacity + EPSILON * capacity


def admissible(
    line: Sequence[Mapping[str, float]],
    in_use: Mapping[str, float],
    capacity: Mapping[str, float],
) -> int:
    """How many requests from the head of ``line`` (in its order) may start now, one after
    the other: up to the first that does not fit, which holds up everyone behind it."""
    used = dict(in_use)
    for admitted, request in enumerate(line):
        if not fits(request, used, capacity):
            return admitted
        for name, amount in request.items():
            used[name] = used.get(name, 0.0) + amount
    return len(line)


def total_amounts(held: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """The sum of held amounts, by name (computed afresh from the holders: a running total
    would gather rounding errors as tests come and go)."""
    total: dict[str, float] = {}
    for amounts in held:
        for name, amount in amounts.items():
            total[name] = total.get(name, 0.0) + amount
    return total


def describe_amounts(amounts: Mapping[str, float]) -> str:
    """``gpu=1, memory=2``: sorted by name, whole numbers without a decimal point."""
    return ", ".join(_describe(name, amounts[name]) for name in sorted(amounts))


def _describe(name: str, amount: float) -> str:
    return f"{name}={_number(amount)}"


def _number(amount: float) -> str:
    if float(amount).is_integer():
        return str(int(amount))
    return repr(float(amount))  # the shortest spelling that reads back the same


def _quote(text: str) -> str:
    """``text`` in double quotes for a message, cut short if long."""
    return f'"{text}"' if len(text) <= 40 else f'"{text[:40]}..."'
