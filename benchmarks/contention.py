"""Cross-process stores under contention: cost per reservation, and fairness between waiters.

What is measured, with P processes (default 4) sharing one bucket:

1. *Cost*: every process calls ``take`` (an admitted reservation: the rate never binds) as
   fast as it can, all at once; the cost per call is each process's elapsed time divided by
   its calls, median over processes and rounds. Side by side: this project's file store
   (the one pytest-xdist workers share: one ``flock``, one read, one write) and
   pyrate-limiter's SQLite bucket (``try_acquire``, non-blocking; SQLite's own locking,
   as its optional file lock fails with filelock 4). A call that fails (SQLite's "database is
   locked" after its busy timeout) is counted and printed beside the cost.
2. *Fairness*: every process calls a blocking acquire in a loop against a binding rate
   (default 100/s, burst 1) for a few seconds. Fair means each process is served in turn:
   the admissions split evenly, and no process waits for more than P slots in a row. Printed:
   admissions per process, the smallest share, and the longest run of consecutive
   admissions that went to other processes while one was waiting.

Targets (pytest-xdist issue): <= 50 µs per reservation with 4 processes contending, and fair.

Reproduce from the repository root::

    python benchmarks/contention.py                  # 4 processes
    python benchmarks/contention.py --processes 8 --seconds 5
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.synchronize
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pytest_ratebatch.engine.limiter import RateLimiter  # noqa: E402
from pytest_ratebatch.limits.policy import RateLimit  # noqa: E402
from pytest_ratebatch.stores.files import FileBucketStore  # noqa: E402

NON_BINDING = RateLimit(1e12, 1)


def ours_taker(directory: str) -> Callable[[], object]:
    store = FileBucketStore(Path(directory))
    interval = NON_BINDING.interval_ns
    return lambda: store.take(1, interval, 1, None, True)


def pyrate_taker(directory: str) -> Callable[[], object]:
    from pyrate_limiter import Duration, Limiter, Rate, SQLiteBucket

    bucket = SQLiteBucket.init_from_file(
        [Rate(10**9, Duration.SECOND)],
        db_path=str(Path(directory) / "pyrate.sqlite"),
        use_file_lock=False,  # its file lock fails with filelock 4 (TypeError on timeout)
    )
    limiter = Limiter(bucket)
    threading.excepthook = note_thread_death  # its leak thread also meets "database is locked"
    return lambda: limiter.try_acquire("bench", blocking=False)


def note_thread_death(args: threading.ExceptHookArgs) -> None:
    name = args.thread.name if args.thread is not None else "a thread"
    print(f"  ({name} died: {args.exc_value})", file=sys.stderr)


TAKERS: dict[str, Callable[[str], Callable[[], object]]] = {
    "ratebatch file store": ours_taker,
    "pyrate-limiter SQLite": pyrate_taker,
}


def cost_worker(
    name: str,
    directory: str,
    calls: int,
    start: multiprocessing.synchronize.Barrier,
    out: multiprocessing.Queue[tuple[float, int]],
) -> None:
    take = TAKERS[name](directory)
    take()  # open files, create tables
    start.wait()
    errors = 0
    began = time.perf_counter()
    for _ in range(calls):
        try:
            take()
        except sqlite3.OperationalError:  # "database is locked": a failed call, still timed
            errors += 1
    out.put(((time.perf_counter() - began) / calls * 1e6, errors))


def measure_cost(name: str, processes: int, calls: int) -> list[tuple[float, int]]:
    with tempfile.TemporaryDirectory(prefix="contention-") as directory:
        if name == "pyrate-limiter SQLite":
            TAKERS[name](directory)  # create the table once, before the racers
        start = multiprocessing.Barrier(processes)
        out: multiprocessing.Queue[tuple[float, int]] = multiprocessing.Queue()
        workers = [
            multiprocessing.Process(target=cost_worker, args=(name, directory, calls, start, out))
            for _ in range(processes)
        ]
        for worker in workers:
            worker.start()
        results = [out.get(timeout=600) for _ in workers]
        for worker in workers:
            worker.join()
    return results


def fair_worker(
    index: int, directory: str, per_second: float, seconds: float,
    start: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue[tuple[int, list[int]]],
) -> None:  # fmt: skip
    limiter = RateLimiter(RateLimit(per_second * 60, 1), FileBucketStore(Path(directory)))
    start.wait()
    deadline = time.monotonic() + seconds
    admitted = []
    while time.monotonic() < deadline:
        admission = limiter.admit()
        assert admission is not None
        admitted.append(admission.at_ns)
    out.put((index, admitted))


def measure_fairness(processes: int, per_second: float, seconds: float) -> dict[int, list[int]]:
    with tempfile.TemporaryDirectory(prefix="fairness-") as directory:
        start = multiprocessing.Barrier(processes)
        out: multiprocessing.Queue[tuple[int, list[int]]] = multiprocessing.Queue()
        workers = [
            multiprocessing.Process(
                target=fair_worker, args=(index, directory, per_second, seconds, start, out)
            )
            for index in range(processes)
        ]
        for worker in workers:
            worker.start()
        results = dict(out.get(timeout=600) for _ in workers)
        for worker in workers:
            worker.join()
    return results


def longest_starvation(admissions: dict[int, list[int]]) -> int:
    """The most consecutive admissions of other processes between two of one process."""
    timeline = sorted((at, index) for index, times in admissions.items() for at in times)
    last_seen: dict[int, int] = {}
    worst = 0
    for position, (_, index) in enumerate(timeline):
        if index in last_seen:
            worst = max(worst, position - last_seen[index] - 1)
        last_seen[index] = position
    return worst


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--processes", type=int, default=4, help="contending processes")
    parser.add_argument("--calls", type=int, default=5000, help="reservations per process")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--rate", type=float, default=100.0, help="fairness: tokens per second")
    parser.add_argument("--seconds", type=float, default=3.0, help="fairness: duration")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}")
    print(f"cost per reservation, {args.processes} processes contending, {args.calls} calls each")
    costs: dict[str, list[tuple[float, int]]] = {name: [] for name in TAKERS}
    for round_index in range(args.rounds):
        names = list(TAKERS)
        if round_index % 2:
            names.reverse()
        for name in names:
            try:
                costs[name] += measure_cost(name, args.processes, args.calls)
            except ImportError:
                costs[name] = []
    ours = statistics.median(cost for cost, _ in costs["ratebatch file store"])
    for name, results in costs.items():
        if not results:
            print(f"  {name:24} not installed")
            continue
        median = statistics.median(cost for cost, _ in results)
        failed = sum(errors for _, errors in results)
        print(
            f"  {name:24} {median:8.1f} µs/call   {median / ours:5.1f}x ours   "
            f"{failed} of {len(results) * args.calls} calls failed"
        )
    print(
        f"fairness: {args.processes} processes blocking on one file bucket at "
        f"{args.rate:g}/s, burst 1, for {args.seconds:g} s"
    )
    admissions = measure_fairness(args.processes, args.rate, args.seconds)
    counts = [len(admissions[index]) for index in sorted(admissions)]
    total = sum(counts)
    print(f"  admissions per process: {counts} (total {total})")
    print(f"  smallest share: {min(counts) / total:.1%} (even: {1 / args.processes:.1%})")
    print(
        f"  longest run of others' admissions while one waited: {longest_starvation(admissions)} "
        f"(served in turn: <= {args.processes - 1})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
