"""A property-based sweep of every option's values: on the command line, in ``-o`` and in the
ini file.

Whatever text a user gives an option — numbers of any size and spelling, digits of other
scripts, durations, limits, random unicode — the plugin either accepts it and the run works,
or ends the run with a usage error (exit 4) naming the option, the value and where it came
from; never a traceback. Most examples go through the parser alone and, when accepted,
through every store (memory, files, Redis) at once, which must agree; a bounded number go
through whole pytest sessions, whose verdict must be the parser's. Hypothesis runs
derandomized and without its example database: the same examples on every run.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pytest_ratebatch.engine.limiter import UNLIMITED, WINDOW_MARGIN_NS
from pytest_ratebatch.limits.policy import (
    MAX_COUNT,
    MAX_SECONDS,
    ExecutionPolicy,
    PolicyError,
)
from pytest_ratebatch.plugin.options import COMMAND_LINE, OPTIONS, RawValue, flag_of
from pytest_ratebatch.plugin.session import parse_settings
from pytest_ratebatch.stores.base import BucketStore
from pytest_ratebatch.stores.files import FileBucketStore, FileSlotPool
from pytest_ratebatch.stores.memory import MemoryBucketStore, MemorySlotPool
from pytest_ratebatch.stores.redis import RedisBucketStore
from tests.fakes import FakeClock
from tests.redis_server import RedisServer

pytest_plugins = ["pytester"]

SECOND = 1_000_000_000
YEAR = int(MAX_SECONDS) * SECOND
NAMES = [spec.name for spec in OPTIONS]
OVERRIDE = "-o/--override-ini"
INI = "ini file /repo/pytest.ini"
SOURCES = (COMMAND_LINE, OVERRIDE, INI)

#: Examples through the parser and the stores, and through whole sessions (per option).
PARSER_EXAMPLES = 1000
SESSION_EXAMPLES = 3


def sweep(examples: int) -> settings:
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- values --------------------------------------------------------------------------------

#: Digits of other scripts: Arabic-Indic, full-width, Devanagari.
DIGITS = (
    "0123456789",
    *("".join(chr(zero + n) for n in range(10)) for zero in (0x660, 0xFF10, 0x966)),
)
EDGES = (
    "nan", "NaN", "inf", "-inf", "Infinity", "-0", "+0", "-0.0", "0.0", ".5", "5.", "0x10",
    "1_000", "1e400", "1e-400", "1e-300", "1e-9", "0.001", "0.0009", "60000000", "60000001",
    "525", "526", "1000000", "1000001", "99999999999999999999", "auto", "AUTO", "on", "Off",
    "yes", "", " ", "\t", "0", "1", "-1", "365d", "366d", "8760h", "8761h", "0.000001",
    "0.0000001", "1000000/365d", "1000001/s", "1/0.001ms", "1000000000000/s", "100000000/day",
    "memory", "file", "\u0663", "\uff13", "1e3", "2.5", "-5s", "1h30m", "10/2s, 500/h", "~", "/",
)  # fmt: skip
UNITS = ("", "ms", "s", "m", "h", "d", "min", "sec", "second", "minute", "hour", "day", "us",
         "µs", "y", "S", "Ms", " s")  # fmt: skip

numbers: st.SearchStrategy[str] = st.one_of(
    st.integers(-20, 20).map(str),
    st.integers(-(2**80), 2**80).map(str),
    st.sampled_from([0, 1, 525, MAX_COUNT, MAX_COUNT + 1, 2**31, 2**53 + 1, 2**63]).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(min_value=1e-320, max_value=1e300).map(lambda value: f"{value:g}"),
    st.integers(-400, 400).map(lambda exponent: f"1e{exponent}"),
    st.integers(300, 5000).map(lambda length: "9" * length),
)
spelled = st.tuples(numbers, st.sampled_from(DIGITS)).map(
    lambda pair: pair[0].translate(str.maketrans("0123456789", pair[1]))
)
durations = st.lists(
    st.tuples(st.one_of(numbers, spelled), st.sampled_from(UNITS)).map("".join),
    min_size=1,
    max_size=3,
).map("".join)
limits = st.tuples(
    st.lists(
        st.tuples(st.one_of(numbers, spelled), st.sampled_from(["/", " / "]), durations).map(
            "".join
        ),
        min_size=1,
        max_size=3,
    ),
    st.sampled_from([",", ";", ", ", "\n"]),
).map(lambda pair: pair[1].join(pair[0]))
class_names = st.lists(
    st.from_regex(r"[A-Za-z_.]?[A-Za-z0-9_.]{0,10}(:[A-Za-z0-9_.]{0,10})?", fullmatch=True),
    min_size=0,
    max_size=3,
).map(", ".join)
stores = st.one_of(
    st.sampled_from(
        [
            "memory",
            "file",
            "redis://",
            "redis://127.0.0.1:99999/0",
            "redis://127.0.0.1:0/0",
            "redis://:pw@[::1",
            "unix:///tmp/none.sock",
            "http://127.0.0.1/",
            "rediss://",
        ]
    ),
    st.from_regex(r"(redis|rediss|unix|http)://[^\s]{0,20}", fullmatch=True),
)
texts = st.text(max_size=40)
paths = st.sampled_from(["", " ", "\0", "r\0.json", "~no-such-user-here/r.json", "~/r.json"])
anything = st.one_of(
    texts,
    numbers,
    spelled,
    st.sampled_from(EDGES),
    durations,
    limits,
    class_names,
    st.tuples(st.sampled_from([" ", "\t", " \u3000"]), numbers).map("".join),
)
# Values of the right kind, mostly within bounds (the rest above are mostly not).
counts = st.integers(0, MAX_COUNT + 1).map(str)
rates = st.one_of(
    st.floats(0.0005, 7e7).map(repr),
    st.floats(0.0005, 7e7).map(lambda value: f"{value:g}"),
    st.integers(1, 10**8).map(str),
)
plain_durations = st.tuples(
    st.one_of(st.integers(0, 400).map(str), st.floats(0, 400).map(lambda value: f"{value:f}")),
    st.sampled_from(["", "ms", "s", "m", "h", "d"]),
).map("".join)
plain_limits = st.lists(
    st.tuples(
        counts,
        st.sampled_from(["/", "/1", "/10"]),
        st.sampled_from(["ms", "s", "min", "h", "d", "day", "1h30m", "365d", "366d"]),
    ).map("".join),
    min_size=1,
    max_size=2,
).map(", ".join)
modules = st.from_regex(r"[a-z_][a-z0-9_]{0,6}(\.[a-z_][a-z0-9_]{0,6})?", fullmatch=True)
classes = st.from_regex(
    r"[A-Za-z_][A-Za-z0-9_]{0,8}(\.[A-Za-z_][A-Za-z0-9_]{0,6})?", fullmatch=True
)
plain_class_names = st.lists(
    st.tuples(modules, st.just(":"), classes).map("".join), min_size=1, max_size=2
).map(", ".join)
hosts = st.one_of(
    st.sampled_from(["127.0.0.1", "api.example.com", "*.example.com", "[::1]", "API.Example.COM"]),
    st.tuples(
        st.sampled_from(["127.0.0.1", "localhost", "[::1]"]),
        st.integers(0, 70000).map(lambda port: f":{port}"),
    ).map("".join),
)
plain_call_limits = st.tuples(
    hosts,
    st.sampled_from(["=", " = "]),
    st.one_of(
        plain_limits,
        st.sampled_from(["auto", "AUTO", "auto, concurrency 2"]),
        counts.map(lambda count: f"concurrency {count}"),
        plain_limits.map(lambda limits: f"{limits}, concurrency 3"),
    ),
).map("".join)
PLAUSIBLE: dict[str, st.SearchStrategy[str]] = {
    "rate_per_minute": rates,
    "rate_limit": plain_limits,
    "call_limits": st.one_of(
        plain_call_limits,
        st.lists(plain_call_limits, min_size=2, max_size=3).map("\n".join),
    ),
    "max_concurrency": counts,
    "burst": counts,
    "batch_size": counts,
    "batch_backoff": plain_durations,
    "max_failures": counts,
    "total_timeout": plain_durations,
    "throttle_retries": counts,
    "throttle_max_wait": plain_durations,
    "throttle_adapt": st.sampled_from(["on", "off", "yes", "no", "true", "false", "1", "0"]),
    "ratebatch_throttle_exceptions": plain_class_names,
    "ratebatch_store": st.sampled_from(["memory", "file", "redis://127.0.0.1:6379/0"]),
    "ratebatch_key": st.from_regex(r"[A-Za-z0-9_:.-]{1,20}", fullmatch=True),
    "ratebatch_report": st.from_regex(r"[a-z0-9_/-]{1,20}\.json", fullmatch=True),
    "ratebatch_timeline": st.from_regex(r"[a-z0-9_/-]{1,20}\.svg", fullmatch=True),
    "resources": st.dictionaries(
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,8}", fullmatch=True),
        st.one_of(st.integers(1, 10**12).map(str), st.sampled_from(["0.5", "1.25", "1e3"])),
        min_size=1,
        max_size=3,
    ).map(lambda amounts: ", ".join(f"{name}={amount}" for name, amount in amounts.items())),
    # Within what any machine running the suite has: a floor above it is refused on use.
    "min_free_memory": st.one_of(
        st.integers(1, 64).map(lambda count: f"{count}MiB"),
        st.integers(1, 5).map(lambda percent: f"{percent}%"),
        st.sampled_from(["1K", "100kB", "0.5M", "1048576"]),
    ),
    "max_load": st.one_of(st.integers(1000, 10**6).map(str), st.sampled_from(["1e4", "2000.5"])),
}
#: Each option's own kind of value, in any spelling.
OWN: dict[str, st.SearchStrategy[str]] = {
    "rate_per_minute": st.one_of(numbers, st.sampled_from(["auto", "Auto", " auto "])),
    "rate_limit": limits,
    "call_limits": st.one_of(
        st.tuples(st.one_of(hosts, texts), st.sampled_from(["=", "", "=="]), anything).map("".join),
        texts,
    ),
    "max_concurrency": st.one_of(numbers, spelled),
    "burst": st.one_of(numbers, spelled),
    "batch_size": st.one_of(numbers, spelled),
    "batch_backoff": durations,
    "max_failures": st.one_of(numbers, spelled),
    "total_timeout": durations,
    "throttle_retries": st.one_of(numbers, spelled),
    "throttle_max_wait": durations,
    "throttle_adapt": st.sampled_from(
        ["on", "off", "ON", "Yes", "no", "true", "FALSE", "1", "0", "2", "maybe", "onn", ""]
    ),
    "ratebatch_throttle_exceptions": class_names,
    "ratebatch_store": stores,
    "ratebatch_key": st.one_of(texts, st.sampled_from(["", " ", "a b", "key\n"])),
    "ratebatch_report": st.one_of(texts, paths),
    "ratebatch_timeline": st.one_of(texts, paths),
    "resources": st.one_of(
        st.tuples(texts, st.sampled_from(["=", " = ", ""]), anything).map("".join),
        texts,
    ),
    "min_free_memory": st.one_of(
        st.tuples(numbers, st.sampled_from(["", "B", "kib", "MB", "g", "TiB", "%", "PB"])).map(
            "".join
        ),
        texts,
    ),
    "max_load": st.one_of(numbers, spelled),
}
assert set(OWN) == set(PLAUSIBLE) == set(NAMES)


def value_of(name: str) -> st.SearchStrategy[str]:
    """Half of the right kind, a quarter of the option's kind in any spelling, a quarter of
    anything at all."""
    # Not one_of: it would flatten the nested one_ofs into many branches of equal weight.
    kinds = (PLAUSIBLE[name], PLAUSIBLE[name], OWN[name], anything)
    return st.integers(0, 3).flatmap(lambda kind: kinds[kind])


#: What makes an option do something: a burst needs a rate, a backoff batches.
CONTEXT = {
    "burst": {"rate_per_minute": "6000"},
    "batch_backoff": {"batch_size": "2"},
}


# --- the verdict ----------------------------------------------------------------------------


def verdict(raw: dict[str, RawValue]) -> str:
    """``accepted``, or the name of the option a ``PolicyError`` names (anything else
    raised is a failure of the sweep)."""
    try:
        parse_settings(raw, Path("/invoked"), Path("/repo"))
    except PolicyError as error:
        message = str(error)
        named = [
            name for name in raw if message.startswith(f"ratebatch: {raw[name].describe(name)}: ")
        ]
        assert named, message
        return named[0]
    return "accepted"


# --- every store, at the values accepted ---------------------------------------------------


def outcomes(store: BucketStore, policy: ExecutionPolicy) -> list[tuple[int, int]]:
    """Two starts of the largest cost (at most 1000), a throttle for the longest wait
    allowed, and a third start: each one's status and wait."""
    rate = policy.rate_limit or UNLIMITED
    interval, burst = rate.interval_ns, rate.burst
    windows = tuple((limit.count, limit.window_ns + WINDOW_MARGIN_NS) for limit in policy.windows)
    cost = min([1000, burst, *(limit.count for limit in policy.windows)])
    seen = []
    for throttled in (False, False, True):
        if throttled:
            max_wait = int(policy.throttling.max_wait * SECOND)
            adapt = policy.throttling.adapt and policy.rate_limit is not None
            store.throttle(max_wait, interval, burst, adapt)
        if windows:
            status, _, wait, _ = store.take_windowed(cost, interval, burst, None, True, windows)
        else:
            status, _, wait = store.take(cost, interval, burst, None, True)
        seen.append((status, wait))
    return seen


