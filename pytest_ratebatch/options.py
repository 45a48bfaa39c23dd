"""Options: one flag and one ini key per setting, read and validated into ``Settings``.

The command line wins over the ini file; ``-o key=value`` is reported as its own source.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

from .policy import (
    COMMAND_LINE,
    OPTIONS,
    ExecutionPolicy,
    PolicyError,
    RawValue,
    build_policy,
    parse_value,
)
from .redis_store import DEFAULT_KEY

__all__ = [
    "KEY_OPTION",
    "REPORT_OPTION",
    "STORE_OPTION",
    "Settings",
    "add_options",
    "load_settings",
]

REPORT_OPTION = "ratebatch_report"
STORE_OPTION = "ratebatch_store"
KEY_OPTION = "ratebatch_key"


def _dest(name: str) -> str:
    return name if name.startswith("ratebatch_") else f"ratebatch_{name}"


def add_options(parser: pytest.Parser) -> None:
    """Each setting as a flag and an ini key, sharing one help text."""
    group = parser.getgroup(
        "ratebatch", "rate limit, batches and stop conditions (pytest-ratebatch)"
    )
    for spec in OPTIONS:
        group.addoption(
            spec.flag, dest=_dest(spec.name), metavar=spec.metavar, default=None, help=spec.help
        )
        parser.addini(spec.name, help=spec.help, default=None)


def read_raw_options(config: pytest.Config) -> dict[str, RawValue]:
    """Each option the user set, as written: the command line wins over the ini file."""
    overrides = {entry.split("=", 1)[0].strip() for entry in (config.option.override_ini or ())}
    ini_source = f"ini file {config.inipath}"
    raw: dict[str, RawValue] = {}
    for spec in OPTIONS:
        value = config.getoption(_dest(spec.name))
        if value is not None:
            raw[spec.name] = RawValue(str(value), COMMAND_LINE)
            continue
        try:
            ini_value = config.getini(spec.name)
        except (TypeError, ValueError) as error:
            raise pytest.UsageError(
                f"ratebatch: {spec.name} ({ini_source}): {error}; "
                f'write the value as a string, e.g. {spec.name} = "60"'
            ) from None
        if ini_value not in (None, ""):
            source = "-o/--override-ini" if spec.name in overrides else ini_source
            raw[spec.name] = RawValue(str(ini_value), source)
    return raw


class Settings(NamedTuple):
    policy: ExecutionPolicy
    report_path: Path | None
    store: RawValue | None  # as written; None: the default for this kind of session
    key: str


def load_settings(config: pytest.Config) -> Settings:
    """The validated settings, or ``pytest.UsageError`` naming the bad value."""
    raw = read_raw_options(config)
    extra = {
        name: raw.pop(name) for name in (REPORT_OPTION, STORE_OPTION, KEY_OPTION) if name in raw
    }
    try:
        policy = build_policy(raw)
        values = {name: parse_value(name, value) for name, value in extra.items()}
    except PolicyError as error:
        raise pytest.UsageError(str(error)) from None
    report_path = None
    if REPORT_OPTION in values:
        from_cli = extra[REPORT_OPTION].source == COMMAND_LINE
        base = config.invocation_params.dir if from_cli else config.rootpath
        report_path = base / Path(values[REPORT_OPTION]).expanduser()
    return Settings(
        policy, report_path, extra.get(STORE_OPTION), values.get(KEY_OPTION, DEFAULT_KEY)
    )
