"""``python -m pytest_ratebatch``: read JSON reports back, as a summary or a timeline.

    python -m pytest_ratebatch summary REPORT.json
    python -m pytest_ratebatch timeline REPORT.json [REPORT.json ...] -o timeline.svg

Bad input (a missing file, not JSON, another report format) is one line on stderr and exit
status 2, never a traceback. Nothing here is imported by a pytest run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

USAGE_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_ratebatch",
        description="Read pytest-ratebatch JSON reports (--ratebatch-report) back.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    summary = commands.add_parser(
        "summary", help="print the summary section of a report again", description=(
            "Print the summary section of a report, as the session printed it."
        ),
    )  # fmt: skip
    summary.add_argument("report", type=Path, metavar="REPORT.json")
    timeline = commands.add_parser(
        "timeline",
        help="draw reports as an SVG timeline",
        description=(
            "Draw one or more reports as an SVG timeline: a lane per process, each test's "
            "run, waits, batches, pauses and throttles, and the cost started against the "
            "policy's bound. Reports of sessions that shared a Redis key merge on its clock."
        ),
    )
    timeline.add_argument("reports", type=Path, nargs="+", metavar="REPORT.json")
    timeline.add_argument(
        "-o", "--output", type=Path, default=Path("timeline.svg"), metavar="PATH",
        help="the SVG file to write (default: timeline.svg)",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    from .views.loading import ReportError, load_report

    try:
        if arguments.command == "summary":
            from .views.report import describe_report

            data = load_report(arguments.report)
            lines = describe_report(
                data["policy"], data["summary"], data["throttling"],
                data["session"].get("stop_reason", ""),
            )  # fmt: skip
            print("\n".join(lines))
            return 0
        from .views.output import OutputError
        from .views.timeline import write_timeline

        reports = [(path.stem, load_report(path)) for path in arguments.reports]
        if len({name for name, _ in reports}) < len(reports):
            reports = [
                (str(path), data)
                for path, (_, data) in zip(arguments.reports, reports, strict=True)
            ]
        try:
            write_timeline(arguments.output, reports)
        except OutputError as error:
            raise ReportError(str(error)) from None
        print(f"timeline: {arguments.output}")
        return 0
    except ReportError as error:
        print(f"python -m pytest_ratebatch: error: {error}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
