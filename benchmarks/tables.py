"""Plain-text tables for the benchmark scripts (imported from their own directory)."""

from __future__ import annotations

from collections.abc import Sequence


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: bool = False) -> None:
    """Columns as wide as their widest cell, two spaces apart; ``right`` aligns them right."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        padded = (c.rjust(w) if right else c.ljust(w) for c, w in zip(cells, widths, strict=True))
        return "  ".join(padded)

    print(line(header))
    for row in rows:
        print(line(row))
