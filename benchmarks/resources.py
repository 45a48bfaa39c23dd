"""Declared resources (``--resources``): the span of a suite against the ideal, and the most
held at once.

A generated suite of N tests (default 12), each declaring ``memory=2`` of a capacity of
``memory=4`` and sleeping ``--hold`` seconds (default 0.4), runs under ``-n 4`` with the
file store and, with ``--redis``, a Redis store (the script starts its own
``redis-server``). Each test logs its start and end on the monotonic clock; the script
prints the most tests in flight at once (each run: at most 2) and the span from the first
start to the last end (median of the runs) beside the ideal ``N / 2 * hold`` (2.4 s by
default). Target: at most 2 in flight; span <= 1.1x the ideal.

Reproduce from the repository root::

    python benchmarks/resources.py                 # about half a minute
    python benchmarks/resources.py --runs 5 --redis
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tables import print_table

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.redis_server import RedisServer  # noqa: E402

SUITE = """
import os
import time

import pytest

LOG = os.environ["RESOURCE_LOG"]


def note(kind):
    with open(LOG, "a") as log:
        log.write(f"{{kind}} {{time.monotonic_ns()}}\\n")


@pytest.mark.ratebatch(resources={{"memory": 2}})
@pytest.mark.parametrize("i", range({tests}))
def test_heavy(i):
    note("start")
    time.sleep({hold})
    note("end")
"""


def read_log(log: Path) -> tuple[int, float]:
    """The most tests in flight at once, and the span from the first start to the last end."""
    events = []
    for line in log.read_text().splitlines():
        kind, stamp = line.split()
        events.append((int(stamp), 0 if kind == "end" else 1))  # at a tie, the end first
    events.sort()
    in_flight = most = 0
    for _, starts in events:
        in_flight += 1 if starts else -1
        most = max(most, in_flight)
    return most, (events[-1][0] - events[0][0]) / 1e9


def run_once(directory: Path, store: list[str], workers: int) -> tuple[int, float]:
    log = directory / "log"
    log.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(workers),
        "--resources", "memory=4", *store, "test_heavy.py",
    ]  # fmt: skip
    env = {**os.environ, "RESOURCE_LOG": str(log)}
    done = subprocess.run(
        command, cwd=directory, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"the suite failed:\n{done.stdout}\n{done.stderr}")
    return read_log(log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", type=int, default=12)
    parser.add_argument("--hold", type=float, default=0.4)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--redis", action="store_true", help="also with a Redis store")
    args = parser.parse_args()
    ideal = args.tests / 2 * args.hold
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs; {args.tests} tests of")
    print(f"memory=2 in memory=4, {args.hold}s each, -n {args.workers}; ideal {ideal:.2f}s")
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary)
        suite = SUITE.format(tests=args.tests, hold=args.hold)
        (directory / "test_heavy.py").write_text(suite)
        (directory / "pytest.ini").write_text("[pytest]\n")
        stores: list[tuple[str, list[str]]] = [("file", [])]
        server = None
        if args.redis:
            (directory / "redis").mkdir()
            server = RedisServer(directory / "redis").start()
            stores.append(("redis", ["--ratebatch-store", server.url]))
        try:
            for name, store in stores:
                results = [run_once(directory, store, args.workers) for _ in range(args.runs)]
                span = statistics.median(span for _, span in results)
                most = max(most for most, _ in results)
                met = most <= 2 and span <= 1.1 * ideal
                rows.append(
                    (name, " ".join(str(most) for most, _ in results), f"{span:.2f}",
                     " ".join(f"{span:.2f}" for _, span in results),
                     f"{span / ideal:.3f}", "met" if met else "MISSED")
                )  # fmt: skip
        finally:
            if server is not None:
                server.stop()
    header = ("store", "most in flight", "span s (median)", "spans", "span / ideal", "target")
    print_table(header, rows)
    print("target: at most 2 in flight, span <= 1.1x the ideal")


if __name__ == "__main__":
    main()
