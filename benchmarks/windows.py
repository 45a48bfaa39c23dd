"""Window limits (G7): "10/2s, 25/10s" held exactly and greedily, and what a window costs.

1. *A suite against a server that enforces two windows.* A small HTTP server, in a process
   of its own on 127.0.0.1, enforces "10 per 2 s and 25 per 10 s" with the ``limits``
   library, an implementation independent of this project: its moving window
   (``MovingWindowRateLimiter``) or, as a second server, its fixed window
   (``FixedWindowRateLimiter``, a window that starts at its first hit), both over
   ``MemoryStorage``. A request is accepted only if both limits allow it: under one lock the
   server ``test``s both and, if both allow, ``hit``s both; otherwise it answers 429 and
   counts the request against neither (a refused request uses no budget). It logs each
   request's arrival (``time.monotonic_ns()``, the clock the plugin's memory and file stores
   use, and the wall clock), status, test (an ``X-Test`` header) and, for a 429, which
   limits refused it; and it decides on that very arrival time (the clock of
   ``limits.storage.memory`` is pinned to it while the request is decided, so that the log
   explains every decision exactly).

   A generated suite of N one-call tests (default 60; each ``urllib.request.urlopen``, so a
   429 raises and fails the test) runs in one process and with ``-n 3``, in these variants:

   * ``ratebatch --rate-limit``: ``--rate-limit "10/2s, 25/10s"`` (memory store in one
     process, the file store under ``-n 3``);
   * ``ratebatch bucket``: the hand-mapped bucket, ``--rate-per-minute 120 --burst 5``
     (5 + 2w <= 10 in 2 s and 5 + 20 = 25 in 10 s: safe for both windows, and slower);
   * ``pyrate-limiter``: its ``Limiter([Rate(10, 2 s), Rate(25, 10 s)])`` (a sliding-window
     log), ``try_acquire`` blocking in a ``pytest_runtest_call`` hook of the suite's
     conftest, with ``-p no:ratebatch``: its ``InMemoryBucket`` in one process, and under
     ``-n 3`` its ``SQLiteBucket.init_from_file(..., use_file_lock=True)`` on one database
     file (the bucket pyrate-limiter offers for processes it did not start: its
     ``MultiprocessBucket`` needs a ``multiprocessing`` manager and lock inherited from a
     parent, which xdist's workers are not); it needs ``filelock``
     (``pip install "pyrate-limiter[filelock]"``);
   * ``ratebatch Redis, 2 sessions``: two concurrent one-process sessions of N/2 tests each
     sharing ``--rate-limit "10/2s, 25/10s"`` on one Redis key (``redis-server`` started on
     a free 127.0.0.1 port).

   The plugin's variants run with ``--throttle-retries 0``, so that a 429 fails its test as
   in the other variants instead of being retried (G6). The greedy ideal: 10 starts at 0,
   2 and 10 s ... the 25/10s window lets the 60th start at 20 s, so the span from the first
   to the last accepted request is ideally 20 s (for N = 60; in general the time at which
   greedy starts reach N). Printed per variant: tests passed and 429s (each run), the span
   (median of the runs) and its ratio to the ideal, and the *slack*: the smallest
   ``a[i] - a[i-n] - w`` over the accepted arrivals ``a`` and both limits ``n/w``, the
   closest the traffic came to a window's edge (negative: a window held more than its
   limit). For the plugin's variants also the *admitted slack*, the same over the admissions
   in the JSON report (the limiter's own view: at least the 50 ms kept beyond each window,
   ``WINDOW_MARGIN_NS``, when every window held), and the *delay spread*: the largest
   difference, across a run's tests, of the time from admission (the JSON report) to
   arrival at the server, with and without each process's first test (the margin must
   cover it). A 429 is
   explained from the server's log and the reports: which limit refused it, how early it
   came, over how long the requests in that window were admitted and over how long they
   arrived, and which of them took longest and shortest from admission to the server.

   Targets: ``--rate-limit`` zero 429s on both servers, span within 2% of the ideal.

2. *Admission cost.* ``RateLimiter.take(1)`` with a 10,000/day window
   (``RateLimiter(UNLIMITED, store, windows=parse_windows("10000/day"))``) beside the GCRA
   bucket alone (``RateLimiter(RateLimit(1e12, 1), store)``), on each store: memory, file
   (``FileBucketStore``) and Redis (``RedisBucketStore``, with a bare ``PING`` beside it). Each
   round takes C calls (default 9,000: a 10,000/day window never waits for them) on a fresh
   store or key, every candidate once, in an order that rotates between rounds, the garbage
   collector off, timed in blocks of 100 calls. Printed, as medians of the rounds: µs per
   call, as the mean over all calls and as the median of the blocks (which ignores the
   blocks another process's time slice fell into), the same over the first and the last
   1,000 calls (flat: a window's state is a ring of its last ``count`` starts, and each check
   reads one entry), what the window adds to the bucket alone; for Redis, EVALSHA calls per
   ``take`` and the server's µs per EVALSHA (``INFO commandstats``). Target: the window
   adds a few µs at most per call in memory and file, and stays one round trip on Redis.

Timing on a shared machine is noisy: the variants are interleaved (rotating order) in each
of the repeats, and the tables quote medians.

Needs ``limits``, ``pyrate-limiter`` (and ``filelock``), ``redis`` (the ``bench`` extra) and
``redis-server`` (Debian package ``redis-server``). Reproduce from the repository root::

    python benchmarks/windows.py                      # about 20 minutes
    python benchmarks/windows.py --repeats 1 --only "ratebatch --rate-limit" --no-cost
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

from tables import print_table

REPO_ROOT = Path(__file__).resolve().parent.parent
LIMITS = "10/2s, 25/10s"
WINDOWS = ((10, 2.0), (25, 10.0))  # (count, seconds), as the server enforces them
STRATEGIES = {"moving": "MovingWindowRateLimiter", "fixed": "FixedWindowRateLimiter"}
SPAN_TARGET = 0.02
BLOCK = 100  # calls per timed block in the cost part
EDGE = 1000  # the first and the last calls compared

# --- the server -------------------------------------------------------------------------


class PinnedClock:
    """Stands in for the ``time`` module in ``limits.storage.memory``: while a request is
    decided, the deciding thread reads the one arrival time the server logs; every other
    thread (and the deciding one otherwise) the real clock."""

    def __init__(self) -> None:
        self._local = threading.local()

    def time(self) -> float:
        pinned: float | None = getattr(self._local, "pinned", None)
        return time.time() if pinned is None else pinned

    def pin(self, wall_ns: int | None) -> None:
        self._local.pinned = None if wall_ns is None else wall_ns / 1e9


def serve(strategy: str) -> None:
    """Run the rate-limited server until terminated; print its port first."""
    import limits
    import limits.storage
    import limits.storage.memory
    import limits.strategies

    clock = PinnedClock()
    limits.storage.memory.time = clock  # type: ignore[attr-defined,assignment]
    limiter = getattr(limits.strategies, STRATEGIES[strategy])(limits.storage.MemoryStorage())
    items = [
        (f"{count}/{seconds:g}s", limits.RateLimitItemPerSecond(count, int(seconds)))
        for count, seconds in WINDOWS
    ]
    lock = threading.Lock()
    log: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/_log":
                with lock:
                    body = json.dumps(log).encode()
                self._answer(200, body)
                return
            with lock:
                at, wall = time.monotonic_ns(), time.time_ns()
                clock.pin(wall)
                try:
                    refused = [name for name, item in items if not limiter.test(item, "key")]
                    if not refused and not all(limiter.hit(item, "key") for _, item in items):
                        raise RuntimeError("a hit refused what its test allowed")
                finally:
                    clock.pin(None)
                status = 429 if refused else 200
                log.append(
                    {
                        "at": at,
                        "wall": wall,
                        "status": status,
                        "test": self.headers.get("X-Test", ""),
                        "refused": refused,
                    }
                )
            self._answer(status, b"slow down" if refused else b"ok")

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"port {server.server_address[1]}", flush=True)
    server.serve_forever()


class Entry(NamedTuple):
    at: int  # arrival, time.monotonic_ns()
    wall: int  # arrival, time.time_ns()
    status: int
    test: str
    refused: list[str]


class Server:
    """``serve`` in a process of its own."""

    def __init__(self, strategy: str) -> None:
        self.strategy = strategy
        self.process: subprocess.Popen[str] | None = None
        self.port = 0

    def __enter__(self) -> Server:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", self.strategy],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("port "):
            raise SystemExit(f"the {self.strategy} server did not start")
        self.port = int(line.split()[1])
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def entries(self) -> list[Entry]:
        with urllib.request.urlopen(self.url + "_log", timeout=30) as response:
            return sorted(Entry(**entry) for entry in json.load(response))


# --- the suite --------------------------------------------------------------------------

SUITE = """
import os
import urllib.request

