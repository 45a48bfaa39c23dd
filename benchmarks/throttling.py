"""Throttling handled (G6): a suite against a real nginx that refuses with 429.

What is measured: a generated suite of N one-call tests (default 60), each
``requests.get(URL).raise_for_status()``, so a 429 surfaces as the client's own exception,
runs against nginx's ``limit_req`` on 127.0.0.1 (300 requests a minute, ``burst=3 nodelay``:
a bucket of 4, refilled one every 200 ms, refusing the excess with 429), with and without a
``Retry-After: 1`` header on the 429 (``error_page 429`` and ``add_header ... always``).
From nginx's access log (arrival times to the millisecond, and statuses):

* the 429s the server sent;
* the span from the first to the last accepted request, against the server's ideal
  ``(N - 4) / 5 per second``;
* with ``Retry-After``, requests that arrived inside a Retry-After window, 50 ms after a
  429 and before the second it asked for was up (the 50 ms leave room for requests that
  were already on their way when the 429 was sent).

Scenarios, side by side in one run:

* ``auto``, one process and ``-n 4``: ``--rate-per-minute auto``, no known limit (target:
  all pass, at most 4 and 8 429s, span at most 1.2x the ideal);
* ``900/min -n 4``: a rate configured 3x too high, with ``Retry-After: 1`` (target: all pass,
  no request inside a Retry-After, at most 5 429s, span at most 1.25x);
* ``observe``: the ``ratebatch`` fixture's ``observe()`` in a client hook, against a server
  (Python, on 127.0.0.1) that publishes ``X-RateLimit-Remaining`` / ``X-RateLimit-Reset`` for
  a fixed window of 10 requests per 2 seconds, and refuses beyond it (target: zero 429s);
* the anchor: botocore's adaptive retry mode (its ``ClientRateLimiter``, a CUBIC rate with
  a token bucket, and its standard backoff ``rand * min(2 ** (attempt - 1), 20)`` seconds)
  driving the same N calls, in one process and in 4 independent processes.

Needs nginx (Debian package ``nginx``), requests and botocore (``pip install -e ".[bench]"``).
Reproduce from the repository root::

    python benchmarks/throttling.py                 # about 3 minutes
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

from tables import print_table

REPO_ROOT = Path(__file__).resolve().parent.parent
RATE = 5.0  # nginx: 300r/m
CAPACITY = 4  # burst=3 nodelay: the first request, and 3 more

NGINX_CONF = """
daemon off;
{user}
worker_processes 1;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp;
    scgi_temp_path {prefix}/tmp;
    log_format timed '$msec $status';
    limit_req_zone $binary_remote_addr zone=api:1m rate=300r/m;
    limit_req_status 429;
    server {{
        listen 127.0.0.1:{port};
        access_log {prefix}/access.log timed;
        root {prefix}/www;
        location / {{
            # A static file: "return" would answer before limit_req's phase.
            limit_req zone=api burst=3 nodelay;
            {error_page}
            try_files /ok.txt =404;
        }}
        location @throttled {{
            add_header Retry-After 1 always;
            return 429 "slow down";
        }}
    }}
}}
"""

SUITE = """
import os
import pytest
import requests

URL = os.environ["API_URL"]

@pytest.mark.parametrize("n", range({tests}))
def test_call(n):
    requests.get(URL, timeout=30).raise_for_status()
"""

OBSERVING_SUITE = """
import os
import pytest
import requests

URL = os.environ["API_URL"]

@pytest.fixture(scope="session")
def session():
    return requests.Session()

@pytest.fixture
def client(session, ratebatch):
    session.hooks["response"] = [lambda response, *args, **kwargs: ratebatch.observe(response)]
    return session

