"""Call limits without a session: the ``--call-limit`` grammar, the policy's view of it, the
OpenAI rate-limit headers, and the per-host pacer's decisions on a fake clock."""

from __future__ import annotations

import asyncio
import http.client
import io
import math
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from pytest_ratebatch.calls.pacer import CallPacer, HostPacer, is_throttle
from pytest_ratebatch.engine.limiter import UNLIMITED, RateLimiter
from pytest_ratebatch.limits.calls import (
    CallLimit,
    find_call_limit,
    parse_call_limit,
    parse_call_limits,
)
from pytest_ratebatch.limits.policy import (
    MAX_COUNT,
    ExecutionPolicy,
    PolicyError,
    ThrottlePolicy,
    WindowLimit,
    build_policy,
    parse_cost,
)
from pytest_ratebatch.plugin.calls import AUTO, CALL_WINDOW_MARGIN_NS
from pytest_ratebatch.plugin.options import COMMAND_LINE, RawValue, flag_of
from pytest_ratebatch.stores.base import SlotPool
from pytest_ratebatch.stores.memory import MemoryBucketStore, MemorySlotPool
from pytest_ratebatch.throttle.headers import (
    OPENAI_REMAINING,
    OPENAI_RESET,
    Budget,
    remaining,
    wait_seconds,
)
from pytest_ratebatch.views.calls import Call, CallsSummary, HostStats
from tests.fakes import FakeClock

SECOND = 1_000_000_000
MARGIN = CALL_WINDOW_MARGIN_NS / SECOND


