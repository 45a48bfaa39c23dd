"""Call pacing (G10): the HTTP calls tests make, paced per host with ``--call-limit``.

Every figure is counted by a real server, independent of this project: the loopback server
of ``tests/call_server.py``, which enforces **20 calls per 2 s** over a moving window (the
``limits`` library's ``MovingWindowRateLimiter``) and answers 429 beyond it. A fresh
server (a fresh window) serves each run.

The suite: T generated test functions (default 30) making C calls in all (default 90; each
test 1 to 6, a fixed seed), written with the **openai SDK** (``openai.OpenAI(base_url=URL +
"/v1", api_key="x", max_retries=0)``: ``models.list()``, ``models.retrieve()`` and
``chat.completions.create()`` in turn, each parsing the server's 200 JSON; retries are off, so
a 429 fails its test); 4 of the tests are async (``openai.AsyncOpenAI``), firing 3 calls at
once with ``asyncio.gather`` inside ``asyncio.run``. Part 5 writes the same suite with other
clients (``requests``, ``urllib.request``, ``httpx``, ``aiohttp``): GETs and JSON POSTs in
turn, ``raise_for_status`` (urllib raises by itself); the tests firing at once use the
async client where there is one, else 3 threads.

The ideal span: the earliest schedule of n calls under "20 per 2 s" (instant calls) sends
calls ``20k .. 20k+19`` at ``2k`` s, so the last one ``(ceil(n / 20) - 1) * 2`` s after the
first: 8 s for 90 calls, 16 s for 180 (``greedy_ideal``). The measured span is the server's:
from the first to the last admitted (200) arrival. The plugin keeps each window 20 ms longer
than stated (``CALL_WINDOW_MARGIN_NS``): 4 windows of 90 calls cost 1% of the ideal.

Parts (rows; each in one process and, where it says, with ``-n 4``):

1. no limiter, ``-p no:ratebatch``: the 429s and the failed tests the limit causes;
2. ``--call-limit 127.0.0.1=20/2s``: 429s, failed tests, span / ideal;
3. the same in two concurrent sessions sharing one key of a private ``redis-server``
   (``--ratebatch-store redis://... --ratebatch-key K``): 180 calls against one server;
4. ``--call-limit 127.0.0.1=auto`` against the server publishing OpenAI's
   ``x-ratelimit-*-requests`` headers (no ``Retry-After``): targets <= 2 429s in one
   process, <= 6 with ``-n 4``, 0 failed, span <= 1.2x the ideal;
5. the suite with ``requests``, ``urllib.request``, ``httpx`` and ``aiohttp`` (one process,
   the stated limit): targets 0 429s, 0 failed, span <= 1.03x the ideal (applied to the
   stated-limit rows of parts 2 and 3 too);
6. the event loop while calls wait: one async test, a task ticking every 10 ms, and
   K calls (default 60) through one ``httpx.AsyncClient`` at once under the stated limit:
   the share of the 10 ms slots in which the ticker ran (target >= 90%); references: the
   same total time spent in ``time.sleep`` (a blocking wait, one per call) and in
   ``asyncio.sleep``;
7. what a non-binding call limit costs, in instructions (valgrind's callgrind, every
   process summed, as ``overhead.py`` counts): one test making N requests (default 200)
   with a ``requests.Session`` and one with an ``httpx.Client``, in a fresh virtualenv with
   a regular ``pip install`` of this checkout and ``PYTHONDONTWRITEBYTECODE=1``, with
   ``--call-limit 127.0.0.1=1000000/1s`` against the same session without a call limit
   (both ``--max-failures 1000``), on the memory and the file store: the whole run's ratio
   (target <= 1.05) and extra instructions per request, split by runs without requests
   into the session's fixed extra and each request's marginal extra (beside a request's
   own instructions). Then Redis admission per call: ``RedisBucketStore.take``
   with the interval of ``UNLIMITED`` (an auto or windowless limit's path) and
   ``take_windowed`` with a 20/2s window (a stated limit's path: past 20 calls it reserves
   later slots, still one EVALSHA) against redis-py's ``ping()`` (the round trip a redis-py
   client pays for the cheapest command), in interleaved blocks of a few calls (their order
   rotated): the median over blocks of each block's time to its neighbouring PING block's
   (target <= 1.3), with its quartiles, and the commands' own server time (``INFO
   commandstats``). Beside them, a bare PING (packed once, sent and read on a connection of
   its own, as the store sends its scripts): the wire's share, and each script's ratio to it.

Medians over ``--repeats`` runs (default 2; the rows run interleaved, their order rotated
each round); part 7 counts each variant under ``PYTHONHASHSEED`` 1..repeats. Needs openai,
httpx, requests, aiohttp, limits, redis-py, pytest-xdist, ``redis-server`` (part 3 and 7) and
valgrind (part 7). About 10 minutes for parts 1-6 and 12 for part 7 on 2 shared CPUs with
the defaults; ``--quick`` (15 tests, 45 calls, N=20, one seed) about 3 and 5.

Reproduce from the repository root::

    python benchmarks/calls.py                      # every part
    python benchmarks/calls.py --parts 4 --repeats 3
    python benchmarks/calls.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple
from xml.etree import ElementTree

from overhead import count, install
from tables import print_table

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.call_server import CallServer, HeaderMode  # noqa: E402

SERVER_LIMIT = "20 per 2 seconds"
WINDOW_COUNT = 20
WINDOW_S = 2.0
CALL_LIMIT = "127.0.0.1=20/2s"
AUTO_LIMIT = "127.0.0.1=auto"
NON_BINDING_LIMIT = "127.0.0.1=1000000/1s"
SEED = 20240611
#: Calls each of the tests that fire at once makes (all at once).
AT_ONCE = 3
MAX_CALLS_PER_TEST = 6
URL_VARIABLE = "RATEBATCH_BENCH_URL"
SESSION_TIMEOUT_S = 600.0
TICK_S = 0.01
SCRIPT = "python benchmarks/calls.py"

CLIENTS = ("openai", "requests", "urllib", "httpx", "aiohttp")


# --- the suite -------------------------------------------------------------------------


class TestPlan(NamedTuple):
    number: int
    calls: int
    at_once: bool  # fires its calls at once (async clients: asyncio.gather; else threads)


def plan_suite(tests: int, calls: int, at_once: int, seed: int = SEED) -> list[TestPlan]:
    """``tests`` tests making ``calls`` calls in all: ``at_once`` of them (chosen by the seed)
    fire ``AT_ONCE`` calls at once, the others make 1 to ``MAX_CALLS_PER_TEST`` in turn."""
    one_by_one = tests - at_once
    left = calls - AT_ONCE * at_once
    if one_by_one < 1 or not one_by_one <= left <= MAX_CALLS_PER_TEST * one_by_one:
        raise ValueError(f"{tests} tests cannot make {calls} calls ({at_once} at once)")
    rng = random.Random(seed)
    chosen = set(rng.sample(range(tests), at_once))
    counts = [1] * one_by_one
    left -= one_by_one
    while left:
        index = rng.randrange(one_by_one)
        if counts[index] < MAX_CALLS_PER_TEST:
            counts[index] += 1
            left -= 1
    plans = []
    for index in range(tests):
        if index in chosen:
            plans.append(TestPlan(index, AT_ONCE, True))
        else:
            plans.append(TestPlan(index, counts.pop(), False))
    return plans


_HEADER = f"""\
import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial

URL = os.environ["{URL_VARIABLE}"]


def url_of(test, k):
    return f"{{URL}}/v1/items/{{test}}/{{k}}"


def body_of(test, k):
    return {{"test": test, "call": k}}
"""

_THREADS = """

def calls(test, n):
    for k in range(n):
        call(test, k)


def calls_at_once(test, n):
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda k: call(test, k), range(n)))
"""

_ASYNC_AT_ONCE = """

def calls(test, n):
    for k in range(n):
        call(test, k)


def calls_at_once(test, n):
    async def main():
        async with {opener} as aclient:
            await asyncio.gather(*(call_async(aclient, test, k) for k in range(n)))

    asyncio.run(main())
"""

_CLIENT_CODE: dict[str, str] = {
    "openai": """
import openai

client = openai.OpenAI(base_url=URL + "/v1", api_key="x", max_retries=0)


def messages(test, k):
    return [{"role": "user", "content": f"test {test} call {k}"}]


def call(test, k):
    if k % 3 == 0:
        client.models.list()
    elif k % 3 == 1:
        client.models.retrieve(f"model-{test}-{k}")
    else:
        client.chat.completions.create(model="m", messages=messages(test, k))


async def call_async(aclient, test, k):
    if k % 3 == 0:
        await aclient.models.list()
    elif k % 3 == 1:
        await aclient.models.retrieve(f"model-{test}-{k}")
    else:
        await aclient.chat.completions.create(model="m", messages=messages(test, k))
"""
    + _ASYNC_AT_ONCE.format(
        opener='openai.AsyncOpenAI(base_url=URL + "/v1", api_key="x", max_retries=0)'
    ),
    "requests": """
import requests

session = requests.Session()


def call(test, k):
    if k % 2:
        response = session.post(url_of(test, k), json=body_of(test, k), timeout=120)
    else:
        response = session.get(url_of(test, k), timeout=120)
    response.raise_for_status()
"""
    + _THREADS,
    "urllib": """
import urllib.request


def call(test, k):
    data = json.dumps(body_of(test, k)).encode() if k % 2 else None
    request = urllib.request.Request(
        url_of(test, k), data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:  # a 429 raises
        response.read()
"""
    + _THREADS,
    "httpx": """
import httpx

client = httpx.Client(timeout=120)


def call(test, k):
    if k % 2:
        response = client.post(url_of(test, k), json=body_of(test, k))
    else:
        response = client.get(url_of(test, k))
    response.raise_for_status()


async def call_async(aclient, test, k):
    if k % 2:
        response = await aclient.post(url_of(test, k), json=body_of(test, k))
    else:
        response = await aclient.get(url_of(test, k))
    response.raise_for_status()
"""
    + _ASYNC_AT_ONCE.format(opener="httpx.AsyncClient(timeout=120)"),
    "aiohttp": """
import aiohttp


async def call_async(session, test, k):
    if k % 2:
        request = session.post(url_of(test, k), json=body_of(test, k))
    else:
        request = session.get(url_of(test, k))
    async with request as response:
        response.raise_for_status()
        await response.read()


def calls(test, n):
    async def main():
        async with aiohttp.ClientSession() as session:
            for k in range(n):
                await call_async(session, test, k)

    asyncio.run(main())


def calls_at_once(test, n):
    async def main():
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(call_async(session, test, k) for k in range(n)))

    asyncio.run(main())