import pytest

URL = os.environ["API_URL"]
FIRST = int(os.environ.get("FIRST_TEST", "0"))


@pytest.mark.parametrize("n", range(FIRST, FIRST + {tests}))
def test_call(n):
    request = urllib.request.Request(URL, headers={{"X-Test": str(n)}})
    with urllib.request.urlopen(request, timeout=30) as response:  # a 429 raises
        assert response.status == 200
"""

PYRATE_CONFTEST = """
import os

import pytest
from pyrate_limiter import Duration, InMemoryBucket, Limiter, Rate, SQLiteBucket

RATES = [Rate(10, Duration.SECOND * 2), Rate(25, Duration.SECOND * 10)]
LIMITER = None


def pytest_configure(config):
    global LIMITER
    if hasattr(config, "workerinput"):  # an xdist worker: one bucket for all of them
        bucket = SQLiteBucket.init_from_file(
            RATES, db_path=os.environ["PYRATE_DB"], use_file_lock=True
        )
        LIMITER = Limiter(bucket)
    elif config.getoption("numprocesses", None) is None:  # one process
        LIMITER = Limiter(InMemoryBucket(RATES))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    LIMITER.try_acquire("api")  # blocks until both rates allow


def pytest_unconfigure(config):
    if LIMITER is not None:
        LIMITER.close()