# --- the grammar -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "host", "port", "windows", "auto", "concurrency", "text"),
    [
        ("api.example.com=20/2s", "api.example.com", None, ((20, 2),), False, None, None),
        (
            "api.example.com = 500/min, 10000/day",
            "api.example.com",
            None,
            ((500, 60), (10000, 86400)),
            False,
            None,
            "api.example.com=500/1m, 10000/1d",
        ),
        (
            "api.example.com=10/s; 5000/h",
            "api.example.com",
            None,
            ((10, 1), (5000, 3600)),
            False,
            None,
            "api.example.com=10/1s, 5000/1h",
        ),
        ("127.0.0.1:8080=auto", "127.0.0.1", 8080, (), True, None, None),
        ("127.0.0.1:8080 = AUTO", "127.0.0.1", 8080, (), True, None, "127.0.0.1:8080=auto"),
        ("h=auto, concurrency 2", "h", None, (), True, 2, None),
        ("h=concurrency 3", "h", None, (), False, 3, None),
        ("h=20/2s, Concurrency  4", "h", None, ((20, 2),), False, 4, "h=20/2s, concurrency 4"),
        (
            "API.Example.COM=1/s",
            "api.example.com",
            None,
            ((1, 1),),
            False,
            None,
            "api.example.com=1/1s",
        ),
        (
            "api.example.com.=1/s",
            "api.example.com",
            None,
            ((1, 1),),
            False,
            None,
            "api.example.com=1/1s",
        ),
        ("*.example.com=20/2s", "*.example.com", None, ((20, 2),), False, None, None),
        ("*:9000=1/s", "*", 9000, ((1, 1),), False, None, "*:9000=1/1s"),
        ("10.0.*.*=1/s", "10.0.*.*", None, ((1, 1),), False, None, "10.0.*.*=1/1s"),
        ("my_host-1=1/s", "my_host-1", None, ((1, 1),), False, None, "my_host-1=1/1s"),
        ("h:1=1/s", "h", 1, ((1, 1),), False, None, "h:1=1/1s"),
        ("h:65535=1/s", "h", 65535, ((1, 1),), False, None, "h:65535=1/1s"),
        ("[::1]=4/1s", "::1", None, ((4, 1),), False, None, "[::1]=4/1s"),
        ("[::1]:8080=4/1s", "::1", 8080, ((4, 1),), False, None, "[::1]:8080=4/1s"),
        ("[2001:DB8::A]:443=auto", "2001:db8::a", 443, (), True, None, "[2001:db8::a]:443=auto"),
        (
            "[::ffff:127.0.0.1]=1/s",
            "::ffff:7f00:1",
            None,
            ((1, 1),),
            False,
            None,
            "[::ffff:7f00:1]=1/1s",
        ),
    ],
)
def test_a_call_limit_is_parsed_and_normalised(
    entry: str,
    host: str,
    port: int | None,
    windows: tuple[tuple[int, float], ...],
    auto: bool,
    concurrency: int | None,
    text: str | None,
) -> None:
    limit = parse_call_limit(entry)
    assert limit.host == host
    assert limit.port == port
    assert [(window.count, window.seconds) for window in limit.windows] == list(windows)
    assert limit.auto is auto
    assert limit.concurrency == concurrency
    assert limit.text == (text or entry)
    assert limit.paced is (bool(windows) or auto)
    assert parse_call_limit(limit.text) == limit  # the normalised text reads back the same


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            "api.example.com",
            "'api.example.com' is not HOST=LIMITS (e.g. api.example.com=20/2s, "
            "127.0.0.1:8080=auto)",
        ),
        ("  api.example.com 20/2s ", "'api.example.com 20/2s' is not HOST=LIMITS (e.g. *"),
        ("=20/2s", "no host before the '=' (e.g. api.example.com=20/2s)"),
        ("  =20/2s", "no host before the '=' (e.g. api.example.com=20/2s)"),
        ("[::1=20/2s", "'[::1': an IPv6 address needs its closing bracket"),
        ("[::1]8080=20/2s", "'[::1]8080': only :PORT may follow the address"),
        ("[api]=1/s", "'[api]': not an IPv6 address"),
        ("[::g]=1/s", "'[::g]': not an IPv6 address"),
        ("[]=1/s", "'[]': not an IPv6 address"),
        ("::1=1/s", "'::1': write an IPv6 address in brackets, e.g. [::1] or [::1]:8080"),
        ("::1:8080=1/s", "'::1:8080': write an IPv6 address in brackets, e.g. [::1] or *"),
        ("host:=1/s", "'host:': a port after the colon"),
        ("host:0=1/s", "'0' is not a port (1 to 65535)"),
        ("host:65536=1/s", "'65536' is not a port (1 to 65535)"),
        ("host:123456=1/s", "'123456' is not a port (1 to 65535)"),
        ("host:http=1/s", "'http' is not a port (1 to 65535)"),
        ("host:-1=1/s", "'-1' is not a port (1 to 65535)"),
        ("[::1]:0=1/s", "'0' is not a port (1 to 65535)"),
        ("[::1]:x=1/s", "'x' is not a port (1 to 65535)"),
        ("bad host=1/s", "'bad host' is not a host name (letters, digits, '.', '-', and * globs)"),
        (
            "api.example.com/v1=1/s",
            "'api.example.com/v1': write the host, not a URL (api.example.com, not "
            "https://api.example.com/v1)",
        ),
        # A URL is refused, if for a reason that could say more ("write the host, not a URL").
        (
            "http://api.example.com=1/s",
            "'http://api.example.com': write the host, not a URL (api.example.com, not "
            "https://api.example.com/v1)",
        ),
        ("-api.com=1/s", "'-api.com' is not a host name *"),
        ("api.com-=1/s", "'api.com-' is not a host name *"),
        ("h?.com=1/s", "'h?.com' is not a host name *"),
        ("h=", "'h=': no limits after the '=' (N/DURATION, auto, concurrency N)"),
        ("h= , ;", "'h= , ;': no limits after the '=' (N/DURATION, auto, concurrency N)"),
        ("h=concurrency", "'concurrency': write concurrency N (1 to 1000000)"),
        ("h=concurrency 1 2", "'concurrency 1 2': write concurrency N (1 to 1000000)"),
        ("h=concurrency 0", "'concurrency 0': must be a whole number from 1 to 1000000"),
        ("h=concurrency 1000001", "'concurrency 1000001': must be a whole number from 1 to *"),
        ("h=concurrency x", "'concurrency x': not a whole number"),
        (
            "h=fast",
            "'fast' is not N/DURATION (e.g. 10/2s, 5000/h, 10000/day) (or auto, or concurrency N)",
        ),
        ("h=20", "'20' is not N/DURATION (e.g. 10/2s, 5000/h, 10000/day) (or auto, or *"),
        ("h=20/2", "'20/2': the window needs a unit (e.g. 2s) (or auto, or concurrency N)"),
        ("h=0/s", "'0/s': the number of starts must be from 1 to 1000000 (or auto, or *"),
        ("h=20/0s", "'20/0s': the window must be from 1us to 365d (or auto, or concurrency N)"),
        (
            "h=auto, 20/2s",
            "'h=auto, 20/2s': auto learns the limit; state N/DURATION or auto, not both",
        ),
        ("h=20/2s; auto", "'h=20/2s; auto': auto learns the limit; *"),
        ("h=auto auto", "'auto auto' is not N/DURATION *"),
        ("h=20/2s concurrency 2", "'20/2s concurrency 2': *"),  # a comma between the two
    ],
)
def test_a_bad_call_limit_is_refused_with_its_reason(entry: str, message: str) -> None:
    assert_matches(refusal(parse_call_limit, entry), message)


def refusal(function: Callable[..., object], *args: Any) -> str:
    """The ``ValueError`` message of ``function(*args)``, which must refuse them."""
    try:
        function(*args)
    except ValueError as error:
        return str(error)
    raise AssertionError(f"{function.__name__}{args!r} was not refused")


def assert_matches(text: str, pattern: str) -> None:
    """``pattern`` with ``*`` wildcards (fnmatch, without its ``[`` classes)."""
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    assert re.fullmatch(regex, text, re.DOTALL), f"{text!r} !~ {pattern!r}"


def test_an_ipv6_entry_with_an_empty_port_is_refused_like_a_host_name() -> None:
    """``[::1]:`` is not ``[::1]`` (any port): refused as ``host:`` is."""
    with pytest.raises(ValueError, match="a port after the colon"):
        parse_call_limit("host:=1/s")
    with pytest.raises(ValueError, match="a port after the colon"):
        parse_call_limit("[::1]:=1/s")


def test_a_long_entry_is_cut_short_in_the_message() -> None:
    entry = "h" * 200
    assert refusal(
        parse_call_limit, entry
    ) == f"{'h' * 40!r}... is not HOST=LIMITS (e.g. api.example.com=" + (
        "20/2s, 127.0.0.1:8080=auto)"
    )


def test_the_largest_concurrency_is_accepted() -> None:
    assert parse_call_limit(f"h=concurrency {MAX_COUNT}").concurrency == MAX_COUNT