def check_stores(policy: ExecutionPolicy, redis: RedisServer, key: str) -> None:
    """The memory and file stores agree to the nanosecond, Redis to its microsecond grain;
    every wait is one the OS can sleep; the timeouts fit in 64-bit nanoseconds."""
    clock = FakeClock()
    memory = outcomes(MemoryBucketStore(clock), policy)
    with tempfile.TemporaryDirectory() as directory:
        files = FileBucketStore(Path(directory), clock)
        assert outcomes(files, policy) == memory
        files.close()
        if policy.max_concurrency is not None:
            pool = FileSlotPool(Path(directory), policy.max_concurrency)
            slot = pool.acquire(0)
            assert slot is not None
            pool.release(slot)
            pool.close()
    if policy.max_concurrency is not None:
        assert MemorySlotPool(policy.max_concurrency).acquire(0) is not None
    started = time.monotonic()
    store = RedisBucketStore(redis.url, key)
    shared = outcomes(store, policy)
    store.close()
    rate = policy.rate_limit or UNLIMITED
    # Redis rounds intervals to whole microseconds (up as configured, down as adapted).
    grain = 1000 * (3000 + rate.burst) + int((time.monotonic() - started) * SECOND) + 10**6
    for (status, wait), (redis_status, redis_wait) in zip(memory, shared, strict=True):
        assert 0 <= wait < 4 * YEAR
        assert wait / SECOND < threading.TIMEOUT_MAX
        assert abs(redis_wait - wait) <= grain, (memory, shared)
        if abs(wait) > grain:
            assert redis_status == status, (memory, shared)
    for seconds in (policy.total_timeout, policy.batch_backoff, policy.throttling.max_wait):
        assert seconds is None or int(seconds * SECOND) < 2**62