""",
}


def suite_source(client: str, plans: Sequence[TestPlan]) -> str:
    parts = [_HEADER, _CLIENT_CODE[client]]
    for plan in plans:
        run = "calls_at_once" if plan.at_once else "calls"
        parts.append(f"\n\ndef test_{plan.number:02d}():\n    {run}({plan.number}, {plan.calls})\n")
    return "".join(parts)


def write_suite(directory: Path, client: str, plans: Sequence[TestPlan]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    # An empty ini file: the rootdir is this directory, and no ini file above it applies.
    (directory / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    (directory / f"test_calls_{client}.py").write_text(
        suite_source(client, plans), encoding="utf-8"
    )
    return directory


def greedy_ideal(calls: int, count: int = WINDOW_COUNT, window_s: float = WINDOW_S) -> float:
    """The span from the first to the last of ``calls`` instant calls in the earliest
    schedule that ``count`` per ``window_s`` (a moving window) allows: ``count`` calls at
    0, the next ``count`` at ``window_s``, and so on."""
    return max(0, math.ceil(calls / count) - 1) * window_s


# --- running sessions ------------------------------------------------------------------


def child_env(url: str = "", **extra: str) -> dict[str, str]:
    """Run the plugin from this checkout, whatever checkout an editable install points at."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    if url:
        env[URL_VARIABLE] = url
    env.update(extra)
    return env


def pytest_command(directory: Path, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(directory), *args]


class Session(NamedTuple):
    exit_code: int
    tests: int
    failed: int  # failures and errors, from the JUnit XML
    throttled: int  # 429s the plugin saw (its report), 0 without one
    resent: int
    output: str


def junit_counts(path: Path) -> tuple[int, int]:
    """Tests and failed tests (failures + errors) of a JUnit XML file."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = sum(int(suite.get("tests", 0)) for suite in suites)
    failed = sum(int(suite.get("failures", 0)) + int(suite.get("errors", 0)) for suite in suites)
    return tests, failed


def report_calls(path: Path) -> tuple[int, int]:
    """The plugin's throttled and resent calls, summed over its hosts."""
    if not path.exists():
        return 0, 0
    hosts: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")).get("calls") or {}
    return (
        sum(int(host.get("throttled", 0)) for host in hosts.values()),
        sum(int(host.get("resent", 0)) for host in hosts.values()),
    )