def test_a_call_limit_value_checks_its_own_parts() -> None:
    with pytest.raises(ValueError, match="needs limits, auto or a concurrency"):
        CallLimit("h")
    with pytest.raises(ValueError, match=r"either stated .* or auto, not both"):
        CallLimit("h", windows=(WindowLimit(1, SECOND),), auto=True)
    limit = CallLimit("::1", 443, (WindowLimit(2, SECOND),), concurrency=1)
    assert (limit.pattern, limit.text) == ("[::1]:443", "[::1]:443=2/1s, concurrency 1")


def test_several_entries_one_per_line() -> None:
    limits = parse_call_limits(
        "\n  api.example.com = 20/2s\n\n127.0.0.1:8080=auto, concurrency 2\n[::1]=concurrency 1\n"
    )
    assert [limit.text for limit in limits] == [
        "api.example.com=20/2s",
        "127.0.0.1:8080=auto, concurrency 2",
        "[::1]=concurrency 1",
    ]
    # The same host on different ports, or with and without one, is not the same entry.
    assert len(parse_call_limits("h=1/s\nh:80=2/s\nh:81=3/s")) == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no call limit given (HOST=LIMITS, e.g. api.example.com=20/2s)"),
        ("\n  \n", "no call limit given (HOST=LIMITS, e.g. api.example.com=20/2s)"),
        ("h=1/s\nh=2/s", "h is stated twice (h=1/1s and h=2/1s): state each host once"),
        (
            "API.example.com=1/s\napi.example.com.=auto",
            "api.example.com is stated twice (api.example.com=1/1s and api.example.com=auto): "
            "state each host once",
        ),
        (
            "[::1]:80=1/s\n[::1]:80 = concurrency 2",
            "[::1]:80 is stated twice ([::1]:80=1/1s and [::1]:80=concurrency 2): state each "
            "host once",
        ),
        ("h=1/s\nnope", "'nope' is not HOST=LIMITS *"),
    ],
)
def test_bad_entries_are_refused(text: str, message: str) -> None:
    assert_matches(refusal(parse_call_limits, text), message)


# --- which limit a request falls under ------------------------------------------------------


def test_matching_is_case_insensitive_and_globs_span_labels() -> None:
    glob = parse_call_limit("*.Example.com=1/s")
    assert glob.matches("api.example.com", 443)
    assert glob.matches("API.EXAMPLE.COM.", 80)  # a fully qualified name's dot
    assert glob.matches("a.b.example.com", None)
    assert not glob.matches("example.com", 443)
    assert not glob.matches("api.example.org", 443)
    exact = parse_call_limit("api.example.com:443=1/s")
    assert exact.matches("API.example.com", 443)
    assert not exact.matches("api.example.com", 80)
    assert not exact.matches("api.example.com", None)
    assert not exact.matches("xapi.example.com", 443)
    ipv6 = parse_call_limit("[::1]:8080=1/s")
    assert ipv6.matches("::1", 8080)
    assert ipv6.matches("[::1]", 8080)  # as some clients keep it
    assert not ipv6.matches("::1", 8081)
    assert parse_call_limit("*=1/s").matches("anything.at.all", 1)


def test_an_entry_with_a_port_comes_before_one_without() -> None:
    limits = parse_call_limits(
        "127.0.0.1=1/s\n*.example.com=2/s\napi.example.com=3/s\n127.0.0.1:8080=4/s\n*:9000=5/s"
    )
    assert find_call_limit(limits, "127.0.0.1", 8080) == (3, limits[3])
    assert find_call_limit(limits, "127.0.0.1", 80) == (0, limits[0])
    assert find_call_limit(limits, "127.0.0.1", 9000) == (4, limits[4])  # a glob with the port
    # Among entries alike (no port), the first listed holds, a glob or not.
    assert find_call_limit(limits, "api.example.com", 443) == (1, limits[1])
    assert find_call_limit(limits, "API.Example.com.", None) == (1, limits[1])
    assert find_call_limit(limits, "other.host", 9000) == (4, limits[4])
    assert find_call_limit(limits, "example.com", 443) is None
    assert find_call_limit(limits, "localhost", 80) is None
    assert find_call_limit((), "127.0.0.1", 80) is None
    two = parse_call_limits("h:80=1/s\n*:80=2/s")
    assert find_call_limit(two, "h", 80) == (0, two[0])


# --- the policy ------------------------------------------------------------------------------


def cli(**values: str) -> dict[str, RawValue]:
    return {name: RawValue(text, COMMAND_LINE) for name, text in values.items()}


def test_the_policy_shows_and_exports_its_call_limits() -> None:
    policy = build_policy(
        cli(
            call_limits="API.example.com=20/2s; 500/min\n[::1]:8080 = auto, concurrency 2\n"
            "*.svc:443=concurrency 3"
        )
    )
    assert policy.is_active
    assert policy.rate_limit is None
    assert policy.describe() == (
        "calls api.example.com=20/2s, 500/1m; [::1]:8080=auto, concurrency 2; "
        "*.svc:443=concurrency 3"
    )
    exact, text = policy.shared_limits()
    assert text == policy.describe()
    assert exact.endswith(
        "api.example.com:20/2000000000+500/60000000000:None [::1]:8080:auto:2 *.svc:443::3"
    )
    exported = policy.to_json()["call_limits"]
    assert exported == [
        {
            "host": "api.example.com",
            "rate_limit": [
                {"count": 20, "window": 2.0, "window_ns": 2 * SECOND, "text": "20/2s"},
                {"count": 500, "window": 60.0, "window_ns": 60 * SECOND, "text": "500/1m"},
            ],
            "auto": False,
            "concurrency": None,
            "text": "api.example.com=20/2s, 500/1m",
        },
        {
            "host": "[::1]:8080",
            "rate_limit": [],
            "auto": True,
            "concurrency": 2,
            "text": "[::1]:8080=auto, concurrency 2",
        },
        {
            "host": "*.svc:443",
            "rate_limit": [],
            "auto": False,
            "concurrency": 3,
            "text": "*.svc:443=concurrency 3",
        },
    ]