"""


class Admission(NamedTuple):
    """A test's admission, from the plugin's JSON report."""

    at: int  # ns: on the wall clock (Redis TIME) if ``wall``, else monotonic since the start
    wall: bool
    process: str  # the session and xdist worker that ran it
    first: bool  # the first test its process started


class Run(NamedTuple):
    passed: int
    refused: int
    span: float  # seconds, first to last accepted request
    slack: tuple[float, str]  # seconds, and the limit
    spread: float | None  # seconds: admission-to-arrival delay, max - min
    spread_rest: float | None  # the same without each process's first test
    admitted_slack: tuple[float, str] | None  # slack of the admissions (the plugin's variants)
    explained: list[str]  # each 429: which limit, how early, and why


def greedy_ideal(tests: int) -> float:
    """When greedy starts reach ``tests`` under ``WINDOWS``, the first at 0 (seconds)."""
    starts: list[float] = []
    now = 0.0
    while len(starts) < tests:
        allowed = now
        for count, seconds in WINDOWS:
            if len(starts) >= count:
                allowed = max(allowed, starts[-count] + seconds)
        starts.append(allowed)
        now = allowed
    return starts[-1] - starts[0]


def read_admissions(reports: list[Path]) -> dict[str, Admission] | None:
    """Each test's admission, by its number (the ``X-Test`` header), from the reports."""
    admissions: dict[str, Admission] = {}
    for index, path in enumerate(reports):
        if not path.exists():
            return None
        tests = json.loads(path.read_text(encoding="utf-8"))["tests"]
        seen: set[str] = set()
        for test in sorted(tests, key=lambda test: test.get("start_ns") or 0):
            if test.get("start_ns") is None:
                continue
            n = test["nodeid"].rpartition("[")[2].rstrip("]")
            process = f"session {index + 1}" + (f" {test['worker']}" if test["worker"] else "")
            first = process not in seen
            seen.add(process)
            if test.get("store_ns") is not None:  # Redis: the server's TIME, a wall clock
                admissions[n] = Admission(test["store_ns"], True, process, first)
            else:
                admissions[n] = Admission(test["start_ns"], False, process, first)
    return admissions


def _delay(entry: Entry, admission: Admission) -> int:
    """Arrival less admission, ns (plus a constant per session for monotonic admissions:
    only differences within a session count)."""
    return (entry.wall if admission.wall else entry.at) - admission.at


