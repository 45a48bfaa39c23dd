"""Pacing accuracy (G1, G2): does the plugin start tests at the configured rate, and never faster?

What is measured: a pytest subprocess runs N generated trivial tests with ``--rate-per-minute
R --burst B --ratebatch-report <tmp>/r.json`` (optionally ``--batch-size K`` and ``-n W``),
once per repeat. From each JSON report:

* the ideal span of starts, ``(cost - B) * interval_ns`` with the plugin's rounded-up
  ``policy.interval_ns`` (about ``(N - B) / rate``): the burst starts at once, then one test
  per interval;
* the measured span, last start - first start;
* their ratio and the deviation in % (positive: slower than the rate allows);
* the worst excess over the bound ``B + R * w`` across every window of starts, in tokens,
  from ``pytest_ratebatch.worst_excess`` (<= 0: the bound held everywhere).

Targets: span within 1% of the ideal (G2, the rate is kept up), worst excess <= 0 (G1, never
faster than the bound).

Reproduce from the repository root::

    python benchmarks/pacing.py                         # N=300, R=6000/min, B=5, 3 repeats
    python benchmarks/pacing.py --batch-size 5 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

from tables import print_table

REPO_ROOT = Path(__file__).resolve().parent.parent
SPAN_TOLERANCE = 0.01  # the span target: within 1% of the ideal


class Run(NamedTuple):
    started: int  # tests with a start in the report
    cost: int  # tokens taken by them
    ideal_s: float
    span_s: float
    excess: float
    wall_s: float
    workers: int  # distinct workers named in the report (0: none)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run N trivial tests under a rate limit and compare the span of their "
        "starts with the ideal; check the rate bound over every window.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--tests", "-N", type=int, default=300, help="number of tests N")
    parser.add_argument(
        "--rate-per-minute", type=float, default=6000.0, help="rate R, tests per minute"
    )
    parser.add_argument(
        "--burst", type=int, default=None, help="burst B (default: the batch size if given, else 5)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="batch size K (optional)")
    parser.add_argument(
        "--workers", type=int, default=0, help="if > 0, add -n WORKERS (pytest-xdist)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="pytest runs")
    args = parser.parse_args(argv)
    if args.burst is None:
        args.burst = args.batch_size if args.batch_size is not None else 5
    if args.tests < 1 or args.repeats < 1 or args.workers < 0 or args.burst < 1:
        parser.error("--tests, --repeats and --burst must be >= 1, --workers >= 0")
    if not args.rate_per_minute > 0:
        parser.error("--rate-per-minute must be > 0")
    if args.batch_size is not None and not 1 <= args.batch_size <= args.burst:
        parser.error("--batch-size must be >= 1 and at most the burst")
    return args


def write_suite(directory: Path, size: int) -> None:
    # An empty ini file: the rootdir is the temp dir, and no ini file above it applies.
    (directory / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    (directory / "test_trivial.py").write_text(
        "import pytest\n\n\n"
        f'@pytest.mark.parametrize("i", range({size}))\n'
        "def test_x(i):\n"
        "    pass\n",
        encoding="utf-8",
    )


def child_env() -> dict[str, str]:
    """Run the plugin from this checkout, whatever checkout an editable install points at."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return env


def pytest_command(directory: Path, report: Path, args: argparse.Namespace) -> list[str]:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(directory)]
    command += ["--rate-per-minute", repr(args.rate_per_minute), "--burst", str(args.burst)]
    command += ["--ratebatch-report", str(report)]
    if args.batch_size is not None:
        command += ["--batch-size", str(args.batch_size)]
    if args.workers:
        command += ["-n", str(args.workers)]
    return command