def test_call_limits_alone_make_an_active_policy_and_join_the_others() -> None:
    assert not ExecutionPolicy().is_active
    assert ExecutionPolicy().to_json()["call_limits"] == []
    limits = parse_call_limits("h=1/s")
    assert ExecutionPolicy(call_limits=limits).is_active
    policy = build_policy(cli(rate_per_minute="60", call_limits="h=1/s", batch_size="2"))
    assert policy.describe() == "rate 60/min, burst 2, calls h=1/1s, batch size 2, backoff 0s"
    # Sessions sharing a key must agree on the call limits too (each is a bucket of its own).
    other = build_policy(cli(rate_per_minute="60", call_limits="h=2/s", batch_size="2"))
    assert policy.shared_limits()[0] != other.shared_limits()[0]
    assert (
        policy.shared_limits()[0]
        == build_policy(
            cli(rate_per_minute="60", call_limits="H.=1/1s", batch_size="2")
        ).shared_limits()[0]
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            RawValue("bad", COMMAND_LINE),
            "ratebatch: --call-limit='bad' (command line): 'bad' is not HOST=LIMITS (e.g. "
            "api.example.com=20/2s, 127.0.0.1:8080=auto)",
        ),
        (
            RawValue("h=1/s\nH=2/s", COMMAND_LINE),
            "ratebatch: --call-limit='h=1/s\\nH=2/s' (command line): h is stated twice "
            "(h=1/1s and h=2/1s): state each host once",
        ),
        (
            RawValue("\nh = fast", "ini file /repo/tox.ini"),
            "ratebatch: call_limits='\\nh = fast' (ini file /repo/tox.ini): 'fast' is not "
            "N/DURATION (e.g. 10/2s, 5000/h, 10000/day) (or auto, or concurrency N)",
        ),
    ],
)
def test_a_bad_call_limit_option_names_the_option_value_and_source(
    raw: RawValue, message: str
) -> None:
    assert flag_of("call_limits") == "--call-limit"
    with pytest.raises(PolicyError) as refused:
        build_policy({"call_limits": raw})
    assert str(refused.value) == message


@pytest.mark.parametrize(
    ("args", "kwargs", "cost"),
    [
        ((), {"pace_calls": False}, 1),
        ((), {"pace_calls": True}, 1),
        ((), {"cost": 2, "pace_calls": False}, 2),
        ((3,), {"pace_calls": False}, 3),
        ((0,), {"pace_calls": True}, 0),
    ],
)
def test_the_marker_takes_pace_calls(
    args: tuple[Any, ...], kwargs: dict[str, Any], cost: int
) -> None:
    assert parse_cost(args, kwargs, None) == cost


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {"pace_calls": "no"}, "pace_calls must be True or False, not 'no'"),
        ((), {"pace_calls": 0}, "pace_calls must be True or False, not 0"),
        ((), {"pace_calls": None}, "pace_calls must be True or False, not None"),
        ((), {"pace_calls": "False"}, "pace_calls must be True or False, not 'False'"),
        (
            (),
            {"calls": 2},
            "takes cost=N, priority=N, resources={NAME: AMOUNT} and pace_calls=True|False",
        ),
        (
            (),
            {"pace_calls": False, "paced": True},
            "takes cost=N, priority=N, resources={NAME: AMOUNT} and pace_calls=True|False",
        ),
        (
            (1, 2),
            {},
            "takes cost=N, priority=N, resources={NAME: AMOUNT} and pace_calls=True|False",
        ),
        (
            (1,),
            {"cost": 1},
            "takes cost=N, priority=N, resources={NAME: AMOUNT} and pace_calls=True|False",
        ),
        ((), {"cost": -1, "pace_calls": False}, "cost must be a whole number >= 0, not -1"),
        ((False,), {}, "cost must be a whole number >= 0, not False"),
    ],
)
def test_the_marker_refuses_a_bad_pace_calls(
    args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    assert refusal(parse_cost, args, kwargs, None) == message


# --- OpenAI's headers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1.2s", 1.2),
        ("6m0s", 360.0),
        ("850ms", 0.85),
        ("1h2m3s", 3723.0),
        ("2m30.5s", 150.5),
        ("0s", 0.0),
        ("250us", 0.00025),
        ("250µs", 0.00025),
        ("7ns", 7e-9),
        (" 20ms ", 0.02),
        ("2.5", 2.5),  # plain seconds
    ],
)
def test_the_openai_reset_is_a_go_duration(text: str, seconds: float) -> None:
    now = time.time()
    found = wait_seconds({OPENAI_RESET: text}, now)
    assert found is not None
    assert found[1] == OPENAI_RESET
    assert found[0] == pytest.approx(seconds)
    budget = remaining({OPENAI_REMAINING: "0", OPENAI_RESET: text}, now)
    assert budget is not None
    assert (budget.remaining, budget.source) == (0, OPENAI_REMAINING)
    assert budget.reset == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["soon", "1.2x", "s", "-1s", "1s2", ""])