def measure(entries: list[Entry], passed: int, admissions: dict[str, Admission] | None) -> Run:
    accepted = [entry for entry in entries if entry.status == 200]
    span = (accepted[-1].at - accepted[0].at) / 1e9 if len(accepted) > 1 else 0.0
    slack = (float("inf"), "-")
    for count, seconds in WINDOWS:
        for index in range(count, len(accepted)):
            gap = (accepted[index].at - accepted[index - count].at) / 1e9 - seconds
            if gap < slack[0]:
                slack = (gap, f"{count}/{seconds:g}s")
    known = admissions or {}
    explained = []
    for entry in entries:
        if entry.status == 429:
            explained.append(explain(entry, accepted, known))
    spread = spread_rest = None
    delays = [(_delay(e, known[e.test]), known[e.test].first) for e in accepted if e.test in known]
    if delays:
        spread = (max(d for d, _ in delays) - min(d for d, _ in delays)) / 1e9
        rest = [d for d, first in delays if not first]
        spread_rest = (max(rest) - min(rest)) / 1e9 if rest else None
    refused = sum(entry.status == 429 for entry in entries)
    return Run(
        passed, refused, span, slack, spread, spread_rest, admitted_slack(admissions), explained
    )


def explain(entry: Entry, accepted: list[Entry], admissions: dict[str, Admission]) -> str:
    """Which limit refused a request, how early it came, and the admissions behind it."""
    before = [other for other in accepted if other.at < entry.at]
    reasons = []
    for count, seconds in WINDOWS:
        name = f"{count}/{seconds:g}s"
        if name not in entry.refused or len(before) < count:
            continue
        oldest = before[-count]  # the count-th most recent accepted arrival
        early = (oldest.at + seconds * 1e9 - entry.at) / 1e6
        reason = (
            f"{name}: {early:.1f} ms early, {count} accepted since test {oldest.test} "
            f"({(entry.at - oldest.at) / 1e6:.1f} ms before)"
        )
        window = [*before[-count:], entry]  # count + 1 requests within less than the window
        known = [(other, admissions[other.test]) for other in window if other.test in admissions]
        if len(known) == len(window) and len({admission.wall for _, admission in known}) == 1:
            times = [admission.at for _, admission in known]
            slowest = max(known, key=lambda pair: _delay(*pair))
            fastest = min(known, key=lambda pair: _delay(*pair))
            reason += (
                f"; these {count + 1} were admitted over {(max(times) - min(times)) / 1e6:.1f} ms"
                f" and arrived over {(entry.at - oldest.at) / 1e6:.1f} ms: test "
                f"{slowest[0].test} ({_where(slowest[1])}) took "
                f"{(_delay(*slowest) - _delay(*fastest)) / 1e6:.1f} ms longer from admission "
                f"to the server than test {fastest[0].test} ({_where(fastest[1])})"
            )
        reasons.append(reason)
    return f"test {entry.test} refused by " + ("; ".join(reasons) or "?")


def _where(admission: Admission) -> str:
    return admission.process + (", its first test" if admission.first else "")


def admitted_slack(admissions: dict[str, Admission] | None) -> tuple[float, str] | None:
    """The limiter's own view: the smallest ``t[i] - t[i-n] - w`` over the admissions ``t``
    (at least the 50 ms margin if the windows held on admission)."""
    if not admissions or len({admission.wall for admission in admissions.values()}) != 1:
        return None
    times = sorted(admission.at for admission in admissions.values())
    slack = (float("inf"), "-")
    for count, seconds in WINDOWS:
        for index in range(count, len(times)):
            gap = (times[index] - times[index - count]) / 1e9 - seconds
            if gap < slack[0]:
                slack = (gap, f"{count}/{seconds:g}s")
    return slack


def write_suite(directory: Path, tests: int, pyrate: bool) -> Path:
    suite = directory / "suite"
    suite.mkdir(parents=True)
    (suite / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    (suite / "test_api.py").write_text(SUITE.format(tests=tests), encoding="utf-8")
    if pyrate:
        (suite / "conftest.py").write_text(PYRATE_CONFTEST, encoding="utf-8")
    return suite


def pytest_command(suite: Path, args: list[str], workers: int, junit: Path) -> list[str]:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)]
    command += ["-p", "no:randomly", f"--junitxml={junit}", *args]
    if workers > 1:
        command += ["-n", str(workers)]
    return command


def passed_tests(junit: Path) -> int:
    if not junit.exists():
        return 0
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    return sum(
        int(s.get("tests", 0))
        - sum(int(s.get(kind, 0)) for kind in ("failures", "errors", "skipped"))
        for s in suites
    )