def analyse(data: dict[str, Any], wall_s: float) -> Run:
    from pytest_ratebatch.views.report import worst_excess

    interval_ns: int = data["policy"]["interval_ns"]
    burst: int = data["policy"]["burst"]
    tests: list[dict[str, Any]] = data["tests"]
    starts = [(t["start_ns"], t["tokens"]) for t in tests if t.get("start_ns") is not None]
    cost = sum(tokens for _, tokens in starts)
    times = [start for start, _ in starts]
    span_ns = max(times) - min(times) if times else 0
    workers = {t.get("worker") for t in tests if t.get("worker")}
    return Run(
        started=len(starts),
        cost=cost,
        ideal_s=max(0, cost - burst) * interval_ns / 1e9,
        span_s=span_ns / 1e9,
        excess=worst_excess(starts, interval_ns, burst),
        wall_s=wall_s,
        workers=len(workers),
    )


def run_once(directory: Path, args: argparse.Namespace, env: dict[str, str]) -> Run:
    report = directory / "r.json"
    report.unlink(missing_ok=True)
    command = pytest_command(directory, report, args)
    started = time.perf_counter()
    result = subprocess.run(
        command, cwd=directory, env=env, capture_output=True, text=True, check=False
    )
    wall_s = time.perf_counter() - started
    if result.returncode != 0 or not report.exists():
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-20:])
        raise SystemExit(f"pytest exited {result.returncode}: {' '.join(command)}\n{tail}")
    return analyse(json.loads(report.read_text(encoding="utf-8")), wall_s)


def ratio(run: Run) -> float:
    return run.span_s / run.ideal_s if run.ideal_s else float("nan")


def row(label: str, run: Run) -> list[str]:
    deviation = (ratio(run) - 1) * 100
    return [
        label,
        f"{run.started}",
        f"{run.ideal_s:.4f}",
        f"{run.span_s:.4f}",
        f"{ratio(run):.4f}",
        f"{deviation:+.2f}%",
        f"{run.excess:+.3f}",
        f"{run.wall_s:.2f}",
    ]


def print_runs(rows: list[list[str]]) -> None:
    header = ["run", "started", "ideal s", "span s", "span/ideal", "deviation", "excess", "wall s"]
    print_table(header, rows, right=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))  # analyse() imports worst_excess from this checkout
    env = child_env()
    batches = f", batch size {args.batch_size}" if args.batch_size is not None else ""
    workers = f", -n {args.workers}" if args.workers else ""
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs")
    print(
        f"N={args.tests} tests, rate {args.rate_per_minute:g}/min, burst {args.burst}"
        f"{batches}{workers}, {args.repeats} runs"
    )
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="ratebatch-pacing-") as tmp:
        directory = Path(tmp)
        write_suite(directory, args.tests)
        for index in range(args.repeats):
            runs.append(run_once(directory, args, env))
            print(f"  run {index + 1} done", file=sys.stderr, flush=True)
    print()
    rows = [row(str(index + 1), run) for index, run in enumerate(runs)]
    median = Run(
        started=int(statistics.median(r.started for r in runs)),
        cost=int(statistics.median(r.cost for r in runs)),
        ideal_s=statistics.median(r.ideal_s for r in runs),
        span_s=statistics.median(r.span_s for r in runs),
        excess=statistics.median(r.excess for r in runs),
        wall_s=statistics.median(r.wall_s for r in runs),
        workers=0,
    )
    rows.append(row("median", median))
    print_runs(rows)
    print()
    worst = max(r.excess for r in runs)
    median_ratio = statistics.median(ratio(r) for r in runs)
    span_ok = abs(median_ratio - 1) <= SPAN_TOLERANCE
    print(
        f"span: median span/ideal {median_ratio:.4f} -> "
        f"{'met' if span_ok else 'MISSED'} (target: within {SPAN_TOLERANCE:.0%} of ideal)"
    )
    print(
        f"bound: worst excess over all runs {worst:+.3f} tokens -> "
        f"{'met' if worst <= 0 else 'MISSED'} (target: <= 0)"
    )
    incomplete = [r.started for r in runs if r.started != args.tests]
    if incomplete:
        print(
            f"note: the report held starts for {incomplete} of {args.tests} tests in some runs; "
            "span and bound cover only those."
        )
    if args.workers:
        named = sorted({r.workers for r in runs})
        print(f"note: workers named in the report: {named} (asked for {args.workers})")
    print("ideal = (tokens started - burst) * policy.interval_ns; span = last start - first start")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