def test_a_reset_that_is_no_duration_is_ignored(text: str) -> None:
    assert wait_seconds({OPENAI_RESET: text}, time.time()) is None
    budget = remaining({OPENAI_REMAINING: "3", OPENAI_RESET: text}, time.time())
    assert budget is not None
    assert (budget.remaining, budget.reset) == (3, None)


def test_the_openai_budget_from_any_header_container() -> None:
    now = time.time()
    message = http.client.parse_headers(
        io.BytesIO(
            b"X-RateLimit-Limit-Requests: 60\r\nX-RateLimit-Remaining-Requests: 59\r\n"
            b"X-RateLimit-Reset-Requests: 1s\r\n\r\n"
        )
    )
    for headers in (
        message,  # what http.client (urllib, requests) hands the pacer
        {"x-ratelimit-remaining-requests": "59", "x-ratelimit-reset-requests": "1s"},
        {"X-RATELIMIT-REMAINING-REQUESTS": "59", "X-RATELIMIT-RESET-REQUESTS": "1s"},
        [("x-ratelimit-remaining-requests", "59"), ("x-ratelimit-reset-requests", "1s")],
    ):
        budget = remaining(headers, now)
        assert isinstance(budget, Budget)
        assert (budget.remaining, budget.reset, budget.source) == (59, 1.0, OPENAI_REMAINING)
    assert remaining({OPENAI_REMAINING: "many"}, now) is None
    assert remaining({"x-ratelimit-limit-requests": "60"}, now) is None
    lone = remaining({OPENAI_REMAINING: "0"}, now)
    assert lone is not None
    assert (lone.remaining, lone.reset) == (0, None)


def test_retry_after_wins_over_the_openai_reset() -> None:
    now = time.time()
    headers = {"Retry-After": "3", OPENAI_RESET: "6m0s", OPENAI_REMAINING: "0"}
    assert wait_seconds(headers, now) == (3.0, "Retry-After")
    # The generic budget headers come first; OpenAI's are read only without them.
    generic = {"X-RateLimit-Remaining": "7", "X-RateLimit-Reset": "2", OPENAI_REMAINING: "0"}
    budget = remaining(generic, now)
    assert budget is not None
    assert (budget.remaining, budget.reset, budget.source) == (7, 2.0, "X-RateLimit-Remaining")


# --- the pacer, on a fake clock ---------------------------------------------------------------


def pacer_for(clock: FakeClock, text: str, throttling: ThrottlePolicy | None = None) -> CallPacer:
    """A ``CallPacer`` as the plugin opens it (memory stores), on ``clock``."""

    def open_host(index: int, limit: CallLimit) -> tuple[RateLimiter, SlotPool | None]:
        limiter = RateLimiter(
            AUTO if limit.auto else UNLIMITED,
            MemoryBucketStore(clock),
            clock=clock,
            windows=limit.windows,
            window_margin_ns=CALL_WINDOW_MARGIN_NS,
        )
        slots = MemorySlotPool(limit.concurrency) if limit.concurrency else None
        return limiter, slots

    return CallPacer(
        parse_call_limits(text), open_host, throttling or ThrottlePolicy(), clock.now_ns(), clock
    )


def host_of(pacer: CallPacer, host: str = "h", port: int = 80) -> HostPacer:
    found = pacer.host(host, port)
    assert found is not None
    return found


def test_a_stated_limit_admits_its_window_then_waits(clock: FakeClock) -> None:
    pacer = pacer_for(clock, "h=4/1s")
    pacer.nodeid = "test_a.py::test_a"
    host = host_of(pacer)
    calls = [host.admit("h") for _ in range(6)]
    assert clock.sleeps == [pytest.approx(1 + MARGIN)]
    assert [call.wait_ns for call in calls] == [0, 0, 0, 0, SECOND + CALL_WINDOW_MARGIN_NS, 0]
    assert [call.start_ns for call in calls[3:5]] == [0, SECOND + CALL_WINDOW_MARGIN_NS]
    stats = host.stats
    assert (stats.calls, stats.waits, stats.waited_ns) == (6, 1, SECOND + CALL_WINDOW_MARGIN_NS)
    assert (stats.first_ns, stats.last_ns) == (0, SECOND + CALL_WINDOW_MARGIN_NS)
    assert stats.bound == {"4/1s": SECOND + CALL_WINDOW_MARGIN_NS}
    for call in calls:
        assert host.respond(call, 200, {}) is False
        host.done(call)
    assert pacer.records is not None
    assert [(call.nodeid, call.host, call.status) for call in pacer.records] == [
        ("test_a.py::test_a", "h", 200)
    ] * 6
    assert stats.throttled == 0


