"""Reading JSON reports back: one clear message for a file that is not one this version reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .report import REPORT_FORMAT

__all__ = ["ReportError", "load_report"]


class ReportError(Exception):
    """A report that cannot be read, with a one-line reason naming the file."""


def load_report(path: Path) -> dict[str, Any]:
    """The report at ``path``, checked for its format; ``ReportError`` otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ReportError(f"{path}: a directory, not a report") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ReportError(f"{path}: cannot be read ({reason})") from None
    try:
        data = json.loads(text)
    except ValueError as error:
        raise ReportError(f"{path}: not JSON ({error})") from None
    if not isinstance(data, dict) or "format" not in data or "tests" not in data:
        raise ReportError(f"{path}: not a pytest-ratebatch report (--ratebatch-report)")
    version = data["format"]
    if version != REPORT_FORMAT:
        raise ReportError(
            f"{path}: report format {version!r}; this version of pytest-ratebatch reads "
            f"format {REPORT_FORMAT} (write the report again with it)"
        )
    fields = ("policy", "session", "summary", "throttling", "events")
    missing = [name for name in fields if not isinstance(data.get(name), (dict, list))]
    if missing or not isinstance(data["tests"], list):
        raise ReportError(f"{path}: incomplete report (missing {', '.join(missing) or 'tests'})")
    return data