# --- the sweeps ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tally() -> Iterator[Counter[tuple[str, str, str]]]:
    """Outcomes per sweep, option and verdict; printed at the end (seen with ``-s``)."""
    counts: Counter[tuple[str, str, str]] = Counter()
    yield counts
    for sweep_name in ("parser", "session"):
        lines = [
            f"  {name}: {counts[sweep_name, name, 'accepted']} accepted, "
            f"{counts[sweep_name, name, 'refused']} refused"
            for name in NAMES
        ]
        print(f"\nsweep through the {sweep_name}, outcomes per option:\n" + "\n".join(lines))


def test_every_option_through_the_parser_and_the_stores(
    redis_server: RedisServer, tally: Counter[tuple[str, str, str]]
) -> None:
    examples = Counter[str]()

    @sweep(PARSER_EXAMPLES)
    @given(st.data())
    def example(data: st.DataObject) -> None:
        names = [data.draw(st.sampled_from(NAMES))]
        if data.draw(st.integers(0, 3)) == 0:  # a quarter with a second option beside it
            names.append(data.draw(st.sampled_from([name for name in NAMES if name != names[0]])))
        raw = {
            name: RawValue(data.draw(value_of(name)), data.draw(st.sampled_from(SOURCES)))
            for name in names
        }
        if data.draw(st.booleans()):  # what a burst or a backoff needs, now and then
            for name in names:
                for needed, text in CONTEXT.get(name, {}).items():
                    raw.setdefault(needed, RawValue(text, COMMAND_LINE))
        found = verdict(raw)
        examples["all"] += 1
        for name in names:  # (an option beside the one refused is neither)
            if found in ("accepted", name):
                tally["parser", name, "accepted" if found == "accepted" else "refused"] += 1
        if found == "accepted":
            policy = parse_settings(raw, Path("/invoked"), Path("/repo")).policy
            check_stores(policy, redis_server, f"sweep-{examples['all']}")

    example()
    assert examples["all"] == PARSER_EXAMPLES
    for name in NAMES:  # the sweep reaches both sides of every option
        assert tally["parser", name, "accepted"] > 0, name
        assert tally["parser", name, "refused"] > 0, name