def test_a_429_with_retries_left_is_sent_again_after_the_servers_wait(clock: FakeClock) -> None:
    pacer = pacer_for(clock, "h=4/1s")
    host = host_of(pacer)
    call = host.admit("h")
    assert host.respond(call, 429, {"Retry-After": "3"}) is True
    assert (call.status, call.attempts, call.resent) == (429, 2, 1)
    assert clock.sleeps == []  # the pause is the next admission's
    assert host.admit("h", call) is call
    assert clock.sleeps == [pytest.approx(3.0)]
    assert call.wait_ns == 3 * SECOND
    assert host.respond(call, 200, {}) is False
    host.done(call)
    stats = host.stats
    assert (stats.calls, stats.throttled, stats.resent, stats.passed_on) == (2, 1, 1, 0)
    assert stats.bound == {"pauses": 3 * SECOND}
    assert pacer.records is not None
    assert [record.to_list() for record in pacer.records] == [
        ["", "h", 3 * SECOND, 3 * SECOND, 200, 1]
    ]


def test_every_sharer_waits_out_a_throttles_pause(clock: FakeClock) -> None:
    pacer = pacer_for(clock, "*=10/1s")
    first, second = host_of(pacer, "a"), host_of(pacer, "b")
    assert first is second  # one limit, one bucket, whichever host it matched
    call = first.admit("a")
    assert first.respond(call, 503, {"Retry-After": "2"}) is True  # a 503 with Retry-After
    second.admit("b")
    assert clock.sleeps == [pytest.approx(2.0)]


def test_retries_exhausted_pass_the_throttle_to_the_test(clock: FakeClock) -> None:
    pacer = pacer_for(clock, "h=4/1s", ThrottlePolicy(retries=1))
    host = host_of(pacer)
    call = host.admit("h")
    assert host.respond(call, 429, {"Retry-After": "1"}) is True
    host.admit("h", call)
    assert host.respond(call, 429, {"Retry-After": "1"}) is False
    host.done(call)
    assert (call.status, call.resent) == (429, 1)
    stats = host.stats
    assert (stats.throttled, stats.resent, stats.passed_on) == (2, 1, 1)
    host.admit("h")  # the second throttle paused the host all the same
    assert clock.sleeps == [pytest.approx(1.0), pytest.approx(1.0)]
    none = pacer_for(clock, "h=4/1s", ThrottlePolicy(retries=0))
    host = host_of(none)
    assert host.respond(host.admit("h"), 429, {"Retry-After": "1"}) is False
    assert (host.stats.resent, host.stats.passed_on) == (0, 1)


def test_a_body_that_cannot_be_sent_again_passes_the_throttle_on(clock: FakeClock) -> None:
    host = host_of(pacer_for(clock, "h=4/1s"))
    call = host.admit("h")
    assert host.respond(call, 429, {"Retry-After": "2"}, replayable=False) is False
    assert (call.resent, host.stats.passed_on, host.stats.resent) == (0, 1, 0)
    host.admit("h")
    assert clock.sleeps == [pytest.approx(2.0)]


def test_a_wait_above_the_max_wait_is_passed_on_and_the_pause_capped(clock: FakeClock) -> None:
    host = host_of(pacer_for(clock, "h=4/1s", ThrottlePolicy(max_wait=2.0)))
    call = host.admit("h")
    assert host.respond(call, 429, {"Retry-After": "30"}) is False
    assert host.stats.passed_on == 1
    host.admit("h")
    assert clock.sleeps == [pytest.approx(2.0)]


def test_a_bare_429_is_sent_again_after_a_backoff(clock: FakeClock) -> None:
    host = host_of(pacer_for(clock, "h=4/1s"))
    call = host.admit("h")
    assert host.respond(call, 429, None) is True
    host.admit("h", call)
    assert host.respond(call, 429, {}) is True
    host.admit("h", call)
    assert len(clock.sleeps) == 2
    assert 0.45 <= clock.sleeps[0] <= 0.55  # 0.5 s +-10%
    assert 0.9 <= clock.sleeps[1] <= 1.1  # doubled for the next attempt


@pytest.mark.parametrize("status", [200, 404, 500, 503, 502])
def test_other_statuses_are_not_throttles(clock: FakeClock, status: int) -> None:
    host = host_of(pacer_for(clock, "h=4/1s"))
    call = host.admit("h")
    assert host.respond(call, status, {"Content-Type": "application/json"}) is False
    assert call.status == status
    assert (host.stats.throttled, host.stats.passed_on) == (0, 0)
    host.admit("h")
    assert clock.sleeps == []
    assert not is_throttle(status, {})
    assert is_throttle(429, {})
    assert is_throttle(503, {"retry-after": "1"})


def test_auto_obeys_a_published_budget_at_zero(clock: FakeClock) -> None:
    host = host_of(pacer_for(clock, "h=auto"))
    for _ in range(5):  # auto has no rate of its own: no wait until the server says so
        host.admit("h")
    call = host.admit("h")
    assert host.respond(call, 200, {OPENAI_REMAINING: "3", OPENAI_RESET: "1.5s"}) is False
    host.admit("h")
    assert clock.sleeps == []  # budget left: no pause
    assert host.respond(call, 200, {OPENAI_REMAINING: "0", OPENAI_RESET: "1.5s"}) is False
    host.admit("h")
    assert clock.sleeps == [pytest.approx(1.5)]
    assert host.stats.throttled == 0
    # Other budget headers alike; a budget at 0 without a reset does not pause.
    assert host.respond(call, 200, {"RateLimit": "limit=10, remaining=0, reset=2"}) is False
    host.admit("h")
    assert host.respond(call, 200, {OPENAI_REMAINING: "0"}) is False
    host.admit("h")
    assert clock.sleeps == [pytest.approx(1.5), pytest.approx(2.0)]


