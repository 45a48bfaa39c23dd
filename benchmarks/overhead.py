"""Plugin overhead, counted in executed instructions (valgrind's callgrind), not wall time.

What is measured: whole ``python -m pytest -q -p no:cacheprovider`` runs over a generated file
of N trivial tests (``@pytest.mark.parametrize("i", range(N))`` / ``def test_x(i): pass``),
each under ``valgrind --tool=callgrind --trace-children=yes``; the instruction counts of
every process of the run (the pytest process and, under xdist, the controller's workers)
are summed from the ``summary:`` line of each callgrind output file. Instruction counts are
repeatable where wall time on a shared machine varies by 20% between identical runs.

The plugin is measured as users install it: a virtualenv with a regular (not editable)
``pip install`` of this checkout and pytest-xdist, and ``PYTHONDONTWRITEBYTECODE=1`` (as in
many container images: nothing pytest rewrites is cached between runs); ``--bytecode``
measures with bytecode writing on instead (after one unmeasured run fills the caches).
A count is exactly repeatable for one hash seed; between seeds, identical work lands in
different dict and method-cache layouts and garbage collections fall at other points, which
moves a whole run by a few million instructions (about 0.1-0.3%). So every variant runs under
several ``PYTHONHASHSEED`` values (default 1, 2, 3) and the ratios are the medians over them.

Variants (each compared with the baseline of the same process layout):

* ``off``: the plugin disabled, ``-p no:ratebatch`` (the baseline);
* ``unconfigured``: installed, no option set (target <= 1.005, and no output of its own);
* ``policy``: a policy that never binds, ``--rate-per-minute 60000000 --burst 100000``
  (target <= 1.02);
* ``batched``: the same in batches of 50, ``--batch-size 50`` (target <= 1.02);
* ``off -n 2`` / ``policy -n 2``: under pytest-xdist with two workers, all processes
  counted (target <= 1.03).

Per size it prints each variant's instruction count, its ratio to the baseline and the extra
instructions per test; with two sizes or more, the marginal extra per test between the
smallest and the largest size, which must not exceed the per-test extra at the smallest
(flat in suite size).

Reproduce from the repository root (needs valgrind; about an hour on a 2-CPU machine, most
of it the 10,000-test runs)::

    python benchmarks/overhead.py
    python benchmarks/overhead.py --sizes 1000 --variants unconfigured,policy   # minutes
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import venv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tables import print_table

REPO_ROOT = Path(__file__).resolve().parent.parent

POLICY = ["--rate-per-minute", "60000000", "--burst", "100000"]
XDIST = ["-n", "2"]
#: name -> (baseline variant, extra pytest arguments, target ratio to the baseline)
VARIANTS: dict[str, tuple[str, list[str], float]] = {
    "off": ("off", ["-p", "no:ratebatch"], 1.0),
    "unconfigured": ("off", [], 1.005),
    "policy": ("off", POLICY, 1.02),
    "batched": ("off", [*POLICY, "--batch-size", "50"], 1.02),
    "off -n 2": ("off -n 2", ["-p", "no:ratebatch", *XDIST], 1.0),
    "policy -n 2": ("off -n 2", [*POLICY, *XDIST], 1.03),
}
SUMMARY = re.compile(rb"^summary:\s*(\d+)", re.MULTILINE)


def parse_list(text: str, kind: type = str) -> list:  # type: ignore[type-arg]
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise argparse.ArgumentTypeError("an empty list")
    try:
        return [kind(item) for item in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of {kind.__name__}: {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Count the instructions of whole pytest runs of N trivial tests with the "
        "plugin disabled, unconfigured, and enforcing a non-binding policy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--sizes", type=lambda t: parse_list(t, int), default="1000,10000", help="test counts N"
    )
    parser.add_argument(
        "--variants",
        type=parse_list,
        default=",".join(VARIANTS),
        help=f"variants to run (baselines are added): {', '.join(VARIANTS)}",
    )
    parser.add_argument(
        "--venv",
        type=Path,
        default=None,
        help="reuse (or create) this virtualenv for the installed package; default: a "
        "temporary one, built from this checkout",
    )
    parser.add_argument(
        "--seeds", type=lambda t: parse_list(t, int), default="1,2,3", help="PYTHONHASHSEED values"
    )
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="callgrind runs at once"
    )
    parser.add_argument(
        "--bytecode",
        action="store_true",
        help="let Python write bytecode (pytest's rewritten modules are then cached)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    if min(args.sizes) < 1 or args.jobs < 1:
        parser.error("sizes and --jobs must be >= 1")
    wanted = set(args.variants) | {VARIANTS[name][0] for name in args.variants}
    args.variants = [name for name in VARIANTS if name in wanted]
    return args


def install(venv_dir: Path, packages: tuple[str, ...] = ("pytest-xdist>=3.5",)) -> Path:
    """A virtualenv holding this checkout as users install it (not editable) and
    ``packages`` (xdist by default)."""
    python = venv_dir / "bin" / "python"
    if not python.exists():
        venv.EnvBuilder(with_pip=True).create(venv_dir)
    # --force-reinstall of the project alone: the measured code is this checkout's.
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *packages], check=True)
    subprocess.run([*pip, "--force-reinstall", "--no-deps", str(REPO_ROOT)], check=True)
    return python


def write_suite(directory: Path, size: int) -> None:
    # An empty ini file: the rootdir is this directory, and no ini file above it applies.
    (directory / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    (directory / "test_trivial.py").write_text(
        "import pytest\n\n\n"
        f'@pytest.mark.parametrize("i", range({size}))\n'
        "def test_x(i):\n"
        "    pass\n",
        encoding="utf-8",
    )


def child_env(bytecode: bool, seed: int) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE")
    }
    env["PYTHONHASHSEED"] = str(seed)
    if not bytecode:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def pytest_command(python: Path, directory: Path, extra: list[str]) -> list[str]:
    return [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(directory), *extra]


def count(python: Path, directory: Path, extra: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Instructions of one run, all processes summed, and its output."""
    with tempfile.TemporaryDirectory(prefix="callgrind-") as out:
        command = [
            "valgrind",
            "--tool=callgrind",
            "--trace-children=yes",
            f"--callgrind-out-file={out}/callgrind.%p",
            "--log-file=/dev/null",
            *pytest_command(python, directory, extra),
        ]
        result = subprocess.run(
            command, cwd=directory, env=env, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-20:])
            raise SystemExit(f"exit {result.returncode}: {' '.join(command)}\n{tail}")
        total = 0
        for path in Path(out).iterdir():
            match = SUMMARY.search(path.read_bytes())
            if match:
                total += int(match.group(1))
    return total, result.stdout