# --- whole sessions ---------------------------------------------------------------------------

TESTS = """
import pytest

def test_one():
    pass

def test_two():
    pass

def test_three():
    pass
"""
THROTTLED = """
attempts = []

def test_throttled(ratebatch):
    attempts.append(1)
    if len(attempts) == 1:
        ratebatch.throttled(0)
"""


def session_values(name: str) -> st.SearchStrategy[str]:
    """Values a session can be given as they are: no NUL (not in an argv), one line without
    surrounding space (an ini value is read stripped); stores on this machine only, report
    paths inside the test's directory."""
    if name == "ratebatch_store":
        return st.sampled_from(["memory", "file", "REDIS", "redis://127.0.0.1:99999/0", "nope"])
    if name in ("ratebatch_report", "ratebatch_timeline"):
        return st.one_of(st.from_regex(r"[a-z0-9_-]{1,12}(\.json|\.svg)?", fullmatch=True),
                         st.sampled_from(["", " ", "\0x"]))  # fmt: skip
    if name == "ratebatch_throttle_exceptions":
        return st.sampled_from(
            ["urllib.error:HTTPError", "os:path", "sweep_missing:Error", ".x:Y", "a", ""]
        )
    return value_of(name).filter(
        lambda text: "\0" not in text and text == text.strip() and text.splitlines() in ([], [text])
    )