def test_a_stated_limit_does_not_pause_for_a_budget(clock: FakeClock) -> None:
    host = host_of(pacer_for(clock, "h=4/1s"))
    call = host.admit("h")
    assert host.respond(call, 200, {OPENAI_REMAINING: "0", OPENAI_RESET: "1.5s"}) is False
    host.admit("h")
    assert clock.sleeps == []


def test_auto_learns_a_rate_from_a_throttle_and_a_stated_limit_does_not(clock: FakeClock) -> None:
    host = host_of(pacer_for(clock, "h=auto"))
    for _ in range(3):
        host.admit("h")
    call = host.admit("h")
    assert host.respond(call, 429, {"Retry-After": "1"}) is True
    for _ in range(4):
        host.admit("h")
    assert clock.sleeps[0] == pytest.approx(1.0)
    assert len(clock.sleeps) == 4
    assert all(0 < wait <= 1 for wait in clock.sleeps[1:])
    stated = FakeClock()
    host = host_of(pacer_for(stated, "h=4/1s"))
    for _ in range(3):
        host.admit("h")
    call = host.admit("h")
    assert host.respond(call, 429, {"Retry-After": "1"}) is True
    for _ in range(4):
        host.admit("h")
    assert stated.sleeps == [pytest.approx(1 + MARGIN)]  # then the window's full burst


def test_a_concurrency_holds_a_slot_until_done(clock: FakeClock) -> None:
    pacer = pacer_for(clock, "h=concurrency 2")
    host = host_of(pacer)
    assert not host.limit.paced
    slots = host.slots
    assert isinstance(slots, MemorySlotPool)
    first, second = host.admit("h"), host.admit("h")
    assert slots.in_use() == 2
    assert slots.acquire(0) is None  # a third call would wait
    host.done(first)
    assert slots.in_use() == 1
    assert first.slot is None
    host.done(second)
    assert slots.in_use() == 0
    assert clock.sleeps == []
    assert host.stats.calls == 2


def test_which_calls_the_pacer_paces(clock: FakeClock) -> None:
    pacer = pacer_for(clock, "127.0.0.1:8080=1/s\n*.example.com=auto")
    assert pacer.host("127.0.0.1", 8081) is None
    assert pacer.host("localhost", 8080) is None
    assert pacer.host(None, 8080) is None
    assert pacer.host("", 8080) is None
    limited = pacer.host("127.0.0.1", 8080)
    assert limited is not None
    assert pacer.host("127.0.0.1", 8080) is limited
    assert limited.limit.pattern == "127.0.0.1:8080"
    pacer.enabled = False  # a test with @pytest.mark.ratebatch(pace_calls=False)
    assert pacer.host("127.0.0.1", 8080) is None
    pacer.enabled = True
    api = pacer.host("api.example.com", 443)
    assert api is not None
    assert pacer.host("API.example.com", 80) is api
    assert set(pacer.stats()) == {"127.0.0.1:8080", "*.example.com"}


# --- the totals and the summary ------------------------------------------------------------


def stats_of(**values: Any) -> HostStats:
    stats = HostStats()
    for name, value in values.items():
        setattr(stats, name, value)
    return stats


