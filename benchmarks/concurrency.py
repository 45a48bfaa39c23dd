"""The concurrency cap (G8): calls in flight, counted by the server they reach.

A small HTTP server on 127.0.0.1 counts the requests in flight and records the most it saw
at once; each request takes ``--hold`` seconds (default 0.3) to answer. A generated suite
of N tests (default 20), each making one call (``urllib.request.urlopen``), runs under
``-n W --max-concurrency C`` (default 4 workers, cap 2):

* with the file store (one session, its workers sharing the session's directory);
* with a Redis store (``--ratebatch-store redis://...``; the script starts its own
  ``redis-server`` on a free port, Debian package ``redis-server``);
* and, as a reference, the same workers without a cap.

For each it prints the most calls in flight the server saw (each run) and the span from
the first call's arrival to the last call's answer (median of the runs) beside the ideal
``N / C * hold`` (3.0 s by default): the calls of one slot follow each other back to back.
Targets: at most C in flight; span within 10% of the ideal.

Reproduce from the repository root::

    python benchmarks/concurrency.py              # about a minute
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

from tables import print_table

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.redis_server import RedisServer  # noqa: E402

SUITE = """
import os
import urllib.request
import pytest

URL = os.environ["API_URL"]

@pytest.mark.parametrize("n", range({tests}))
def test_call(n):
    with urllib.request.urlopen(URL, timeout=60) as response:
        assert response.read() == b"ok"
"""


class CountingServer:
    """Answers every GET after ``hold`` seconds; counts the requests in flight."""

    def __init__(self, hold: float) -> None:
        self.hold = hold
        self.in_flight = 0
        self.most = 0
        self.first: float | None = None
        self.last: float | None = None
        self.calls = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    now = time.monotonic()
                    server.first = now if server.first is None else server.first
                    server.in_flight += 1
                    server.calls += 1
                    server.most = max(server.most, server.in_flight)
                time.sleep(server.hold)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
                self.wfile.flush()
                with server._lock:
                    server.in_flight -= 1
                    server.last = time.monotonic()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Run(NamedTuple):
    passed: bool
    calls: int
    most: int
    span: float


def run_suite(directory: Path, args: argparse.Namespace, extra: list[str]) -> Run:
    suite = directory / "suite"
    suite.mkdir(parents=True)
    (suite / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    (suite / "test_calls.py").write_text(SUITE.format(tests=args.tests), encoding="utf-8")
    server = CountingServer(args.hold)
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
        env["API_URL"] = server.url
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        )
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                   "no:randomly", "-n", str(args.workers), *extra]  # fmt: skip
        result = subprocess.run(
            command, cwd=suite, env=env, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
            print(f"  {' '.join(command)} failed:\n{tail}", file=sys.stderr)
        span = (server.last or 0.0) - (server.first or 0.0)
        return Run(result.returncode == 0, server.calls, server.most, span)
    finally:
        server.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Calls in flight under --max-concurrency, counted by the server, with the "
        "file and the Redis store.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--tests", "-N", type=int, default=20, help="tests (one call each)")
    parser.add_argument("--cap", "-C", type=int, default=2, help="--max-concurrency")
    parser.add_argument("--workers", "-n", type=int, default=4, help="pytest-xdist workers")
    parser.add_argument("--hold", type=float, default=0.3, help="seconds each call takes")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant")
    args = parser.parse_args(argv)
    if min(args.tests, args.cap, args.workers, args.repeats) < 1 or not args.hold > 0:
        parser.error("--tests, --cap, --workers, --repeats must be >= 1 and --hold > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
    ideal = args.tests / args.cap * args.hold
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}")
    print(
        f"{args.tests} one-call tests of {args.hold:g} s, -n {args.workers}, "
        f"--max-concurrency {args.cap}: ideal span {ideal:.2f} s; {args.repeats} runs each"
    )
    print()
    cap = [f"--max-concurrency={args.cap}"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ratebatch-concurrency-") as tmp:
        server = RedisServer(Path(tmp)).start()
        try:
            variants = [
                ("file store", cap, f"<= {args.cap} in flight, span <= 1.10x"),
                (
                    "Redis store",
                    [*cap, f"--ratebatch-store={server.url}", "--ratebatch-key=bench"],
                    f"<= {args.cap} in flight, span <= 1.10x",
                ),
                ("no cap (reference)", ["--rate-per-minute=1000000"], "-"),
            ]
            runs: dict[str, list[Run]] = {name: [] for name, _, _ in variants}
            for repeat in range(args.repeats):  # interleaved: the machine's load hits all alike
                for index, (name, extra, _) in enumerate(variants):
                    run = run_suite(Path(tmp) / f"{repeat}-{index}", args, extra)
                    runs[name].append(run)
                    print(f"  {name} #{repeat + 1}: {run}", file=sys.stderr)
        finally:
            server.stop()
    for name, _, target in variants:
        spans = [run.span for run in runs[name]]
        median = statistics.median(spans)
        rows.append(
            (
                name,
                "/".join("yes" if run.passed else "NO" for run in runs[name]),
                "/".join(str(run.calls) for run in runs[name]),
                "/".join(str(run.most) for run in runs[name]),
                f"{median:.3f}",
                f"{median / ideal:.3f}",
                target,
            )
        )
    header = ("variant", "all passed", "calls", "most in flight", "span s", "span/ideal", "target")
    print_table(header, rows)
    print()
    print("most in flight, calls: each run, as the server counted them; span: median of the")
    print(f"runs, first call's arrival to last call's answer; ideal {ideal:.2f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