#: For each option, a value past its bounds (or unusable) that once ended a session with a
#: traceback or would have, tried on the command line and in the ini file besides the drawn ones.
PAST_BOUNDS = {
    "rate_per_minute": "1e-300",
    "burst": "99999999999999999999",
    "rate_limit": "1000000000000/s",
    "call_limits": "127.0.0.1=1000000000000/s",
    "max_concurrency": "99999999999999999999",
    "batch_size": "99999999999999999999",
    "batch_backoff": "366d",
    "max_failures": "99999999999999999999",
    "total_timeout": "0.0000000001",
    "throttle_retries": "-1",
    "throttle_max_wait": "366d",
    "throttle_adapt": "maybe",
    "ratebatch_throttle_exceptions": ".errors:QuotaError",
    "ratebatch_store": "redis://127.0.0.1:99999/0",
    "ratebatch_key": "a b",
    "ratebatch_report": "~no-such-user-here/r.json",
    "ratebatch_timeline": "~no-such-user-here/t.svg",
    "resources": "gpu=1e13",
    "min_free_memory": "1000000TiB",
    "max_load": "1e7",
}
assert set(PAST_BOUNDS) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_option_through_whole_sessions(
    pytester: pytest.Pytester,
    redis_server: RedisServer,
    tally: Counter[tuple[str, str, str]],
    name: str,
) -> None:
    runs = Counter[str]()

    @sweep(SESSION_EXAMPLES)
    @example(PAST_BOUNDS[name], COMMAND_LINE)
    @example(PAST_BOUNDS[name], INI)
    @given(session_values(name), st.sampled_from(SOURCES))
    def session(text: str, source: str) -> None:
        runs["all"] += 1
        if name == "ratebatch_store" and text == "REDIS":
            text = redis_server.url
        context = {"total_timeout": "2s", "ratebatch_key": f"sweep-{name}-{runs['all']}"}
        context.update(CONTEXT.get(name, {}))
        context.pop(name, None)
        pytester.makepyfile(test_sweep=TESTS + (THROTTLED if "throttle" in name else ""))
        args = [f"{flag_of(option)}={value}" for option, value in context.items()]
        ini = "[pytest]\n"
        if source == COMMAND_LINE:
            args.append(f"{flag_of(name)}={text}")
        elif source == OVERRIDE:
            args += ["-o", f"{name}={text}"]
        else:
            ini += f"{name} = {text}\n"
        pytester.makeini(ini)
        raw = {option: RawValue(value, COMMAND_LINE) for option, value in context.items()}
        if text or source == COMMAND_LINE:  # an empty ini or -o value leaves the option unset
            raw[name] = RawValue(text, source if source != INI else f"ini file {pytester.path}")
        expected = verdict(raw)
        result = pytester.runpytest("-p", "no:cacheprovider", *args)
        output = result.stdout.str() + result.stderr.str()
        assert "Traceback" not in output, output
        assert "INTERNALERROR" not in output, output
        if result.ret == pytest.ExitCode.USAGE_ERROR:
            (error,) = [line for line in result.stderr.lines if line.startswith("ERROR: ")]
            option = f"{flag_of(name)}=" if source == COMMAND_LINE else f"{name}="
            if expected == "accepted":
                # Parsed well, refused on use: a store that cannot be reached, exception
                # types that cannot be loaded.
                # A memory floor above this machine's.
                assert name in (
                    "ratebatch_store",
                    "ratebatch_throttle_exceptions",
                    "min_free_memory",
                ), error
                assert option in error or "the store cannot be used" in error, error
            else:
                assert expected == name, (expected, error)
                assert error.startswith(f"ERROR: ratebatch: {option}"), error
            tally["session", name, "refused"] += 1
            return
        assert expected == "accepted", (expected, output)
        assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED), output
        outcomes = result.parseoutcomes()
        counted = sum(outcomes.get(kind, 0) for kind in ("passed", "failed", "skipped"))
        assert counted == (4 if "throttle" in name else 3), output
        tally["session", name, "accepted"] += 1

    session()
    assert runs["all"] == SESSION_EXAMPLES + 2
