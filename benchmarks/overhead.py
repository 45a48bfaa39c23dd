"""Plugin overhead: wall time of whole pytest runs of N trivial tests, with and without it.

What is measured: ``python -m pytest -q -p no:cacheprovider <dir>`` as a subprocess, timed
with ``time.perf_counter`` around ``subprocess.run``, on a generated file of N trivial tests
(``@pytest.mark.parametrize("i", range(N))`` / ``def test_x(i): pass``), in three variants:

* A: the plugin enforcing a policy that never binds (``--rate-per-minute 1e9 --batch-size 100
  --max-failures 1000000 --total-timeout 1h``; the burst defaults to the batch size), so every
  test goes through the scheduler, the limiter, the ledger and the stop checks;
* B: the plugin disabled (``-p no:ratebatch``), the baseline;
* C: the plugin installed but given no policy (inert: it only adds its options).

The variants are interleaved within each round (the order rotates between rounds), every
size gets one unmeasured warm-up run per variant, and the table quotes medians over the
rounds: ratio of the medians, and the median of the per-round ratios ("paired"). A second
table gives the CPU time (user + system, from ``getrusage(RUSAGE_CHILDREN)``) of the same
runs, which other load on the machine disturbs less than wall time. ``--workers N`` adds
``-n N`` (pytest-xdist) to every variant.

Target: A/B <= 1.03 at N = 5000, and flat as N grows.

Reproduce from the repository root::

    python benchmarks/overhead.py                       # sizes 1000,5000,20000, 5 rounds
    python benchmarks/overhead.py --sizes 1000,5000 --repeats 3   # about 3 minutes, 2 CPUs
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO_ROOT = Path(__file__).resolve().parent.parent

POLICY_ARGS = [
    "--rate-per-minute",
    "1e9",
    "--batch-size",
    "100",
    "--max-failures",
    "1000000",
    "--total-timeout",
    "1h",
]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "A": ("plugin, non-binding policy", POLICY_ARGS),
    "B": ("plugin disabled (-p no:ratebatch)", ["-p", "no:ratebatch"]),
    "C": ("plugin installed, no policy", []),
}


def positive_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("sizes must be integers >= 1")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time whole pytest runs of N trivial tests: plugin enforcing a "
        "non-binding policy (A), plugin disabled (B), plugin inert (C).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--sizes", type=positive_sizes, default="1000,5000,20000", help="test counts N"
    )
    parser.add_argument("--repeats", type=int, default=5, help="measured rounds per size")
    parser.add_argument(
        "--warmup", type=int, default=1, help="unmeasured rounds per size before measuring"
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="if > 0, add -n WORKERS (pytest-xdist)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.workers < 0:
        parser.error("--repeats must be >= 1, --warmup and --workers >= 0")
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


class Sample(NamedTuple):
    wall: float  # seconds, time.perf_counter around subprocess.run
    cpu: float  # seconds of user + system CPU of the child and its children (workers)


def run_once(directory: Path, extra: list[str], workers: int, env: dict[str, str]) -> Sample:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(directory)]
    command += extra
    if workers:
        command += ["-n", str(workers)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(
        command, cwd=directory, env=env, capture_output=True, text=True, check=False
    )
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-20:])
        raise SystemExit(f"pytest exited {result.returncode}: {' '.join(command)}\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Sample(elapsed, cpu)


def measured_plugin(env: dict[str, str]) -> str:
    probe = "import pytest_ratebatch.plugin as p; print(p.__file__)"
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=False
    )
    return result.stdout.strip() or f"(import failed: {result.stderr.strip()})"


def measure_size(
    size: int, args: argparse.Namespace, env: dict[str, str]
) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    with tempfile.TemporaryDirectory(prefix="ratebatch-overhead-") as tmp:
        directory = Path(tmp)
        write_suite(directory, size)
        for round_ in range(args.warmup + args.repeats):
            # Rotate the order (ABC, BCA, CAB, ...) so no variant always runs first.
            shift = round_ % len(names)
            order = names[shift:] + names[:shift]
            this_round = {
                name: run_once(directory, VARIANTS[name][1], args.workers, env) for name in order
            }
            if round_ >= args.warmup:
                for name, sample in this_round.items():
                    samples[name].append(sample)
            label = "warm-up" if round_ < args.warmup else f"round {round_ - args.warmup + 1}"
            timings = ", ".join(
                f"{name} {this_round[name].wall:.2f}s/{this_round[name].cpu:.2f}s cpu"
                for name in order
            )
            print(f"  N={size} {label}: {timings}", file=sys.stderr, flush=True)
    return samples


def paired_ratio(values: dict[str, list[float]], top: str, bottom: str) -> float:
    return statistics.median(a / b for a, b in zip(values[top], values[bottom], strict=True))


def table(title: str, results: list[tuple[int, dict[str, list[float]]]]) -> None:
    rows = []
    for size, values in results:
        a, b, c = (statistics.median(values[name]) for name in "ABC")
        rows.append(
            (
                f"{size}",
                f"{a:.3f}",
                f"{b:.3f}",
                f"{c:.3f}",
                f"{a / b:.3f}",
                f"{paired_ratio(values, 'A', 'B'):.3f}",
                f"{c / b:.3f}",
                f"{paired_ratio(values, 'C', 'B'):.3f}",
                f"{(a - b) / size * 1e6:.1f}",
            )
        )
    header = ("N", "A s", "B s", "C s", "A/B", "paired", "C/B", "paired", "A-B µs/test")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print(title)
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    print()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = child_env()
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"plugin measured: {measured_plugin(env)}")
    for name, (what, extra) in VARIANTS.items():
        print(f"  {name}: {what}{'  ' + ' '.join(extra) if extra else ''}")
    workers = f", -n {args.workers}" if args.workers else ""
    print(f"{args.repeats} interleaved rounds per size (+{args.warmup} warm-up){workers}")
    print()
    wall: list[tuple[int, dict[str, list[float]]]] = []
    cpu: list[tuple[int, dict[str, list[float]]]] = []
    for size in args.sizes:
        samples = measure_size(size, args, env)
        wall.append((size, {name: [s.wall for s in runs] for name, runs in samples.items()}))
        cpu.append((size, {name: [s.cpu for s in runs] for name, runs in samples.items()}))
    table("wall time (time.perf_counter around subprocess.run)", wall)
    table("CPU time (user + system of the pytest process and its workers)", cpu)
    print("A s, B s, C s: medians in seconds; A/B, C/B: ratio of the medians;")
    print("paired: median of the per-round ratios; A-B µs/test: (median A - median B) / N.")
    print("Target: wall A/B <= 1.03 at N=5000, and flat as N grows.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