@pytest.mark.parametrize("n", range({tests}))
def test_call(client, n):
    client.get(URL, timeout=30).raise_for_status()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Nginx:
    """nginx with ``limit_req`` in a directory of its own, on a free port."""

    def __init__(self, directory: Path, retry_after: bool) -> None:
        self.prefix = directory
        (directory / "tmp").mkdir(parents=True, exist_ok=True)
        (directory / "www").mkdir(exist_ok=True)
        (directory / "www" / "ok.txt").write_text("ok", encoding="utf-8")
        self.port = free_port()
        error_page = "error_page 429 = @throttled;" if retry_after else ""
        # As root nginx would run its worker as nobody, who cannot read a private temp dir.
        user = "user root;" if os.geteuid() == 0 else ""
        conf = NGINX_CONF.format(prefix=directory, port=self.port, error_page=error_page, user=user)
        (directory / "nginx.conf").write_text(conf, encoding="utf-8")
        self.log = directory / "access.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def __enter__(self) -> Nginx:
        self.process = subprocess.Popen(
            ["nginx", "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise SystemExit(f"nginx did not start; see {self.prefix / 'error.log'}")

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def entries(self) -> list[tuple[float, int]]:
        lines = self.log.read_text(encoding="utf-8").split("\n") if self.log.exists() else []
        entries = []
        for line in lines:
            if line.strip():
                stamp, status = line.split()
                entries.append((float(stamp), int(status)))
        return sorted(entries)


class BudgetServer:
    """A fixed window of ``limit`` requests per ``window`` seconds that says what is left."""

    def __init__(self, limit: int = 10, window: float = 2.0) -> None:
        self.limit = limit
        self.window = window
        self.log: list[tuple[float, int]] = []
        self._start = time.time()
        self._used = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    now = time.time()
                    if now - server._start >= server.window:
                        server._start += (now - server._start) // server.window * server.window
                        server._used = 0
                    refused = server._used >= server.limit
                    server._used += not refused
                    status = 429 if refused else 200
                    server.log.append((now, status))
                    left = server.limit - server._used
                    reset = server._start + server.window
                self.send_response(status)
                self.send_header("X-RateLimit-Limit", str(server.limit))
                self.send_header("X-RateLimit-Remaining", str(left))
                self.send_header("X-RateLimit-Reset", f"{reset:.3f}")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def entries(self) -> list[tuple[float, int]]:
        with self._lock:
            return sorted(self.log)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Outcome(NamedTuple):
    passed: int
    refused: int
    span: float
    inside: int | None  # requests inside a Retry-After window (None: no Retry-After)


def measure(entries: list[tuple[float, int]], retry_after: bool) -> tuple[int, float, int | None]:
    accepted = [at for at, status in entries if status == 200]
    refused = [at for at, status in entries if status == 429]
    span = accepted[-1] - accepted[0] if len(accepted) > 1 else 0.0
    inside = None
    if retry_after:
        inside = sum(any(at + 0.05 < other < at + 1.0 for at in refused) for other, _ in entries)
    return len(refused), span, inside


def run_suite(
    directory: Path, url: str, args: list[str], workers: int, observing: bool, tests: int
) -> int:
    """Run the generated suite with the plugin; the number of tests that passed."""
    suite = directory / "suite"
    if suite.exists():
        shutil.rmtree(suite)
    suite.mkdir()
    (suite / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    source = (OBSERVING_SUITE if observing else SUITE).format(tests=tests)
    (suite / "test_api.py").write_text(source, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    env["API_URL"] = url
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    report = suite / "report.json"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)]
    command += ["-p", "no:randomly", f"--ratebatch-report={report}", *args]
    if workers:
        command += ["-n", str(workers)]
    result = subprocess.run(
        command, cwd=suite, env=env, capture_output=True, text=True, check=False
    )
    if not report.exists():
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
        raise SystemExit(f"no report from {' '.join(command)}\n{tail}")
    tests_run = json.loads(report.read_text())["tests"]
    return sum(test["outcome"] == "passed" for test in tests_run)


# --- the anchor: botocore's adaptive mode ---------------------------------------------


def botocore_calls(url: str, calls: int, seed: int) -> int:
    """``calls`` calls through botocore's adaptive rate limiter and standard backoff; the
    number that succeeded."""
    import requests
    from botocore.retries import adaptive, bucket, standard, throttling

    random.seed(seed)
    clock = bucket.Clock()
    limiter = adaptive.ClientRateLimiter(
        rate_adjustor=throttling.CubicCalculator(
            starting_max_rate=0, start_time=clock.current_time()
        ),
        rate_clocker=adaptive.RateClocker(clock),
        token_bucket=bucket.TokenBucket(max_rate=1, clock=clock),
        throttling_detector=standard.ThrottlingErrorDetector(
            retry_event_adapter=standard.RetryEventAdapter()
        ),
        clock=clock,
    )
    succeeded = 0
    with requests.Session() as session:
        for _ in range(calls):
            for attempt in range(1, 11):
                limiter.on_sending_request(request=None)
                response = session.get(url, timeout=30)
                parsed: dict[str, Any] = {"ResponseMetadata": {"HTTPStatusCode": 200}}
                if response.status_code == 429:
                    parsed = {
                        "Error": {"Code": "Throttling"},
                        "ResponseMetadata": {"HTTPStatusCode": 429},
                    }
                limiter.on_receiving_response(
                    response=(response, parsed),
                    caught_exception=None,
                    attempts=attempt,
                    operation=None,
                    request_dict={"context": {}},
                )
                if response.status_code != 429:
                    succeeded += 1
                    break
                time.sleep(random.random() * min(2 ** (attempt - 1), 20))
    return succeeded


def _botocore_worker(args: tuple[str, int, int]) -> int:
    return botocore_calls(*args)


def run_anchor(url: str, processes: int, tests: int) -> int:
    if processes == 1:
        return botocore_calls(url, tests, 1)
    share = [tests // processes + (i < tests % processes) for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        return sum(pool.map(_botocore_worker, [(url, n, i) for i, n in enumerate(share)]))


# --- the scenarios --------------------------------------------------------------------


class Scenario(NamedTuple):
    name: str
    retry_after: bool
    run: Callable[[Path, str, int], int]  # (directory, url, tests) -> tests passed
    target: str


def plugin(args: list[str], workers: int, observing: bool = False) -> Callable[..., int]:
    def run(directory: Path, url: str, tests: int) -> int:
        return run_suite(directory, url, args, workers, observing, tests)

    return run


def anchor(processes: int) -> Callable[..., int]:
    def run(directory: Path, url: str, tests: int) -> int:
        return run_anchor(url, processes, tests)

    return run


AUTO = ["--rate-per-minute=auto"]
SCENARIOS = [
    Scenario("auto, 1 process", False, plugin(AUTO, 0), "<= 4 429s, span <= 1.2x"),
    Scenario("auto, 1 process, Retry-After", True, plugin(AUTO, 0), "<= 4 429s, span <= 1.2x"),
    Scenario("auto, -n 4", False, plugin(AUTO, 4), "<= 8 429s, span <= 1.2x"),
    Scenario("auto, -n 4, Retry-After", True, plugin(AUTO, 4), "<= 8 429s, span <= 1.2x"),
    Scenario(
        "900/min, -n 4, Retry-After",
        True,
        plugin(["--rate-per-minute=900"], 4),
        "<= 5 429s, none inside, span <= 1.25x",
    ),
    Scenario("botocore adaptive, 1 process", False, anchor(1), "anchor"),
    Scenario("botocore adaptive, 1 process, Retry-After", True, anchor(1), "anchor"),
    Scenario("botocore adaptive, 4 processes", False, anchor(4), "anchor"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="A suite of one-call tests against nginx limit_req: 429s and span with "
        "the plugin (auto, too high a rate, observe) beside botocore's adaptive mode.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--tests", "-N", type=int, default=60, help="tests (one call each)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each scenario")
    parser.add_argument(
        "--only", default="", help="run only the scenarios whose name contains this text"
    )
    args = parser.parse_args(argv)
    if args.tests <= CAPACITY or args.repeats < 1:
        parser.error(f"--tests must be > {CAPACITY}, --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("nginx") is None:
        raise SystemExit("nginx is required (Debian package nginx)")
    ideal = (args.tests - CAPACITY) / RATE
    print(
        f"python {sys.version.split()[0]}; nginx limit_req 300r/m burst=3 nodelay; "
        f"{args.tests} one-call tests; ideal span {ideal:.1f}s; {args.repeats} runs each"
    )
    print()
    rows: list[tuple[str, str, list[Outcome]]] = []
    with tempfile.TemporaryDirectory(prefix="ratebatch-throttling-") as tmp:
        for scenario in SCENARIOS:
            if args.only not in scenario.name:
                continue
            outcomes = []
            for repeat in range(args.repeats):
                directory = Path(tmp) / f"{len(rows)}-{repeat}"
                with Nginx(directory, scenario.retry_after) as nginx:
                    passed = scenario.run(directory, nginx.url, args.tests)
                    time.sleep(0.2)  # let nginx write its log
                    refused, span, inside = measure(nginx.entries(), scenario.retry_after)
                outcomes.append(Outcome(passed, refused, span, inside))
                print(f"  {scenario.name} #{repeat + 1}: {outcomes[-1]}", file=sys.stderr)
            rows.append((scenario.name, scenario.target, outcomes))
        budget = []
        for repeat in range(args.repeats if args.only in "observe" else 0):
            server = BudgetServer()
            try:
                directory = Path(tmp) / f"budget-{repeat}"
                directory.mkdir()
                passed = run_suite(directory, server.url, AUTO, 0, True, args.tests)
                refused, span, _ = measure(server.entries(), False)
            finally:
                server.close()
            budget.append(Outcome(passed, refused, span, None))
            print(f"  observe #{repeat + 1}: {budget[-1]}", file=sys.stderr)
    header = ("scenario", "passed", "429s", "span s", "span/ideal", "inside", "target")
    table = []
    for name, target, outcomes in rows:
        spans = [outcome.span for outcome in outcomes]
        insides = [outcome.inside for outcome in outcomes if outcome.inside is not None]
        table.append(
            (
                name,
                "/".join(str(outcome.passed) for outcome in outcomes),
                "/".join(str(outcome.refused) for outcome in outcomes),
                f"{statistics.median(spans):.2f}",
                f"{statistics.median(spans) / ideal:.3f}",
                "/".join(map(str, insides)) if insides else "-",
                target,
            )
        )
    table.append(
        (
            "observe, fixed window 10/2s (Python server)" if budget else "observe: not run",
            "/".join(str(outcome.passed) for outcome in budget),
            "/".join(str(outcome.refused) for outcome in budget),
            f"{statistics.median(outcome.span for outcome in budget):.2f}" if budget else "-",
            "-",
            "-",
            "0 429s",
        )
    )
    print_table(header, table)
    print()
    print("passed, 429s, inside: each run; span: median of the runs (first to last accepted")
    print("request); inside: requests that arrived 50 ms to 1 s after a 429 with Retry-After.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