def environment(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    env["API_URL"] = url
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


class Variant(NamedTuple):
    name: str
    workers: int  # 1: one process
    run: Callable[[Path, Server, int], Run]  # (directory, server, tests)


PLUGIN_COMMON = ["--throttle-retries=0"]


def plugin_variant(args: list[str], workers: int) -> Callable[[Path, Server, int], Run]:
    def run(directory: Path, server: Server, tests: int) -> Run:
        suite = write_suite(directory, tests, pyrate=False)
        report = directory / "report.json"
        junit = directory / "junit.xml"
        command = pytest_command(suite, [*PLUGIN_COMMON, *args], workers, junit)
        command.append(f"--ratebatch-report={report}")
        subprocess.run(
            command, cwd=suite, env=environment(server.url), capture_output=True, check=False
        )
        entries = server.entries()
        return measure(entries, passed_tests(junit), read_admissions([report]))

    return run


def pyrate_variant(workers: int) -> Callable[[Path, Server, int], Run]:
    def run(directory: Path, server: Server, tests: int) -> Run:
        suite = write_suite(directory, tests, pyrate=True)
        junit = directory / "junit.xml"
        command = pytest_command(suite, ["-p", "no:ratebatch"], workers, junit)
        env = environment(server.url, PYRATE_DB=str(directory / "pyrate.sqlite"))
        result = subprocess.run(command, cwd=suite, env=env, capture_output=True, check=False)
        if not junit.exists():
            tail = "\n".join(result.stdout.decode().splitlines()[-10:])
            raise SystemExit(f"pyrate-limiter run failed:\n{tail}")
        return measure(server.entries(), passed_tests(junit), None)

    return run


def redis_sessions_variant(url: str, sessions: int) -> Callable[[Path, Server, int], Run]:
    def run(directory: Path, server: Server, tests: int) -> Run:
        key = f"bench-windows-{os.getpid()}-{time.monotonic_ns()}"
        share = [tests // sessions + (i < tests % sessions) for i in range(sessions)]
        processes, reports, junits = [], [], []
        first = 0
        for index, count in enumerate(share):
            session = directory / f"session{index}"
            suite = write_suite(session, count, pyrate=False)
            reports.append(session / "report.json")
            junits.append(session / "junit.xml")
            args = [*PLUGIN_COMMON, f"--rate-limit={LIMITS}", f"--ratebatch-store={url}"]
            args += [f"--ratebatch-key={key}", f"--ratebatch-report={reports[-1]}"]
            env = environment(server.url, FIRST_TEST=str(first))
            first += count
            command = pytest_command(suite, args, 1, junits[-1])
            processes.append(
                subprocess.Popen(
                    command,
                    cwd=suite,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for process in processes:
            process.wait(timeout=600)
        entries = server.entries()
        passed = sum(passed_tests(junit) for junit in junits)
        return measure(entries, passed, read_admissions(reports))

    return run


def pyrate_status() -> str | None:
    """Why the pyrate-limiter variants cannot run, or ``None``."""
    try:
        import filelock  # noqa: F401
        import pyrate_limiter  # noqa: F401
    except ImportError as error:
        return f"not installed ({error.name}): pip install 'pyrate-limiter[filelock]'"
    return None


def variants(redis_url: str) -> list[Variant]:
    rate_limit = [f"--rate-limit={LIMITS}"]
    bucket = ["--rate-per-minute=120", "--burst=5"]
    chosen = []
    for workers in (1, 3):
        where = "1 process" if workers == 1 else f"-n {workers}"
        chosen += [
            Variant(f"ratebatch --rate-limit, {where}", workers,
                    plugin_variant(rate_limit, workers)),
            Variant(f"ratebatch bucket 120/min burst 5, {where}", workers,
                    plugin_variant(bucket, workers)),
        ]  # fmt: skip
        if pyrate_status() is None:
            pyrate = "InMemoryBucket" if workers == 1 else "SQLiteBucket + FileLock"
            chosen.append(
                Variant(f"pyrate-limiter {pyrate}, {where}", workers, pyrate_variant(workers))
            )
    chosen.append(
        Variant(
            "ratebatch --rate-limit, Redis, 2 sessions", 1, redis_sessions_variant(redis_url, 2)
        )
    )
    return chosen


def run_suites(args: argparse.Namespace, redis_url: str) -> None:
    ideal = greedy_ideal(args.tests)
    chosen = [variant for variant in variants(redis_url) if args.only in variant.name]
    print(
        f"\n1. {args.tests} one-call tests against a server enforcing {LIMITS} "
        f"(limits {version('limits')}); greedy ideal span {ideal:.1f} s; "
        f"{args.repeats} runs each, interleaved"
    )
    reason = pyrate_status()
    if reason is not None:
        print(f"pyrate-limiter: {reason}")
    else:
        print(f"pyrate-limiter {version('pyrate-limiter')}")
    runs: dict[tuple[str, str], list[Run]] = {}
    with tempfile.TemporaryDirectory(prefix="ratebatch-windows-") as tmp:
        for repeat in range(args.repeats):
            for strategy in args.servers:
                shift = repeat % max(1, len(chosen))
                for variant in chosen[shift:] + chosen[:shift]:
                    directory = Path(tmp) / f"{repeat}-{strategy}-{len(runs)}-{time.monotonic_ns()}"
                    directory.mkdir()
                    with Server(strategy) as server:
                        run = variant.run(directory, server, args.tests)
                    runs.setdefault((strategy, variant.name), []).append(run)
                    print(
                        f"  #{repeat + 1} {strategy}: {variant.name}: {run.passed} passed, "
                        f"{run.refused} 429s, span {run.span:.3f} s, slack "
                        f"{run.slack[0] * 1e3:+.1f} ms ({run.slack[1]})"
                        + ("" if run.spread is None else f", spread {spread_text(run)} ms")
                        + (
                            ""
                            if run.admitted_slack is None
                            else f", admitted slack {run.admitted_slack[0] * 1e3:+.1f} ms"
                        ),
                        file=sys.stderr,
                        flush=True,
                    )
                    for line in run.explained:
                        print(f"    429: {line}", file=sys.stderr, flush=True)
    header = (
        "server", "variant", "passed", "429s", "span s", "span/ideal", "slack ms",
        "admitted slack", "spread ms",
    )  # fmt: skip
    table = []
    for strategy in args.servers:
        for variant in chosen:
            results = runs.get((strategy, variant.name), [])
            if not results:
                continue
            span = statistics.median(run.span for run in results)
            slack = min(results, key=lambda run: run.slack[0]).slack
            spread = max(results, key=lambda run: run.spread or 0.0)
            table.append(
                (
                    f"limits {strategy} window",
                    variant.name,
                    "/".join(f"{run.passed}" for run in results),
                    "/".join(f"{run.refused}" for run in results),
                    f"{span:.2f}",
                    f"{span / ideal:.4f}",
                    f"{slack[0] * 1e3:+.1f} {slack[1]}",
                    admitted_text(results),
                    spread_text(spread),
                )
            )
    print_table(header, table)
    print(
        "passed, 429s: each run; span: median of the runs, first to last accepted request;\n"
        "slack: the smallest a[i] - a[i-n] - w over accepted arrivals and both limits, worst "
        "run;\nadmitted slack: the same over the plugin's admissions (JSON report), worst run;\n"
        "spread: largest difference of admission-to-arrival delays in a run, and without "
        "each process's\nfirst test, the run with the largest (the plugin's variants)."
    )
    refusals = [
        f"{strategy} / {name} #{index + 1}: {line}"
        for (strategy, name), results in runs.items()
        for index, run in enumerate(results)
        for line in run.explained
    ]
    if refusals:
        print("429s, from the server's log:")
        for line in refusals:
            print(f"  {line}")
    for strategy in args.servers:
        for variant in chosen:
            results = runs.get((strategy, variant.name), [])
            if results and variant.name.startswith("ratebatch --rate-limit"):
                span = statistics.median(run.span for run in results)
                met = all(run.refused == 0 for run in results) and (
                    abs(span / ideal - 1) <= SPAN_TARGET
                )
                print(
                    f"{strategy} / {variant.name}: {'met' if met else 'MISSED'} "
                    f"(target: 0 429s, span within {SPAN_TARGET:.0%} of {ideal:.1f} s)"
                )


def admitted_text(results: list[Run]) -> str:
    slacks = [run.admitted_slack for run in results if run.admitted_slack is not None]
    if not slacks:
        return "-"
    worst = min(slacks)
    return f"{worst[0] * 1e3:+.1f} {worst[1]}"


def spread_text(run: Run) -> str:
    if run.spread is None:
        return "-"
    rest = "-" if run.spread_rest is None else f"{run.spread_rest * 1e3:.1f}"
    return f"{run.spread * 1e3:.1f} / {rest}"


# --- the cost of a window ---------------------------------------------------------------


Call = Callable[[], object]
Close = Callable[[], None]


def _nothing() -> None:
    return None


class Cost(NamedTuple):
    mean: float  # µs per call: all calls' time / calls
    median: float  # µs per call: median over blocks of BLOCK calls
    first: float  # the same over the first EDGE calls
    last: float  # the same over the last EDGE calls
    evalsha: float | None  # EVALSHA calls per take (Redis)
    server: float | None  # µs the server spent per EVALSHA (Redis)


def time_calls(call: Callable[[], object], calls: int) -> tuple[float, float, float, float]:
    """Time ``calls`` calls in blocks of ``BLOCK``: µs per call as the mean over all calls,
    and as the median over the blocks of all, of the first and of the last ``EDGE`` calls
    (a median of blocks ignores the blocks another process's time slice fell into)."""
    blocks = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(calls // BLOCK):
            began = time.perf_counter()
            for _ in range(BLOCK):
                call()
            blocks.append((time.perf_counter() - began) / BLOCK * 1e6)
    finally:
        if enabled:
            gc.enable()
    edge = EDGE // BLOCK
    return (
        statistics.fmean(blocks),
        statistics.median(blocks),
        statistics.median(blocks[:edge]),
        statistics.median(blocks[-edge:]),
    )


def script_stats(client: Any) -> tuple[int, int]:
    """EVALSHA and EVAL calls so far, and the server's µs spent in them."""
    stats = client.info("commandstats")
    calls = usec = 0
    for name in ("cmdstat_evalsha", "cmdstat_eval"):
        calls += int(stats.get(name, {}).get("calls", 0))
        usec += int(stats.get(name, {}).get("usec", 0))
    return calls, usec


def make_call(name: str, directory: Path, redis_url: str, client: Any) -> tuple[Call, Close]:
    """A fresh candidate for the cost part: (the call to time, its cleanup)."""
    from pytest_ratebatch.engine.limiter import UNLIMITED, RateLimiter
    from pytest_ratebatch.limits.policy import RateLimit, parse_windows
    from pytest_ratebatch.stores.base import BucketStore
    from pytest_ratebatch.stores.files import FileBucketStore
    from pytest_ratebatch.stores.memory import MemoryBucketStore
    from pytest_ratebatch.stores.redis import RedisBucketStore

    where, _, what = name.partition(": ")
    if what == "PING":
        return client.ping, _nothing
    store: BucketStore
    close: Close = _nothing
    if where == "memory":
        store = MemoryBucketStore()
    elif where == "file":
        directory.mkdir()
        file_store = FileBucketStore(directory)
        store, close = file_store, file_store.close
    else:
        key = f"bench-window-cost-{os.getpid()}-{time.monotonic_ns()}"
        redis_store = RedisBucketStore(redis_url, key)
        store, close = redis_store, redis_store.close
    if "window" in what:
        limiter = RateLimiter(UNLIMITED, store, windows=parse_windows("10000/day"))
    else:
        limiter = RateLimiter(RateLimit(1e12, 1), store)
    return functools.partial(limiter.take, 1), close


def run_costs(args: argparse.Namespace, redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    names = []
    for store in ("memory", "file", "Redis"):
        names += [f"{store}: GCRA alone", f"{store}: 10,000/day window"]
    names.append("Redis: PING")
    results: dict[str, list[Cost]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="ratebatch-window-cost-") as tmp:
        for round_ in range(args.rounds):
            shift = round_ % len(names)
            for index, name in enumerate(names[shift:] + names[:shift]):
                call, close = make_call(name, Path(tmp) / f"{round_}-{index}", redis_url, client)
                counted = name.startswith("Redis") and not name.endswith("PING")
                try:
                    call()  # outside the timing: connection, script cache, file creation
                    before = script_stats(client) if counted else (0, 0)
                    mean, median, first, last = time_calls(call, args.calls)
                    evalsha = server = None
                    if counted:
                        after = script_stats(client)
                        evalsha = (after[0] - before[0]) / args.calls
                        server = (after[1] - before[1]) / max(1, after[0] - before[0])
                finally:
                    close()
                results[name].append(Cost(mean, median, first, last, evalsha, server))
            print(f"  cost round {round_ + 1} done", file=sys.stderr, flush=True)
    client.close()

    print(
        f"\n2. Admission cost: take(1), {args.calls} calls per round on a fresh store or key "
        f"(one more before, untimed), {args.rounds} interleaved rounds; µs per call, medians "
        f"of the rounds"
    )
    header = (
        "store: limiter", "mean", f"median of {BLOCK}s", f"first {EDGE:,}", f"last {EDGE:,}",
        "last/first", "window adds", "EVALSHA/call", "server µs",
    )  # fmt: skip
    table = []
    for name in names:
        costs = results[name]

        def mid(field: str, costs: list[Cost] = costs) -> float:
            return statistics.median(float(getattr(cost, field)) for cost in costs)

        adds = "-"
        if "window" in name:
            alone = results[name.split(":")[0] + ": GCRA alone"]
            adds = f"{mid('median') - statistics.median(c.median for c in alone):+.2f}"
        calls = [cost.evalsha for cost in costs if cost.evalsha is not None]
        spent = [cost.server for cost in costs if cost.server is not None]
        table.append(
            (
                name,
                f"{mid('mean'):.2f}",
                f"{mid('median'):.2f}",
                f"{mid('first'):.2f}",
                f"{mid('last'):.2f}",
                f"{mid('last') / mid('first'):.2f}",
                adds,
                f"{statistics.median(calls):.3f}" if calls else "-",
                f"{statistics.median(spent):.1f}" if spent else "-",
            )
        )
    print_table(header, table)
    ping = statistics.median(cost.median for cost in results["Redis: PING"])
    for name in ("Redis: GCRA alone", "Redis: 10,000/day window"):
        value = statistics.median(cost.median for cost in results[name])
        print(f"{name}: {value / ping:.2f}x PING")
    print(
        "window adds: the median of blocks, less the GCRA bucket's alone on the same store; "
        "server µs:\nthe server's time per EVALSHA (INFO commandstats)."
    )


# --- main -------------------------------------------------------------------------------


def version(distribution: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Window limits (10/2s, 25/10s): a suite against a server enforcing them "
        "with the limits library, beside the hand-mapped bucket and pyrate-limiter; and the "
        "cost of a 10,000/day window per admission on each store.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--tests", "-N", type=int, default=60, help="tests (one call each)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant")
    parser.add_argument(
        "--servers",
        default="moving,fixed",
        help="the server's limits strategies to run against, of: moving, fixed",
    )
    parser.add_argument(
        "--only", default="", help="run only the suite variants whose name contains this text"
    )
    parser.add_argument("--calls", type=int, default=9000, help="take(1) calls per cost round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved cost rounds")
    parser.add_argument("--no-suite", action="store_true", help="skip part 1 (the suite)")
    parser.add_argument("--no-cost", action="store_true", help="skip part 2 (the cost)")
    parser.add_argument(
        "--serve",
        choices=sorted(STRATEGIES),
        help="only run the rate-limited server with this strategy (the benchmark starts it so)",
    )
    args = parser.parse_args(argv)
    args.servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    if not args.servers or any(name not in STRATEGIES for name in args.servers):
        parser.error("--servers: a comma-separated list of moving, fixed")
    if args.tests < 2 or args.repeats < 1 or args.rounds < 1 or args.calls < 2 * EDGE:
        parser.error(f"--tests >= 2, --repeats >= 1, --rounds >= 1, --calls >= {2 * EDGE}")
    if args.calls >= 10_000:
        parser.error("--calls below 10,000: beyond, the 10,000/day window would wait")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    sys.path.insert(0, str(REPO_ROOT))  # measure this checkout
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is required (Debian package redis-server)")
    from tests.redis_server import RedisServer

    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs ({platform.machine()}), "
        f"pytest-xdist {version('pytest-xdist')}, redis-py {version('redis')}"
    )
    with tempfile.TemporaryDirectory(prefix="ratebatch-windows-redis-") as directory:
        redis_server = RedisServer(Path(directory)).start()
        try:
            print(f"redis-server {redis_server.client().info()['redis_version']}")
            if not args.no_suite:
                run_suites(args, redis_server.url)
            if not args.no_cost:
                run_costs(args, redis_server.url)
        finally:
            redis_server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
