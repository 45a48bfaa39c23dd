"""Priorities across workers and sessions: whether the tokens go to the waiting starts of the
higher priority, and what standing in the start line costs the pace.

A generated suite: ``test_high.py`` (``--tests`` tests of priority 5) and ``test_low.py``
(the same number, priority 0), fast tests, under a rate of ``--rate`` starts a second (burst
1). Three setups, each ``--runs`` times:

- ``-n 2 --dist loadfile``: one worker per file, both waiting for every token;
- the same without the priority marker (the start line unused: the reference pace);
- two sessions on one Redis key (the script starts its own ``redis-server``), the high one
  with its priorities, the low one without any, started together.

For each run the JSON reports give every start and when it arrived (start less its wait).
Printed: *inversions*, the low starts admitted while a high start had been waiting for more
than 50 ms (target 0 with priorities; the reference, where both tiers are equal, shows what
arrival order gives); the span from the first start to the last against the ideal
``(2N - 1) / rate`` (target: with priorities within 3% of the reference).

Reproduce from the repository root::

    python benchmarks/priorities.py            # about a minute
    python benchmarks/priorities.py --runs 5 --rate 20
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
from datetime import datetime
from pathlib import Path
from typing import Any

from tables import print_table

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.redis_server import RedisServer  # noqa: E402

TIER = """
import pytest

{mark}

@pytest.mark.parametrize("i", range({tests}))
def test_{name}(i):
    pass
"""

RANKED = "-n 2 loadfile, priorities"
REFERENCE = "-n 2 loadfile, no priorities (reference)"
REDIS = "2 sessions on one Redis key"

#: A low start admitted while a high one had waited longer than this is an inversion (the
#: start line hands a turn over within a few milliseconds; its lead is 25 ms).
INVERSION_NS = 50_000_000


def write_suite(directory: Path, tests: int, marked: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, priority in (("high", 5), ("low", 0)):
        mark = f"pytestmark = pytest.mark.ratebatch(priority={priority})" if marked else ""
        (directory / f"test_{name}.py").write_text(TIER.format(mark=mark, tests=tests, name=name))
    (directory / "pytest.ini").write_text("[pytest]\n")


def starts(report: Path) -> list[tuple[str, int, int]]:
    """Each started test: (tier, arrival, start), on the wall clock (ns)."""
    found = []
    for test in json.loads(report.read_text())["tests"]:
        if not test["started_at"]:
            continue
        tier = "high" if "test_high" in test["nodeid"] else "low"
        start = int(datetime.fromisoformat(test["started_at"]).timestamp() * 1e9)
        found.append((tier, start - int(test["waited_ns"]), start))
    return found


def measure(found: list[tuple[str, int, int]]) -> tuple[int, float]:
    """Inversions, and the span of the starts (s)."""
    inversions = 0
    for tier, _, start in found:
        if tier != "low":
            continue
        inversions += any(
            other == "high" and arrived + INVERSION_NS < start < other_start
            for other, arrived, other_start in found
        )
    stamps = [start for _, _, start in found]
    return inversions, (max(stamps) - min(stamps)) / 1e9


def pytest_command(rate: float, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
        f"--rate-per-minute={rate * 60:g}", "--ratebatch-report=r.json", *extra,
    ]  # fmt: skip


def run(command: list[str], directory: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command, cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(session: subprocess.Popen[str]) -> None:
    output, _ = session.communicate(timeout=600)
    if session.returncode != 0:
        raise SystemExit(f"a suite failed:\n{output}")


def xdist_run(directory: Path, rate: float) -> list[tuple[str, int, int]]:
    finish(run(pytest_command(rate, "-n", "2", "--dist", "loadfile"), directory))
    return starts(directory / "r.json")


def redis_run(directory: Path, rate: float, url: str, key: str) -> list[tuple[str, int, int]]:
    store = ["--ratebatch-store", url, "--ratebatch-key", key]
    sessions = [
        run(pytest_command(rate, *store, f"test_{tier}.py"), directory / tier)
        for tier in ("low", "high")
    ]
    for session in sessions:
        finish(session)
    return starts(directory / "low" / "r.json") + starts(directory / "high" / "r.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", type=int, default=20, help="tests in each tier")
    parser.add_argument("--rate", type=float, default=10.0, help="starts a second")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    ideal = (2 * args.tests - 1) / args.rate
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs; 2 x {args.tests} tests,")
    print(f"{args.rate:g} starts/s, burst 1; ideal span {ideal:.2f}s")
    rows: list[Any] = []
    spans: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        write_suite(root / "ranked", args.tests, marked=True)
        write_suite(root / "plain", args.tests, marked=False)
        for tier, marked in (("high", True), ("low", False)):
            write_suite(root / "redis" / tier, args.tests, marked)
        (root / "server").mkdir()
        server = RedisServer(root / "server").start()
        results: dict[str, list[tuple[int, float]]] = {}
        try:
            for number in range(args.runs):  # the setups interleaved: a noisy spell hits all
                for name, found in (
                    (RANKED, xdist_run(root / "ranked", args.rate)),
                    (REFERENCE, xdist_run(root / "plain", args.rate)),
                    (REDIS, redis_run(root / "redis", args.rate, server.url, f"p-{number}")),
                ):
                    results.setdefault(name, []).append(measure(found))
        finally:
            server.stop()
    for name, measured in results.items():
        span = statistics.median(span for _, span in measured)
        spans[name] = span
        rows.append(
            (name, " ".join(str(inversions) for inversions, _ in measured), f"{span:.3f}",
             f"{span / ideal:.4f}")
        )  # fmt: skip
    reference = spans[REFERENCE]
    ranked = spans[RANKED]
    print_table(("setup", "inversions", "span s (median)", "span / ideal"), rows)
    inverted = sum(inversions for name in (RANKED, REDIS) for inversions, _ in results[name])
    met = inverted == 0 and ranked <= 1.03 * reference
    print(
        f"priorities / reference span: {ranked / reference:.4f}; "
        f"target: 0 inversions, within 3% of the reference: {'met' if met else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