def run_sessions(
    directory: Path, args_list: Sequence[Sequence[str]], env: dict[str, str], reports: bool
) -> list[Session]:
    """Run one pytest session per ``args_list`` entry, all at once; wait for them all."""
    outputs = directory / "out"
    outputs.mkdir(exist_ok=True)
    started = []
    for index, args in enumerate(args_list):
        junit = outputs / f"junit-{index}.xml"
        report = outputs / f"report-{index}.json"
        log = outputs / f"log-{index}.txt"
        junit.unlink(missing_ok=True)
        report.unlink(missing_ok=True)
        extra = [f"--junitxml={junit}"]
        if reports:
            extra.append(f"--ratebatch-report={report}")
        with log.open("w", encoding="utf-8") as handle:
            process = subprocess.Popen(
                pytest_command(directory, [*args, *extra]),
                cwd=directory,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
        started.append((process, junit, report, log))
    sessions = []
    deadline = time.monotonic() + SESSION_TIMEOUT_S
    for process, junit, report, log in started:
        try:
            code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        output = log.read_text(encoding="utf-8", errors="replace")
        if not junit.exists():
            tail = "\n".join(output.splitlines()[-20:])
            raise SystemExit(f"pytest exited {code} without a JUnit XML file:\n{tail}")
        tests, failed = junit_counts(junit)
        throttled, resent = report_calls(report)
        sessions.append(Session(code, tests, failed, throttled, resent, output))
    return sessions


# --- parts 1 to 5: scenarios counted by the server --------------------------------------


class Targets(NamedTuple):
    max_429: float | None = None
    max_failed: float | None = None
    max_ratio: float | None = None


STATED_TARGETS = Targets(0, 0, 1.03)


class Scenario(NamedTuple):
    part: int
    name: str
    layout: str  # "1 process" or "-n 4"
    client: str
    headers: HeaderMode
    args: tuple[str, ...]
    sessions: int = 1
    redis: bool = False
    targets: Targets = Targets()

    @property
    def label(self) -> str:
        return f"{self.name}, {self.layout}"

    @property
    def plugin(self) -> bool:
        return "no:ratebatch" not in self.args


class Run(NamedTuple):
    requests: int
    rejected: int  # 429s the server sent
    admitted: int
    failed: int
    tests: int
    span_s: float
    throttled: int  # the plugin's own count of 429s
    resent: int
    wall_s: float
    exit_codes: tuple[int, ...]


def scenarios(parts: set[int]) -> list[Scenario]:
    found = []
    layouts: tuple[tuple[str, tuple[str, ...]], ...] = (("1 process", ()), ("-n 4", ("-n", "4")))
    for layout, xdist in layouts:
        if 1 in parts:
            args = ("-p", "no:ratebatch", *xdist)
            found.append(Scenario(1, "no limiter", layout, "openai", "retry-after", args))
        if 2 in parts:
            args = ("--call-limit", CALL_LIMIT, *xdist)
            found.append(
                Scenario(2, "20/2s", layout, "openai", "retry-after", args, targets=STATED_TARGETS)
            )
        if 3 in parts:
            args = ("--call-limit", CALL_LIMIT, *xdist)
            found.append(
                Scenario(
                    3,
                    "20/2s, 2 sessions on Redis",
                    layout,
                    "openai",
                    "retry-after",
                    args,
                    sessions=2,
                    redis=True,
                    targets=STATED_TARGETS,
                ),
            )
        if 4 in parts:
            args = ("--call-limit", AUTO_LIMIT, *xdist)
            targets = Targets(2 if not xdist else 6, 0, 1.2)
            found.append(Scenario(4, "auto", layout, "openai", "openai", args, targets=targets))
    if 5 in parts:
        for client in CLIENTS[1:]:
            args = ("--call-limit", CALL_LIMIT)
            found.append(
                Scenario(
                    5,
                    f"20/2s, {client}",
                    "1 process",
                    client,
                    "retry-after",
                    args,
                    targets=STATED_TARGETS,
                )
            )
    return sorted(found, key=lambda scenario: (scenario.part, scenario.layout != "1 process"))


class RedisHolder:
    """A private ``redis-server``, started at its first use (part 3 and part 7)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.server: Any = None

    def url(self) -> str:
        if self.server is None:
            if shutil.which("redis-server") is None:
                raise SystemExit("redis-server is required (Debian package redis-server)")
            from tests.redis_server import RedisServer

            self.directory.mkdir(parents=True, exist_ok=True)
            self.server = RedisServer(self.directory).start()
        return str(self.server.url)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def run_scenario(scenario: Scenario, directory: Path, redis: RedisHolder, round_: int) -> Run:
    args = list(scenario.args)
    if scenario.redis:
        key = f"bench-calls-{os.getpid()}-{round_}-{time.monotonic_ns()}"
        args += ["--ratebatch-store", redis.url(), "--ratebatch-key", key]
    with CallServer.start(SERVER_LIMIT, headers=scenario.headers) as server:
        began = time.perf_counter()
        sessions = run_sessions(
            directory, [args] * scenario.sessions, child_env(server.url), scenario.plugin
        )
        wall_s = time.perf_counter() - began
        stats = server.stats()
        admitted = server.admitted()
    span = max(admitted) - min(admitted) if admitted else 0.0
    return Run(
        requests=stats["requests"],
        rejected=stats["rejected"],
        admitted=len(admitted),
        failed=sum(session.failed for session in sessions),
        tests=sum(session.tests for session in sessions),
        span_s=span,
        throttled=sum(session.throttled for session in sessions),
        resent=sum(session.resent for session in sessions),
        wall_s=wall_s,
        exit_codes=tuple(session.exit_code for session in sessions),
    )


class Figure(NamedTuple):
    """One line of the final summary."""

    part: int
    what: str
    measured: str
    target: str
    met: bool | None  # None: no target


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_suites(
    chosen: list[Scenario], args: argparse.Namespace, tmp: Path, redis: RedisHolder
) -> list[Figure]:
    plans = plan_suite(args.tests, args.calls, args.at_once)
    results: dict[Scenario, list[Run]] = {scenario: [] for scenario in chosen}
    directories = {
        client: write_suite(tmp / f"suite-{client}", client, plans)
        for client in {scenario.client for scenario in chosen}
    }
    for round_ in range(args.repeats):
        shift = round_ % len(chosen)
        for scenario in chosen[shift:] + chosen[:shift]:
            run = run_scenario(scenario, directories[scenario.client], redis, round_)
            results[scenario].append(run)
            print(
                f"  [{round_ + 1}/{args.repeats}] part {scenario.part} {scenario.label}: "
                f"{run.rejected} 429s, {run.failed} failed, span {run.span_s:.2f}s, "
                f"wall {run.wall_s:.1f}s",
                file=sys.stderr,
                flush=True,
            )
    one_by_one = [plan.calls for plan in plans if not plan.at_once]
    print(
        f"suite: {args.tests} tests, {args.calls} calls (seed {SEED}): "
        f"{args.tests - args.at_once} make {min(one_by_one)} to {max(one_by_one)} calls in "
        f"turn, {args.at_once} fire {AT_ONCE} at once; server: {SERVER_LIMIT} (moving window), "
        "a fresh one per run"
    )
    print(
        f"ideal span (greedy, instant calls): (ceil(n / {WINDOW_COUNT}) - 1) * {WINDOW_S:g} s = "
        f"{greedy_ideal(args.calls):g} s for n = {args.calls}, "
        f"{greedy_ideal(2 * args.calls):g} s for n = {2 * args.calls}"
    )
    print()
    header = (
        "part", "row", "calls", "429s", "failed", "tests", "span s", "ideal s", "span/ideal",
        "plugin 429s/resent", "wall s", "target (429s, failed, ratio)",
    )  # fmt: skip
    rows = []
    figures: list[Figure] = []
    for scenario in chosen:
        runs = results[scenario]
        calls = args.calls * scenario.sessions
        ideal = greedy_ideal(calls)
        ratios = [run.span_s / ideal if ideal else float("nan") for run in runs]
        med_429 = median([run.rejected for run in runs])
        med_failed = median([run.failed for run in runs])
        med_ratio = median(ratios)
        targets = scenario.targets
        target_text = ", ".join(
            "-" if value is None else f"<= {value:g}"
            for value in (targets.max_429, targets.max_failed, targets.max_ratio)
        )
        rows.append(
            (
                str(scenario.part),
                scenario.label,
                str(calls),
                " ".join(str(run.rejected) for run in runs),
                " ".join(str(run.failed) for run in runs),
                str(runs[0].tests),
                f"{median([run.span_s for run in runs]):.3f}",
                f"{ideal:g}",
                f"{med_ratio:.3f}" + (f" ({' '.join(f'{r:.3f}' for r in ratios)})"),
                " ".join(f"{run.throttled}/{run.resent}" for run in runs)
                if scenario.plugin
                else "-",
                f"{median([run.wall_s for run in runs]):.1f}",
                target_text if any(value is not None for value in targets) else "-",
            )
        )
        label = f"{scenario.label}"
        checks = (
            ("429s", med_429, targets.max_429, "{:g}"),
            ("failed tests", med_failed, targets.max_failed, "{:g}"),
            ("span/ideal", med_ratio, targets.max_ratio, "{:.3f}"),
        )
        for what, value, target, form in checks:
            if scenario.part == 1 and what == "span/ideal":
                continue  # without a limiter the span says nothing
            figures.append(
                Figure(
                    scenario.part,
                    f"{label}: {what}",
                    form.format(value),
                    "-" if target is None else f"<= {target:g}",
                    None if target is None else value <= target,
                )
            )
        odd = [run.exit_codes for run in runs if scenario.plugin and set(run.exit_codes) - {0, 1}]
        if odd:
            print(f"note: {scenario.label}: pytest exit codes {odd}")
    print_table(header, rows, right=False)
    print()
    print(
        "429s, failed, plugin 429s/resent: each run; span: first to last admitted arrival at "
        "the server (median); span/ideal: median (each run)"
    )
    print("reproduce a row (a server from tests/call_server.py at $URL, the suite generated):")
    for scenario in chosen:
        shown = [*scenario.args]
        if scenario.redis:
            shown += ["--ratebatch-store", "redis://127.0.0.1:PORT/0", "--ratebatch-key", "K"]
        times = f" (x{scenario.sessions} at once)" if scenario.sessions > 1 else ""
        print(
            f"  part {scenario.part} {scenario.label}: {SCRIPT} --parts {scenario.part}; "
            f"{URL_VARIABLE}=$URL pytest -q test_calls_{scenario.client}.py "
            f"{' '.join(shown)}{times}"
        )
    print()
    return figures


# --- part 6: the event loop while calls wait --------------------------------------------

_TICKS_SOURCE = f"""\
import asyncio
import json
import os
import time

URL = os.environ["{URL_VARIABLE}"]
MODE = os.environ["RATEBATCH_BENCH_MODE"]
CALLS = int(os.environ["RATEBATCH_BENCH_CALLS"])
TOTAL = float(os.environ.get("RATEBATCH_BENCH_TOTAL", "0"))
OUT = os.environ["RATEBATCH_BENCH_OUT"]
TICK = {TICK_S!r}


async def main():
    loop = asyncio.get_running_loop()
    start = loop.time()
    seen = set()
    done = asyncio.Event()

    async def ticker():
        # Wakes at each 10 ms slot's start; a slot it missed (the loop was blocked) stays
        # unseen: catching up later does not count.
        while not done.is_set():
            slot = int((loop.time() - start) / TICK)
            seen.add(slot)
            await asyncio.sleep(max(0.0, start + (slot + 1) * TICK - loop.time()))

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    if MODE == "calls":
        import httpx

        async with httpx.AsyncClient(timeout=120) as client:

            async def one(k):
                (await client.get(f"{{URL}}/v1/ticks/{{k}}")).raise_for_status()

            await asyncio.gather(*(one(k) for k in range(CALLS)))
    elif MODE == "time.sleep":
        for _ in range(CALLS):
            time.sleep(TOTAL / CALLS)  # a blocking wait per call
            await asyncio.sleep(0)
    else:
        await asyncio.sleep(TOTAL)
    elapsed = loop.time() - start
    done.set()
    await task
    slots = int(elapsed / TICK)
    kept = len([slot for slot in seen if slot < slots])
    with open(OUT, "w") as handle:
        json.dump({{"elapsed": elapsed, "slots": slots, "kept": kept}}, handle)


def test_ticks():
    asyncio.run(main())
"""

TICK_MODES = (
    ("calls", "httpx AsyncClient calls, plugin 20/2s"),
    ("time.sleep", "time.sleep, same total (reference)"),
    ("asyncio.sleep", "asyncio.sleep, same total (reference)"),
)


def run_ticks(args: argparse.Namespace, tmp: Path) -> list[Figure]:
    directory = tmp / "suite-ticks"
    directory.mkdir()
    (directory / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    (directory / "test_ticks.py").write_text(_TICKS_SOURCE, encoding="utf-8")
    out = directory / "ticks.json"
    pytest_args = ["--call-limit", CALL_LIMIT]
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode, _ in TICK_MODES}
    for round_ in range(args.repeats):
        total = 0.0
        for mode, _ in TICK_MODES:  # the calls first: the references take their time
            with CallServer.start(SERVER_LIMIT) as server:
                env = child_env(
                    server.url,
                    RATEBATCH_BENCH_MODE=mode,
                    RATEBATCH_BENCH_CALLS=str(args.tick_calls),
                    RATEBATCH_BENCH_TOTAL=repr(total),
                    RATEBATCH_BENCH_OUT=str(out),
                )
                out.unlink(missing_ok=True)
                (session,) = run_sessions(directory, [pytest_args], env, True)
                rejected = server.stats()["rejected"] if mode == "calls" else 0
            if session.failed or not out.exists():
                tail = "\n".join(session.output.splitlines()[-20:])
                raise SystemExit(f"the ticking test failed ({mode}):\n{tail}")
            data = json.loads(out.read_text(encoding="utf-8"))
            data["rejected"] = rejected
            results[mode].append(data)
            if mode == "calls":
                total = data["elapsed"]
            print(
                f"  [{round_ + 1}/{args.repeats}] part 6 {mode}: {data['kept']}/{data['slots']} "
                f"slots in {data['elapsed']:.2f}s",
                file=sys.stderr,
                flush=True,
            )
    print(
        f"one async test, a ticker every {TICK_S * 1000:g} ms, {args.tick_calls} calls at once "
        f"(asyncio.gather) through one httpx.AsyncClient, --call-limit {CALL_LIMIT} (ideal "
        f"{greedy_ideal(args.tick_calls):g} s)"
    )
    rows = []
    figures = []
    for mode, label in TICK_MODES:
        runs = results[mode]
        shares = [100 * run["kept"] / run["slots"] if run["slots"] else 0.0 for run in runs]
        rows.append(
            (
                label,
                f"{median([run['elapsed'] for run in runs]):.2f}",
                " ".join(f"{int(run['kept'])}/{int(run['slots'])}" for run in runs),
                f"{median(shares):.1f}%",
                " ".join(str(int(run["rejected"])) for run in runs) if mode == "calls" else "-",
                ">= 90%" if mode == "calls" else "-",
            )
        )
        figures.append(
            Figure(
                6,
                f"ticks kept: {label}",
                f"{median(shares):.1f}%",
                ">= 90%" if mode == "calls" else "-",
                median(shares) >= 90 if mode == "calls" else None,
            )
        )
    refused = median([run["rejected"] for run in results["calls"]])
    figures.append(
        Figure(6, "429s of the ticking test's calls (stated limit)", f"{refused:g}", "<= 0",
               refused <= 0)
    )  # fmt: skip
    print_table(("variant", "elapsed s", "slots kept", "kept", "429s", "target"), rows)
    print("kept: the 10 ms slots since the start in which the ticker ran (median of the runs)")
    print(f"reproduce: {SCRIPT} --parts 6 --tick-calls {args.tick_calls}")
    print()
    return figures


# --- part 7: instructions and Redis round trips -----------------------------------------

_COST_SOURCE = f"""\
import os

import httpx
import requests

URL = os.environ["{URL_VARIABLE}"]
N = int(os.environ["RATEBATCH_BENCH_REQUESTS"])


def test_requests():
    with requests.Session() as session:
        for k in range(N):
            session.get(f"{{URL}}/requests/{{k}}").raise_for_status()


def test_httpx():
    with httpx.Client() as client:
        for k in range(N):
            client.get(f"{{URL}}/httpx/{{k}}").raise_for_status()
"""

COMMON = ("--max-failures", "1000")
STORES: dict[str, tuple[str, ...]] = {"memory": (), "file": ("--ratebatch-store", "file")}


class CostVariant(NamedTuple):
    store: str
    limited: bool  # with the non-binding call limit
    requests: bool  # N requests per client, else none (the session's fixed cost)

    @property
    def name(self) -> str:
        limit = "call limit" if self.limited else "no call limit"
        return f"{self.store}, {limit}" + ("" if self.requests else ", no requests")


COST_VARIANTS = [
    CostVariant(store, limited, requests)
    for store in STORES
    for requests in (False, True)
    for limited in (False, True)
]


def cost_args(variant: CostVariant) -> list[str]:
    limit = ("--call-limit", NON_BINDING_LIMIT) if variant.limited else ()
    return [*COMMON, *STORES[variant.store], *limit]


def cost_env(url: str, requests: int, seed: int) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTHONPATH")
    }
    env.update(
        {
            URL_VARIABLE: url,
            "RATEBATCH_BENCH_REQUESTS": str(requests),
            "PYTHONHASHSEED": str(seed),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    return env


def run_instructions(args: argparse.Namespace, tmp: Path) -> list[Figure]:
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is required for part 7 (Debian package valgrind)")
    python = install(args.venv or tmp / "venv", ("pytest>=8.0", "requests>=2.32", "httpx>=0.27"))
    directory = tmp / "suite-cost"
    directory.mkdir()
    (directory / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    (directory / "test_cost.py").write_text(_COST_SOURCE, encoding="utf-8")
    seeds = list(range(1, args.seeds + 1))
    counts: dict[CostVariant, dict[int, int]] = {variant: {} for variant in COST_VARIANTS}
    n = args.cost_requests
    with CallServer.start("1000000 per 1 second", headers="none") as server:

        def one(job: tuple[CostVariant, int]) -> None:
            variant, seed = job
            env = cost_env(server.url, n if variant.requests else 0, seed)
            total, _ = count(python, directory, cost_args(variant), env)
            counts[variant][seed] = total
            print(f"  part 7 {variant.name} seed {seed}: {total:,}", file=sys.stderr, flush=True)

        # The runs with requests first: they take longest.
        jobs = [(v, seed) for seed in seeds for v in COST_VARIANTS]
        jobs.sort(key=lambda job: not job[0].requests)
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(one, jobs))
        rejected = server.stats()["rejected"]
    probe = "import pytest_ratebatch as p, pytest; print(p.__file__, 'pytest', pytest.__version__)"
    version = subprocess.run(
        [str(python), "-c", probe], capture_output=True, text=True, check=True, cwd=tmp
    ).stdout.strip()
    print(
        f"instructions (callgrind, all processes), measured: {version}; "
        f"PYTHONDONTWRITEBYTECODE=1, hash seeds {', '.join(map(str, seeds))}"
    )
    print(
        f"one test of {n} GETs with a requests.Session, one with an httpx.Client "
        f"({2 * n} requests), loopback server; every run {' '.join(COMMON)}"
    )
    if rejected:
        print(f"note: the server refused {rejected} requests")
    rows = []
    figures = []
    for store in STORES:

        def of(limited: bool, requests: bool, seed: int, store: str = store) -> int:
            return counts[CostVariant(store, limited, requests)][seed]

        def med(values: list[float]) -> float:
            return statistics.median(values)

        base = med([of(False, True, s) for s in seeds])
        limited = med([of(True, True, s) for s in seeds])
        ratio = med([of(True, True, s) / of(False, True, s) for s in seeds])
        fixed = med([of(True, False, s) - of(False, False, s) for s in seeds])
        amortised = med([(of(True, True, s) - of(False, True, s)) / (2 * n) for s in seeds])
        own = med([(of(False, True, s) - of(False, False, s)) / (2 * n) for s in seeds])
        marginal = med(
            [
                (
                    (of(True, True, s) - of(True, False, s))
                    - (of(False, True, s) - of(False, False, s))
                )
                / (2 * n)
                for s in seeds
            ]
        )
        per_request = med(
            [
                (of(True, True, s) - of(True, False, s))
                / (of(False, True, s) - of(False, False, s))
                for s in seeds
            ]
        )
        rows.append(
            (
                store,
                f"{base:,.0f}",
                f"{limited:,.0f}",
                f"{ratio:.4f}",
                f"{amortised:,.0f}",
                f"{fixed:,.0f}",
                f"{marginal:,.0f}",
                f"{own:,.0f}",
                f"{per_request:.3f}",
                "run <= 1.05",
            )
        )
        figures.append(
            Figure(
                7,
                f"non-binding call limit, {store} store: run ratio",
                f"{ratio:.4f}",
                "<= 1.05",
                ratio <= 1.05,
            )
        )
        figures.append(
            Figure(
                7,
                f"non-binding call limit, {store} store: per request",
                f"+{marginal:,.0f} instr ({per_request:.3f}x a request's own)",
                "-",
                None,
            )
        )
    header = (
        "store", "no call limit", "call limit", "run ratio", "extra/request", "fixed extra",
        "marginal/request", "request's own", "per-request ratio", "target",
    )  # fmt: skip
    print_table(header, rows)
    print(
        "whole runs with N requests per client (medians over the seeds); extra/request: their "
        "difference / requests; fixed extra: the same without requests (the session's own "
        "cost); marginal/request: the extra of the requests alone; request's own: a request's "
        "instructions without a call limit; per-request ratio: with / without"
    )
    print(f"reproduce: {SCRIPT} --parts 7 --no-redis-cost --cost-requests {n} --seeds {args.seeds}")
    for variant in COST_VARIANTS:
        requests = n if variant.requests else 0
        print(
            f"  {variant.name}: RATEBATCH_BENCH_REQUESTS={requests} PYTHONDONTWRITEBYTECODE=1 "
            "valgrind --tool=callgrind --trace-children=yes python -m pytest -q "
            f"-p no:cacheprovider test_cost.py {' '.join(cost_args(variant))}"
        )
    print()
    return figures


def per_call_us(call: Callable[[], object], calls: int) -> float:
    began = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - began) / calls * 1e6


def run_redis_cost(args: argparse.Namespace, redis: RedisHolder) -> list[Figure]:
    import redis as redis_py

    from pytest_ratebatch.engine.limiter import UNLIMITED
    from pytest_ratebatch.plugin.calls import CALL_WINDOW_MARGIN_NS
    from pytest_ratebatch.stores.redis import RedisBucketStore

    url = redis.url()
    interval, burst = UNLIMITED.interval_ns, UNLIMITED.burst
    windows = ((WINDOW_COUNT, int(WINDOW_S * 1e9) + CALL_WINDOW_MARGIN_NS),)
    client = redis_py.Redis.from_url(url)
    names = ("PING", "bare PING", "take (UNLIMITED interval)", "take_windowed (20/2s)")
    commands = {"PING": "ping"}  # the others are one EVALSHA each (or a PING)
    prefix = f"bench-calls-cost-{os.getpid()}"
    take = RedisBucketStore(url, f"{prefix}-take")
    windowed = RedisBucketStore(url, f"{prefix}-windowed")
    bare: Any = client.connection_pool.make_connection()  # redis-py leaves it untyped

    def bare_ping() -> object:
        bare.send_packed_command([b"*1\r\n$4\r\nPING\r\n"], check_health=False)
        return bare.read_response()

    calls: dict[str, Callable[[], object]] = {
        "PING": client.ping,
        "bare PING": bare_ping,
        "take (UNLIMITED interval)": partial(take.take, 1, interval, burst, None, True),
        "take_windowed (20/2s)": partial(
            windowed.take_windowed, 1, interval, burst, None, True, windows
        ),
    }
    for call in calls.values():
        call()  # warm: the connection, the script cache

    def command_stats(command: str) -> tuple[int, int]:
        stats = client.info("commandstats").get(f"cmdstat_{command}", {})
        return int(stats.get("calls", 0)), int(stats.get("usec", 0))

    before = {name: command_stats(commands.get(name, "evalsha")) for name in ("PING", "take")}
    # Blocks of a few calls, the operations interleaved and their order rotated: a block and
    # its neighbours share the machine's state, so each block's ratio to PING is fair even
    # when the machine's speed drifts between blocks; the median of those ratios is quoted.
    results: dict[str, list[float]] = {name: [] for name in names}
    for block in range(args.redis_rounds):
        order = names[block % len(names) :] + names[: block % len(names)]
        for name in order:
            results[name].append(per_call_us(calls[name], args.redis_calls))
    after = {name: command_stats(commands.get(name, "evalsha")) for name in ("PING", "take")}
    take.close()
    windowed.close()
    bare.disconnect()
    client.close()
    server_us = {
        name: (after[name][1] - before[name][1]) / max(1, after[name][0] - before[name][0])
        for name in after
    }
    print(
        f"Redis admission per call: {args.redis_rounds} interleaved blocks of "
        f"{args.redis_calls} calls each (redis-server on 127.0.0.1)"
    )
    rows = []
    figures = []

    def block_ratios(name: str, reference: str) -> list[float]:
        return [value / ping for value, ping in zip(results[name], results[reference], strict=True)]

    for name in names:
        ratios = block_ratios(name, "PING")
        ratio = statistics.median(ratios)
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratio] * 3
        target = "<= 1.3" if name.startswith("take") else "-"
        server = (
            f"{server_us['PING']:.1f}" if name == "PING"
            else f"{server_us['take']:.1f} (both)" if name.startswith("take (")
            else ""
        )  # fmt: skip
        rows.append(
            (name, f"{statistics.median(results[name]):.1f}", server, f"{ratio:.2f}",
             f"{quartiles[0]:.2f}-{quartiles[2]:.2f}",
             f"{statistics.median(block_ratios(name, 'bare PING')):.2f}", target)
        )  # fmt: skip
        if name.startswith("take"):
            figures.append(
                Figure(7, f"Redis {name} / PING", f"{ratio:.2f}", "<= 1.3", ratio <= 1.3)
            )
    header = (
        "operation", "us/call", "server us/call", "ratio to PING", "quartiles",
        "to bare PING", "target",
    )  # fmt: skip
    print_table(header, rows)
    print(
        "ratio to PING: median over blocks of the block's time / the neighbouring block's of"
        " redis-py's ping(); to bare PING: the same, to a PING packed once and sent on a"
        " connection of its own (the wire alone, as the store sends its scripts);"
        " server us/call: INFO commandstats (PING's, and EVALSHA's over both scripts)"
    )
    print(
        f"reproduce: {SCRIPT} --parts 7 --no-instructions "
        f"--redis-calls {args.redis_calls} --redis-rounds {args.redis_rounds}"
    )
    print()
    return figures


# --- main --------------------------------------------------------------------------------


def parse_parts(text: str) -> set[int]:
    try:
        parts = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of part numbers: {text!r}") from None
    if not parts or not parts <= set(range(1, 8)):
        raise argparse.ArgumentTypeError("parts are 1 to 7")
    return parts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Call pacing against a real rate-limited loopback server: 429s, failed "
        "tests and span against the ideal; the event loop while calls wait; the cost of a "
        "non-binding call limit.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--parts", type=parse_parts, default="1,2,3,4,5,6,7", help="the parts to run (1-7)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs of each row")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 15 tests, 45 calls, 2 at once; 30 ticking calls; part 7 with "
        "N=20, one seed, short Redis rounds",
    )
    parser.add_argument("--tests", type=int, default=None, help="tests in the suite (30)")
    parser.add_argument("--calls", type=int, default=None, help="calls in all (90)")
    parser.add_argument("--at-once", type=int, default=None, help="tests firing 3 at once (4)")
    parser.add_argument("--tick-calls", type=int, default=None, help="part 6's calls (60)")
    parser.add_argument(
        "--cost-requests", type=int, default=None, help="part 7: requests per client (200)"
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="part 7: hash seeds 1..S (default: --repeats)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="part 7: callgrind runs at once",
    )
    parser.add_argument(
        "--venv", type=Path, default=None, help="part 7: reuse (or create) this virtualenv"
    )
    parser.add_argument("--no-instructions", action="store_true", help="part 7: Redis only")
    parser.add_argument("--no-redis-cost", action="store_true", help="part 7: instructions only")
    parser.add_argument(
        "--redis-calls", type=int, default=None, help="part 7: calls per block (20)"
    )
    parser.add_argument(
        "--redis-rounds", type=int, default=None, help="part 7: blocks per operation (500)"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "tests": 15 if quick else 30,
        "calls": 45 if quick else 90,
        "at_once": 2 if quick else 4,
        "tick_calls": 30 if quick else 60,
        "cost_requests": 20 if quick else 200,
        "seeds": 1 if quick else args.repeats,
        "redis_calls": 20,
        "redis_rounds": 100 if quick else 500,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.repeats, args.tests, args.tick_calls, args.seeds, args.jobs) < 1:
        parser.error("--repeats, --tests, --tick-calls, --seeds and --jobs must be >= 1")
    if min(args.cost_requests, args.redis_calls, args.redis_rounds) < 1 or args.at_once < 0:
        parser.error("--cost-requests, --redis-calls, --redis-rounds >= 1, --at-once >= 0")
    try:
        plan_suite(args.tests, args.calls, args.at_once)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(
        f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs; "
        f"parts {','.join(map(str, sorted(args.parts)))}, {args.repeats} runs each"
        + (" (quick)" if args.quick else "")
    )
    print()
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="ratebatch-calls-") as name:
        tmp = Path(name)
        redis = RedisHolder(tmp / "redis")
        try:
            chosen = scenarios(args.parts)
            if chosen:
                figures += run_suites(chosen, args, tmp, redis)
            if 6 in args.parts:
                figures += run_ticks(args, tmp)
            if 7 in args.parts:
                if not args.no_instructions:
                    figures += run_instructions(args, tmp)
                if not args.no_redis_cost:
                    figures += run_redis_cost(args, redis)
        finally:
            redis.stop()
    print("summary")
    rows = [
        (
            str(figure.part),
            figure.what,
            figure.measured,
            figure.target,
            "-" if figure.met is None else ("met" if figure.met else "MISSED"),
        )
        for figure in figures
    ]
    if rows:
        print_table(("part", "figure", "measured (median)", "target", ""), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
