"""The Redis store: cost of a reservation beside a bare PING, and sessions sharing one key.

Starts its own ``redis-server`` on a free 127.0.0.1 port (Debian package ``redis-server``).

1. *Cost*: round-trip time of one admitted reservation (``RedisBucketStore.take``: one
   EVALSHA of the GCRA script, on the server's clock) beside ``PING`` on the same
   connection kind, interleaved, median µs per call and the ratio. Side by side,
   pyrate-limiter's Redis bucket (``try_acquire``), if installed.
2. *Sharing*: S concurrent pytest sessions (default 3) on one key, each starting N trivial
   tests (default 60) under ``--rate-per-minute R --burst B`` (default 1200/min, burst 5)
   and writing a JSON report. Their admissions, on the server's clock (``store_ns``), are
   merged: the span of starts against the ideal ``(S*N - B) * interval``, and the worst
   excess over ``B + R*w`` in any window (<= 0 means the bound held across all sessions).

Targets (Redis issue): reservation <= 1.3x PING; sharing within 2% of ideal, zero excess.

Reproduce from the repository root::

    python benchmarks/redis_share.py
    python benchmarks/redis_share.py --sessions 4 --tests 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pytest_ratebatch.limits.policy import RateLimit  # noqa: E402
from pytest_ratebatch.stores.redis import RedisBucketStore  # noqa: E402
from pytest_ratebatch.views.report import worst_excess  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402


def per_call_us(call: Callable[[], object], calls: int) -> float:
    began = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - began) / calls * 1e6


def pyrate_call(url: str) -> Callable[[], object] | None:
    try:
        import redis
        from pyrate_limiter import Duration, Limiter, Rate, RedisBucket
    except ImportError:
        return None
    rates = [Rate(10**9, Duration.SECOND)]
    bucket = RedisBucket.init(rates, redis.Redis.from_url(url), "pyrate-bench")
    limiter = Limiter(bucket)
    return lambda: limiter.try_acquire("bench", blocking=False)


def measure_cost(server: RedisServer, calls: int, rounds: int) -> dict[str, list[float]]:
    import redis

    client = redis.Redis.from_url(server.url)
    store = RedisBucketStore(server.url, "bench-cost")
    interval = RateLimit(1e12, 1).interval_ns
    candidates: dict[str, Callable[[], object] | None] = {
        "PING": client.ping,
        "ratebatch reservation": lambda: store.take(1, interval, 1, None, True),
        "pyrate-limiter Redis": pyrate_call(server.url),
    }
    results: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in range(rounds):
        names = list(candidates)
        if round_index % 2:
            names.reverse()
        for name in names:
            call = candidates[name]
            if call is not None:
                call()  # warm: connection, script cache
                results[name].append(per_call_us(call, calls))
    store.close()
    client.close()
    return results


def run_sessions(server: RedisServer, args: argparse.Namespace) -> list[tuple[int, int]]:
    with tempfile.TemporaryDirectory(prefix="redis-share-") as directory:
        path = Path(directory)
        (path / "test_calls.py").write_text(
            "import pytest\n\n"
            f"@pytest.mark.parametrize('n', range({args.tests}))\n"
            "def test_call(n):\n    pass\n"
        )
        key = f"bench-share-{os.getpid()}-{time.monotonic_ns()}"
        env = {
            **os.environ,
            "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        }
        command = [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path),
            f"--rate-per-minute={args.rate_per_minute}", f"--burst={args.burst}",
            f"--ratebatch-store={server.url}", f"--ratebatch-key={key}",
        ]  # fmt: skip
        sessions = [
            subprocess.Popen(
                [*command, f"--ratebatch-report={path / f'r{index}.json'}"],
                cwd=path,
                env=env,
                stdout=subprocess.DEVNULL,
            )
            for index in range(args.sessions)
        ]
        for session in sessions:
            if session.wait(timeout=600) != 0:
                raise SystemExit("a session failed")
        admissions = []
        for index in range(args.sessions):
            report = json.loads((path / f"r{index}.json").read_text())
            admissions += [(test["store_ns"], test["tokens"]) for test in report["tests"]]
        return admissions


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000, help="calls per cost round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved cost rounds")
    parser.add_argument("--sessions", type=int, default=3, help="concurrent pytest sessions")
    parser.add_argument("--tests", type=int, default=60, help="tests per session")
    parser.add_argument("--rate-per-minute", type=float, default=1200.0, help="shared rate")
    parser.add_argument("--burst", type=int, default=5, help="shared burst")
    parser.add_argument("--repeats", type=int, default=3, help="sharing runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}")
    with tempfile.TemporaryDirectory(prefix="redis-bench-") as directory:
        server = RedisServer(Path(directory)).start()
        try:
            version = server.client().info()["redis_version"]
            print(f"redis-server {version} on 127.0.0.1:{server.port}")
            costs = measure_cost(server, args.calls, args.rounds)
            ping = statistics.median(costs["PING"])
            print(f"cost per call (median of {args.rounds} rounds of {args.calls} calls)")
            for name, values in costs.items():
                if not values:
                    print(f"  {name:24} not installed")
                    continue
                median = statistics.median(values)
                print(f"  {name:24} {median:7.1f} µs   {median / ping:4.2f}x PING")
            interval = RateLimit(args.rate_per_minute, args.burst).interval_ns
            total = args.sessions * args.tests
            ideal = (total - args.burst) * interval
            print(
                f"{args.sessions} sessions x {args.tests} tests on one key, "
                f"{args.rate_per_minute:g}/min, burst {args.burst}: ideal span {ideal / 1e9:.3f} s"
            )
            deviations = []
            for repeat in range(args.repeats):
                admissions = run_sessions(server, args)
                times = sorted(time for time, _ in admissions)
                span = times[-1] - times[0]
                deviation = (span - ideal) / ideal
                deviations.append(deviation)
                excess = worst_excess(admissions, interval, args.burst)
                print(
                    f"  run {repeat + 1}: {len(admissions)} starts, span {span / 1e9:.3f} s "
                    f"({deviation:+.2%} vs ideal), worst excess {excess:+.6f} tokens"
                )
            print(f"  median deviation {statistics.median(deviations):+.2%}")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