def own_lines(output: str) -> list[str]:
    """Lines of a run's output that the plugin printed."""
    return [line for line in output.splitlines() if line.startswith("ratebatch")]


#: counts[size][variant][seed] = instructions
Counts = dict[int, dict[str, dict[int, int]]]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is required (Debian package valgrind)")
    with tempfile.TemporaryDirectory(prefix="ratebatch-overhead-") as tmp:
        python = install(args.venv or Path(tmp) / "venv")
        probe = (
            "import pytest_ratebatch as p, pytest; print(p.__file__, 'pytest', pytest.__version__)"
        )
        version = subprocess.run(
            [str(python), "-c", probe], capture_output=True, text=True, check=True, cwd=tmp
        ).stdout.strip()
        print(f"python {platform.python_version()} on {platform.machine()}; measured: {version}")
        print(
            f"bytecode writing {'on' if args.bytecode else 'off (PYTHONDONTWRITEBYTECODE=1)'}; "
            f"hash seeds {', '.join(map(str, args.seeds))}"
        )
        print()
        jobs = []
        for size in args.sizes:
            directory = Path(tmp) / f"suite-{size}"
            directory.mkdir()
            write_suite(directory, size)
            for name in args.variants:
                for seed in args.seeds:
                    jobs.append((size, name, seed, directory))
        counts: Counts = {}

        def run(job: tuple[int, str, int, Path]) -> None:
            size, name, seed, directory = job
            env = child_env(args.bytecode, seed)
            extra = VARIANTS[name][1]
            if args.bytecode:  # fill pytest's caches of rewritten modules first
                subprocess.run(
                    pytest_command(python, directory, extra),
                    cwd=directory, env=env, capture_output=True, check=False,
                )  # fmt: skip
            total, output = count(python, directory, extra, env)
            counts.setdefault(size, {}).setdefault(name, {})[seed] = total
            print(f"  N={size} {name} seed {seed}: {total:,}", file=sys.stderr, flush=True)
            if name == "unconfigured" and own_lines(output):
                print(f"  the unconfigured run printed: {own_lines(output)}")

        # Largest runs first, so the pool does not end on one long run.
        jobs.sort(key=lambda job: (-job[0], "-n" not in job[1]))
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(run, jobs))
        report(args, counts)
    return 0


def report(args: argparse.Namespace, counts: Counts) -> None:
    header = ("N", "variant", "instructions", "ratio", "per seed", "target", "extra/test")
    rows = []
    for size in sorted(counts):
        by_name = counts[size]
        for name in args.variants:
            base_name, _, target = VARIANTS[name]
            ratios = [by_name[name][seed] / by_name[base_name][seed] for seed in args.seeds]
            extras = [by_name[name][seed] - by_name[base_name][seed] for seed in args.seeds]
            median = statistics.median(by_name[name].values())
            per_seed = " ".join(f"{ratio:.4f}" for ratio in ratios)
            target_text = "" if name == base_name else f"<= {target}"
            rows.append(
                (
                    str(size),
                    name,
                    f"{median:,.0f}",
                    f"{statistics.median(ratios):.4f}",
                    per_seed,
                    target_text,
                    f"{statistics.median(extras) / size:,.0f}",
                )
            )
    print_table(header, rows, right=True)
    print()
    print("instructions: median over the seeds; ratio: median of the per-seed ratios to the")
    print("baseline of the same process layout; extra/test: median extra instructions / N.")
    sizes = sorted(counts)
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        print()
        print(f"marginal extra instructions per test from N={small} to N={large} (flat: not")
        print(f"above the extra per test at N={small}):")
        for name in args.variants:
            base_name = VARIANTS[name][0]
            if name == base_name:
                continue

            def extra(size: int, name: str = name, base_name: str = base_name) -> float:
                by_name = counts[size]
                return statistics.median(
                    by_name[name][seed] - by_name[base_name][seed] for seed in args.seeds
                )

            marginal = (extra(large) - extra(small)) / (large - small)
            print(f"  {name}: {marginal:,.0f} (at N={small}: {extra(small) / small:,.0f})")


if __name__ == "__main__":
    raise SystemExit(main())