def test_host_stats_merge_across_processes() -> None:
    total = HostStats()
    total.merge(HostStats().to_list())  # a worker that made no call changes nothing
    assert total.to_list() == HostStats().to_list()
    one = stats_of(
        calls=5,
        throttled=2,
        resent=1,
        passed_on=1,
        waited_ns=3 * SECOND,
        waits=2,
        first_ns=2 * SECOND,
        last_ns=9 * SECOND,
        bound={"4/1s": 2 * SECOND},
    )
    two = stats_of(
        calls=3,
        throttled=1,
        resent=1,
        passed_on=0,
        waited_ns=SECOND,
        waits=1,
        first_ns=SECOND,
        last_ns=4 * SECOND,
        bound={"4/1s": SECOND // 2, "pauses": SECOND},
    )
    total.merge(one.to_list())
    total.merge(two.to_list())
    total.merge(HostStats().to_list())
    assert total.to_list() == [
        8,
        3,
        2,
        1,
        4 * SECOND,
        3,
        SECOND,
        9 * SECOND,
        {"4/1s": 2 * SECOND + SECOND // 2, "pauses": SECOND},
    ]
    assert total.achieved_per_minute() == pytest.approx(7 * 60 / 8)
    assert stats_of(calls=1, first_ns=0, last_ns=0).achieved_per_minute() is None
    assert stats_of(calls=3, first_ns=5, last_ns=5).achieved_per_minute() is None


def test_the_summary_has_a_line_per_limit() -> None:
    limits = parse_call_limits(
        "127.0.0.1=4/1s\n*.example.com=auto\napi.other.com=2/1s, concurrency 1\nlone.host=1/s\n"
        "idle.host=1/s"
    )
    summary = CallsSummary(limits, keep_calls=False)
    summary.add(
        {
            "127.0.0.1": stats_of(
                calls=20,
                first_ns=0,
                last_ns=4_110_000_000,
                waits=12,
                waited_ns=10_820_000_000,
                bound={"4/1s": 9 * SECOND, "pauses": SECOND},
            ).to_list(),
            "*.example.com": stats_of(
                calls=30,
                first_ns=SECOND,
                last_ns=61 * SECOND,
                waits=8,
                waited_ns=90 * SECOND,
                throttled=8,
                resent=8,
                bound={"rate": SECOND, "pauses": 2 * SECOND},
            ).to_list(),
            "api.other.com": stats_of(
                calls=4, first_ns=0, last_ns=3 * SECOND, throttled=3, resent=1, passed_on=2
            ).to_list(),
            "lone.host": stats_of(
                calls=1, first_ns=0, last_ns=0, throttled=1, passed_on=1
            ).to_list(),
        },
        [],
    )
    assert summary.calls is None
    assert summary.lines() == [
        "calls to 127.0.0.1 (4/1s): 20 calls in 4.11s (277.4/min), 12 waited 10.82s in all, "
        "mostly for 4/1s, 0 throttled",
        "calls to *.example.com (auto): 30 calls in 1m (29/min), 8 waited 1m30s in all, "
        "mostly for pauses, 8 throttles: 8 re-sent",
        "calls to api.other.com (2/1s, concurrency 1): 4 calls in 3s (60/min), 3 throttles: "
        "1 re-sent, 2 passed to the test",
        "calls to lone.host (1/1s): 1 call, 1 throttle: 0 re-sent, 1 passed to the test",
        "calls to idle.host (1/1s): none",
    ]
    assert summary.attention() == "3 throttled calls passed to tests"
    exported = summary.to_json()
    assert list(exported) == [limit.pattern for limit in limits]
    assert exported["127.0.0.1"] == {
        "limit": "127.0.0.1=4/1s",
        "calls": 20,
        "throttled": 0,
        "resent": 0,
        "passed_on": 0,
        "waits": 12,
        "waited": 10.82,
        "first": 0.0,
        "last": 4.11,
        "achieved_per_minute": pytest.approx(19 * 60 / 4.11),
        "bound": {"4/1s": 9.0, "pauses": 1.0},
    }
    assert exported["idle.host"]["calls"] == 0
    assert exported["idle.host"]["first"] is None
    assert exported["idle.host"]["achieved_per_minute"] is None
    assert CallsSummary(limits, keep_calls=False).attention() == ""


def test_the_summary_keeps_each_tests_calls_for_the_report() -> None:
    summary = CallsSummary(parse_call_limits("h=1/s"), keep_calls=True)
    late, early = Call("h", "t.py::a"), Call("h", "t.py::b")
    late.start_ns, late.wait_ns, late.status, late.resent = 2 * SECOND, SECOND, 200, 1
    early.start_ns, early.status = SECOND // 2, 429
    summary.add({}, [late.to_list()])
    summary.add({}, [early.to_list(), Call("h", "t.py::a").to_list()])
    assert summary.by_test() == {
        "t.py::a": [
            {"host": "h", "start": 0.0, "wait": 0.0, "status": 0, "resent": 0},
            {"host": "h", "start": 2.0, "wait": 1.0, "status": 200, "resent": 1},
        ],
        "t.py::b": [{"host": "h", "start": 0.5, "wait": 0.0, "status": 429, "resent": 0}],
    }


def test_the_auto_bucket_has_no_rate_of_its_own() -> None:
    assert AUTO.learned
    assert math.isinf(AUTO.per_minute)
    assert AUTO.burst == 1


# --- on the real clock: waiters at once ---------------------------------------------------------


def real_pacer(text: str) -> HostPacer:
    def open_host(index: int, limit: CallLimit) -> tuple[RateLimiter, SlotPool | None]:
        limiter = RateLimiter(
            UNLIMITED,
            MemoryBucketStore(),
            windows=limit.windows,
            window_margin_ns=CALL_WINDOW_MARGIN_NS,
        )
        return limiter, None

    pacer = CallPacer(parse_call_limits(text), open_host, ThrottlePolicy(), time.monotonic_ns())
    return host_of(pacer)


def test_waiters_at_once_are_put_down_to_the_window_that_held_them() -> None:
    """Calls that wait at once (``asyncio.gather``) are each put down to the limit that set
    their own wait (``RateLimiter.take_bound_async``: from the store's answer to their
    reservation, not from an attribute that every waiter's store operation sets)."""
    host = real_pacer("h=2/100ms")

    async def admit_at_once(count: int) -> None:
        await asyncio.gather(*(host.admit_async("h") for _ in range(count)))

    asyncio.run(admit_at_once(2))  # the window's two, at once
    asyncio.run(admit_at_once(4))  # two wait one window, two wait two
    stats = host.stats
    assert stats.throttled == 0
    assert stats.waits >= 4
    assert sum(stats.bound.values()) >= 0.25 * SECOND  # 0.1 + 0.1 + 0.2 + 0.2 s at least
    assert stats.bound.get("pauses", 0) < 0.01 * SECOND, stats.bound  # nothing paused
    assert stats.bound.get("2/0.1s", 0) >= 0.25 * SECOND, stats.bound


def test_threads_waiting_at_once_are_put_down_to_the_window_that_held_them() -> None:
    """The same for threads (``admit``): see the test above."""
    host = real_pacer("h=2/100ms")
    for _ in range(2):
        host.admit("h")
    threads = [threading.Thread(target=host.admit, args=("h",)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    stats = host.stats
    assert stats.calls == 6
    assert stats.bound.get("pauses", 0) < 0.01 * SECOND, stats.bound
    assert stats.bound.get("2/0.1s", 0) >= 0.25 * SECOND, stats.bound
