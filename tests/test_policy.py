from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from pytest_ratebatch.limits.bucket import MAX_REFILL_NS
from pytest_ratebatch.limits.policy import (
    MAX_COUNT,
    MAX_RATE_PER_MINUTE,
    MAX_SECONDS,
    MIN_RATE_PER_MINUTE,
    MIN_SECONDS,
    ExecutionPolicy,
    PolicyError,
    RateLimit,
    WindowLimit,
    build_policy,
    format_duration,
    format_rate,
    mask_url,
    parse_duration,
    parse_value,
    parse_windows,
    url_secrets,
)
from pytest_ratebatch.plugin.options import (
    COMMAND_LINE,
    OPTIONS,
    SHOWN_CHARACTERS,
    RawValue,
    flag_of,
)

SECOND = 1_000_000_000


def cli(**values: str) -> dict[str, RawValue]:
    return {name: RawValue(text, COMMAND_LINE) for name, text in values.items()}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("0", 0.0),
        ("1.5", 1.5),
        (".5", 0.5),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("1m 30s", 90.0),
        (" 2H ", 7200.0),
    ],
)
def test_parse_duration_accepts_seconds_and_units(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["", "abc", "10x", "-5", "5m5", "nan", "inf", "1e400", "m", "1.2.3s", "\u0663s", "1_0s"],
)
def test_parse_duration_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (600, "10m"),
        (7200, "2h"),
        (90, "1m30s"),
        (5400, "1h30m"),
        (1.5, "1.5s"),
        (0, "0s"),
        (30, "30s"),
    ],
)
def test_format_duration_is_short_and_exact(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_nothing_set_is_inactive() -> None:
    policy = build_policy({})
    assert policy == ExecutionPolicy()
    assert not policy.is_active
    assert policy.describe() == "no limits"


def test_burst_defaults_to_batch_size_else_one() -> None:
    assert build_policy(cli(rate_per_minute="60")).rate_limit == RateLimit(60.0, 1)
    assert build_policy(cli(rate_per_minute="60", batch_size="5")).rate_limit == RateLimit(60.0, 5)
    assert build_policy(
        cli(rate_per_minute="60", burst="7", batch_size="5")
    ).rate_limit == RateLimit(60.0, 7)


def test_full_policy_round_trip() -> None:
    policy = build_policy(
        cli(
            rate_per_minute="0.5",
            burst="3",
            batch_size="2",
            batch_backoff="1.5s",
            max_failures="4",
            total_timeout="10m",
        )
    )
    assert policy == ExecutionPolicy(RateLimit(0.5, 3), 2, 1.5, 4, 600.0)
    assert policy.is_active
    assert policy.describe() == (
        "rate 0.5/min, burst 3, batch size 2, backoff 1.5s, max failures 4, total timeout 10m"
    )


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("rate_per_minute", "0", "must be from 0.001 to 60000000"),
        ("rate_per_minute", "-1", "must be from 0.001 to 60000000"),
        ("rate_per_minute", "nan", "finite"),
        ("rate_per_minute", "inf", "finite"),
        ("rate_per_minute", "1e999", "must be from 0.001 to 60000000"),
        ("rate_per_minute", "sixty", "not a number"),
        ("burst", "0", "must be a whole number from 1 to 1000000"),
        ("burst", "2.5", "not a whole number"),
        ("batch_size", "-3", "must be a whole number from 1 to 1000000"),
        ("batch_size", "five", "not a whole number"),
        ("batch_size", "5.0", "not a whole number"),
        ("batch_backoff", "-1s", "duration"),
        ("batch_backoff", "3 fortnights", "duration"),
        ("max_failures", "0", "must be a whole number from 1 to 1000000"),
        ("max_failures", "1.5", "not a whole number"),
        ("total_timeout", "0", "must be from 1us to 365d"),
        ("total_timeout", "0s", "must be from 1us to 365d"),
        ("total_timeout", "10 parsecs", "duration"),
    ],
)
def test_bad_values_name_option_value_and_source(name: str, text: str, problem: str) -> None:
    values = {
        "rate_per_minute": RawValue("60", COMMAND_LINE),
        "batch_size": RawValue("1", COMMAND_LINE),
    }
    values[name] = RawValue(text, "ini file /repo/pytest.ini")
    with pytest.raises(PolicyError) as error:
        build_policy(values)
    message = str(error.value)
    assert message.startswith(f"ratebatch: {name}={text!r} (ini file /repo/pytest.ini): ")
    assert problem in message


def test_command_line_values_are_named_by_their_flag() -> None:
    with pytest.raises(PolicyError, match=r"--batch-size='0' \(command line\): must be a whole"):
        build_policy(cli(batch_size="0"))


def test_burst_smaller_than_batch_size_is_refused() -> None:
    with pytest.raises(
        PolicyError, match=r"--burst='3' \(command line\): smaller than the batch size \(5\)"
    ):
        build_policy(cli(rate_per_minute="60", burst="3", batch_size="5"))


def test_settings_that_would_do_nothing_are_refused() -> None:
    with pytest.raises(PolicyError, match="a burst needs a rate"):
        build_policy(cli(burst="3"))
    with pytest.raises(PolicyError, match="a batch backoff needs a batch size"):
        build_policy(cli(batch_backoff="2s"))


def test_interval_rounds_up_to_whole_nanoseconds() -> None:
    assert RateLimit(60).interval_ns == 1_000_000_000
    assert RateLimit(7).interval_ns == math.ceil(60e9 / 7)
    assert RateLimit(7).interval_ns * 7 >= 60e9
    assert RateLimit(1e15).interval_ns == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"per_minute": 0},
        {"per_minute": math.nan},
        {"per_minute": 60, "burst": 0},
        {"per_minute": 60, "burst": True},
    ],
)
def test_rate_limit_validates_its_fields(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        RateLimit(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0},
        {"batch_backoff": -1.0},
        {"max_failures": 0},
        {"total_timeout": 0.0},
        {"rate_limit": RateLimit(60, 2), "batch_size": 3},
    ],
)
def test_execution_policy_validates_its_fields(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"must be|smaller"):
        ExecutionPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "limits"),
    [
        ("10/s", [(10, 1.0)]),
        ("100/15min", [(100, 900.0)]),
        ("5000/h", [(5000, 3600.0)]),
        ("10/2s", [(10, 2.0)]),
        ("10000/day", [(10000, 86400.0)]),
        ("10000/d", [(10000, 86400.0)]),
        ("3/250ms", [(3, 0.25)]),
        ("10/1h30m", [(10, 5400.0)]),
        (" 10 / 2 s ; 25/10s,500/hour ", [(10, 2.0), (25, 10.0), (500, 3600.0)]),
    ],
)
def test_window_limits_read_as_apis_state_them(text: str, limits: list[tuple[int, float]]) -> None:
    policy = build_policy(cli(rate_limit=text))
    assert [(window.count, window.seconds) for window in policy.windows] == limits
    assert policy.is_active
    assert policy.rate_limit is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "no limit given"),
        ("10", "is not N/DURATION"),
        ("0/s", "the number of starts must be from 1 to 1000000"),
        ("ten/s", "'ten' is not a whole number"),
        ("10/2", "the window needs a unit (e.g. 2s)"),
        ("10/0s", "the window must be from 1us to 365d"),
        ("10/fortnight", "'fortnight' is not a duration"),
        ("10/s, 5/", "'' is not a duration"),
    ],
)
def test_bad_window_limits_name_the_entry(text: str, problem: str) -> None:
    with pytest.raises(PolicyError) as error:
        build_policy({"rate_limit": RawValue(text, "ini file /repo/pytest.ini")})
    message = str(error.value)
    assert message.startswith(f"ratebatch: rate_limit={text!r} (ini file /repo/pytest.ini): ")
    assert problem in message


def test_a_window_must_hold_a_whole_batch() -> None:
    with pytest.raises(
        PolicyError,
        match=r"--rate-limit='10/s, 3/2s' \(command line\): 3/2s allows fewer starts than the "
        r"batch size \(5\)",
    ):
        build_policy(cli(rate_limit="10/s, 3/2s", batch_size="5"))


def test_windows_and_concurrency_are_described_and_reported() -> None:
    policy = build_policy(
        cli(rate_per_minute="600", rate_limit="10/2s,10000/day", max_concurrency="2")
    )
    assert policy.max_concurrency == 2
    assert policy.describe() == ("rate 600/min, burst 1, limits 10/2s, 10000/1d, max concurrency 2")
    data = policy.to_json()
    assert data["max_concurrency"] == 2
    assert data["rate_limit"] == [
        {"count": 10, "window": 2.0, "window_ns": 2_000_000_000, "text": "10/2s"},
        {"count": 10000, "window": 86400.0, "window_ns": 86_400_000_000_000, "text": "10000/1d"},
    ]
    assert policy.largest_cost == (1, "the burst")
    assert build_policy(cli(rate_limit="10/2s, 4/s")).largest_cost == (4, "4/1s")


@pytest.mark.parametrize("text", ["0", "-1", "1.5", "many"])
def test_bad_max_concurrency_is_refused(text: str) -> None:
    with pytest.raises(PolicyError, match=rf"--max-concurrency='{text}' \(command line\)"):
        build_policy(cli(max_concurrency=text))


@pytest.mark.parametrize(
    ("per_minute", "text"),
    [(17050.4, "17050/min"), (120.0, "120/min"), (119.84, "119.8/min"), (60, "60/min"),
     (0.25, "0.25/min"), (1.04, "1/min")],
)  # fmt: skip
def test_rates_read_at_a_glance(per_minute: float, text: str) -> None:
    assert format_rate(per_minute) == text


# --- bounds: what every store keeps exactly ----------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("rate_per_minute", "1e-300", "must be from 0.001 to 60000000 (or auto)"),
        ("rate_per_minute", "1e-9", "must be from 0.001 to 60000000"),
        ("rate_per_minute", "0.0009", "must be from 0.001 to 60000000"),
        ("rate_per_minute", "60000001", "must be from 0.001 to 60000000"),
        ("rate_per_minute", "-0", "must be from 0.001 to 60000000"),
        ("rate_per_minute", "1e400", "must be from 0.001 to 60000000"),
        ("rate_per_minute", "-inf", "must be a finite number"),
        ("rate_per_minute", "٣", "not a number (write numbers with the digits 0-9)"),
        ("rate_per_minute", "\uff16\uff10", "not a number (write numbers with the digits 0-9)"),
        ("rate_per_minute", "1_000", "not a number"),
        ("burst", "1000001", "must be a whole number from 1 to 1000000"),
        ("burst", "99999999999999999999", "must be a whole number from 1 to 1000000"),
        ("burst", "٣", "not a whole number (write numbers with the digits 0-9)"),
        ("burst", "1e3", "not a whole number"),
        ("batch_size", "\uff11\uff12", "not a whole number (write numbers with the digits 0-9)"),
        ("max_failures", "1000001", "must be a whole number from 1 to 1000000"),
        ("max_concurrency", "99999999999999999999", "must be a whole number from 1 to 1000000"),
        ("max_concurrency", "9" * 5000, "must be a whole number from 1 to 1000000"),
        ("batch_backoff", "366d", "must be 0 or from 1us to 365d"),
        ("batch_backoff", "0.0000001", "must be 0 or from 1us to 365d"),
        ("total_timeout", "8761h", "must be from 1us to 365d"),
        ("total_timeout", "1e400s", "not a duration"),
        ("total_timeout", "9" * 400, "not a finite duration"),
        ("total_timeout", "٣s", "not a duration (use seconds or a unit: 90, 1.5s, 250ms, 10m"),
        ("rate_limit", "1000000000000/s", "the number of starts must be from 1 to 1000000"),
        ("rate_limit", "99999999999999999999999/s", "the number of starts must be from 1 to"),
        ("rate_limit", "100000000/day", "the number of starts must be from 1 to 1000000"),
        ("rate_limit", "10/366d", "the window must be from 1us to 365d"),
        ("rate_limit", "10/0.0000001s", "the window must be from 1us to 365d"),
        ("rate_limit", "10/" + "9" * 400 + "s", "the window must be from 1us to 365d"),
        ("rate_limit", "٣/s", "is not a whole number (write numbers with the digits 0-9)"),
        ("ratebatch_report", "report\0.json", "a path cannot hold a NUL character"),
        ("ratebatch_timeline", "\0", "a path cannot hold a NUL character"),
    ],
)
def test_values_out_of_bounds_are_refused(name: str, text: str, problem: str) -> None:
    with pytest.raises(PolicyError) as error:
        parse_value(name, RawValue(text, "-o/--override-ini"))
    message = str(error.value)
    shown = text if len(text) <= SHOWN_CHARACTERS else text[:SHOWN_CHARACTERS]
    assert message.startswith(f"ratebatch: {name}={shown!r}")
    assert problem in message
    assert len(message) < 400  # a long value is shown cut short


@pytest.mark.parametrize(
    ("values", "check"),
    [
        ({"rate_per_minute": "0.001"}, lambda p: p.rate_limit.interval_ns == 60_000 * SECOND),
        ({"rate_per_minute": "60000000"}, lambda p: p.rate_limit.interval_ns == 1000),
        ({"rate_per_minute": "1e3"}, lambda p: p.rate_limit.per_minute == 1000),
        ({"rate_per_minute": "+60"}, lambda p: p.rate_limit.per_minute == 60),
        (
            {"rate_per_minute": "60000000", "burst": "1000000", "batch_size": "1000000"},
            lambda p: (p.rate_limit.burst, p.batch_size) == (1_000_000, 1_000_000),
        ),
        ({"max_concurrency": "1000000"}, lambda p: p.max_concurrency == 1_000_000),
        ({"max_failures": "0001000000"}, lambda p: p.max_failures == 1_000_000),
        ({"rate_limit": "1000000/365d"}, lambda p: p.windows[0].count == 1_000_000),
        ({"rate_limit": "1/0.001ms"}, lambda p: p.windows[0].window_ns == 1000),
        ({"rate_limit": "10/s\n5/h"}, lambda p: len(p.windows) == 2),
        ({"total_timeout": "365d"}, lambda p: p.total_timeout == 365 * 86400),
        ({"total_timeout": "0.000001"}, lambda p: p.total_timeout == 1e-6),
        ({"total_timeout": "1d12h"}, lambda p: p.total_timeout == 1.5 * 86400),
        ({"batch_size": "2", "batch_backoff": "0"}, lambda p: p.batch_backoff == 0),
        ({"throttle_retries": "0"}, lambda p: p.throttling.retries == 0),
        ({"throttle_retries": "1000000"}, lambda p: p.throttling.retries == 1_000_000),
        ({"throttle_max_wait": "365d"}, lambda p: p.throttling.max_wait == 365 * 86400),
    ],
)
def test_values_at_the_bounds_are_accepted(
    values: dict[str, str], check: Callable[[ExecutionPolicy], bool]
) -> None:
    assert check(build_policy(cli(**values)))


def test_the_bounds_are_stated_in_every_help_text_and_agree_with_the_stores() -> None:
    assert MAX_COUNT == 1_000_000
    assert (MIN_RATE_PER_MINUTE, MAX_RATE_PER_MINUTE) == (0.001, 60_000_000)
    assert (MIN_SECONDS, MAX_SECONDS) == (1e-6, 365 * 86400)
    assert MAX_SECONDS * SECOND == MAX_REFILL_NS
    # The fastest rate is one start per microsecond: Redis's grain, so it keeps it exactly.
    assert RateLimit(MAX_RATE_PER_MINUTE).interval_ns == 1000
    helps = {spec.name: spec.help for spec in OPTIONS}
    for name in ("burst", "batch_size", "max_failures", "max_concurrency", "rate_limit"):
        assert "to 1000000" in helps[name], name
    assert "0 to 1000000" in helps["throttle_retries"]
    assert "from 0.001 to 60000000" in helps["rate_per_minute"]
    assert "within 365 days" in helps["burst"]
    for name in ("batch_backoff", "total_timeout", "throttle_max_wait", "rate_limit"):
        assert "1us to 365d" in helps[name], name
    assert "on or off" in helps["throttle_adapt"]


@pytest.mark.parametrize(
    ("values", "named", "refill"),
    [
        ({"rate_per_minute": "0.001", "burst": "526"}, "--burst='526'", "8766h40m"),
        ({"rate_per_minute": "0.001", "batch_size": "526"}, "--batch-size='526'", "8766h40m"),
        ({"rate_per_minute": "1", "burst": "1000000"}, "--burst='1000000'", "16666h40m"),
    ],
)
def test_a_burst_must_refill_within_365_days(
    values: dict[str, str], named: str, refill: str
) -> None:
    with pytest.raises(PolicyError) as error:
        build_policy(cli(**values))
    message = str(error.value)
    assert message.startswith(f"ratebatch: {named} (command line): a burst of ")
    assert f"takes {refill} to refill" in message
    assert "more than 365d" in message
    assert build_policy(cli(rate_per_minute="0.001", burst="525")).rate_limit == RateLimit(
        0.001, 525
    )


# --- the throttle options --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("throttle_retries", "-1", "must be a whole number from 0 to 1000000"),
        ("throttle_retries", "1000001", "must be a whole number from 0 to 1000000"),
        ("throttle_retries", "1.5", "not a whole number"),
        ("throttle_retries", "two", "not a whole number"),
        ("throttle_retries", "", "not a whole number"),
        ("throttle_max_wait", "0", "must be from 1us to 365d"),
        ("throttle_max_wait", "-1s", "not a duration"),
        ("throttle_max_wait", "366d", "must be from 1us to 365d"),
        ("throttle_max_wait", "nan", "not a duration"),
        ("throttle_max_wait", "soon", "not a duration"),
        ("throttle_adapt", "maybe", "not on or off"),
        ("throttle_adapt", "", "not on or off"),
        ("throttle_adapt", "2", "not on or off"),
        ("throttle_adapt", "onn", "not on or off"),
        ("ratebatch_throttle_exceptions", "", "no module:Class given"),
        ("ratebatch_throttle_exceptions", "QuotaError", "'QuotaError' is not module:Class"),
        ("ratebatch_throttle_exceptions", "errors:", "'errors:' is not module:Class"),
        ("ratebatch_throttle_exceptions", ":QuotaError", "':QuotaError' is not module:Class"),
        ("ratebatch_throttle_exceptions", ".errors:Quota", "'.errors:Quota' is not module:"),
        ("ratebatch_throttle_exceptions", "errors:1Quota", "'errors:1Quota' is not module:"),
        ("ratebatch_throttle_exceptions", "a:B, c", "'c' is not module:Class"),
    ],
)
def test_bad_throttle_values_are_refused(name: str, text: str, problem: str) -> None:
    for source in (COMMAND_LINE, "ini file /repo/pytest.ini"):
        with pytest.raises(PolicyError) as error:
            build_policy({name: RawValue(text, source)})
        option = flag_of(name) if source == COMMAND_LINE else name
        message = str(error.value)
        assert message.startswith(f"ratebatch: {option}={text!r} ({source}): ")
        assert problem in message


@pytest.mark.parametrize(
    ("text", "adapt"),
    [("on", True), ("OFF", False), (" yes ", True), ("no", False), ("True", True),
     ("false", False), ("1", True), ("0", False)],
)  # fmt: skip
def test_throttle_adapt_reads_on_and_off(text: str, adapt: bool) -> None:
    assert build_policy(cli(throttle_adapt=text)).throttling.adapt is adapt


def test_good_throttle_values_are_kept() -> None:
    throttling = build_policy(
        cli(
            throttle_retries="5",
            throttle_max_wait="1m30s",
            ratebatch_throttle_exceptions="myclient.errors:QuotaError, other:Outer.Inner",
        )
    ).throttling
    assert throttling.retries == 5
    assert throttling.max_wait == 90.0
    assert throttling.exceptions == ("myclient.errors:QuotaError", "other:Outer.Inner")


# --- store URLs: never a password in a message --------------------------------------------

SECRET = "Pa55-w0rd"

#: Store URLs of every shape a password can take, well formed or not.
SECRET_URLS = [
    f"redis://:{SECRET}@127.0.0.1:6379/0",
    f"redis://user:{SECRET}@127.0.0.1:6379/0",
    f"rediss://user:{SECRET}@redis.example:6380/1",
    f"redis://{SECRET}@127.0.0.1:6379/0",  # the password where the user name goes
    f"redis://127.0.0.1:6379/0?password={SECRET}",
    f"redis://127.0.0.1:6379/0?db=1&ssl_password={SECRET}",
    f"redis://:{SECRET}@[::1:6379/0",  # a bracket missing
    f"redis://:{SECRET}@127.0.0.1:notaport/0",
    f"redis://:pa/{SECRET}@127.0.0.1:6379/0",  # an unencoded '/' in the password
    f"redis://:pa?{SECRET}@127.0.0.1:6379/0",
    f"redis://:pa#{SECRET}@127.0.0.1:6379/0",
    f"redis://:pa@{SECRET}@127.0.0.1:6379/0",
    f"redis://:{SECRET}@",
    f"unix://:{SECRET}@/run/redis.sock?db=0",
    f"redis:{SECRET}@host",
]


@pytest.mark.parametrize("url", SECRET_URLS)
def test_mask_url_hides_the_password_whatever_the_shape(url: str) -> None:
    masked = mask_url(url)
    assert SECRET not in masked
    assert "***" in masked
    # What a message from elsewhere must not show either:
    assert any(SECRET in secret for secret in url_secrets(url))


def test_mask_url_keeps_what_is_not_secret() -> None:
    assert mask_url(f"redis://user:{SECRET}@h:6379/0") == "redis://user:***@h:6379/0"
    assert mask_url(f"redis://:{SECRET}@h:6379/0") == "redis://:***@h:6379/0"
    assert mask_url(f"redis://h:6379/0?password={SECRET}&db=2") == (
        "redis://h:6379/0?password=***&db=2"
    )
    assert mask_url("redis://h:6379/0") == "redis://h:6379/0"
    assert url_secrets("redis://h:6379/0") == []


@pytest.mark.parametrize("url", SECRET_URLS)
def test_a_bad_store_url_is_refused_without_its_password(url: str) -> None:
    """Either accepted (redis-py reads it as the user meant), or refused naming the option,
    never quoting the password."""
    message = ""
    try:
        parse_value("ratebatch_store", RawValue(url, COMMAND_LINE))
    except PolicyError as error:
        message = str(error)
    assert SECRET not in message
    assert not message or message.startswith("ratebatch: --ratebatch-store='")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (f"redis://:{SECRET}@[::1:6379/0", "malformed host or port"),
        (f"redis://:{SECRET}@127.0.0.1:notaport/0", "malformed host or port"),
        (f"redis://:pa/{SECRET}@127.0.0.1:6379/0", "must be percent-encoded"),
        (f"redis://:pa#{SECRET}@127.0.0.1:6379/0", "must be percent-encoded"),
        (f"redis:{SECRET}@host", "not a store"),
        ("redis://", "no host"),
    ],
)
def test_store_urls_that_redis_would_misread_are_refused(url: str, problem: str) -> None:
    with pytest.raises(PolicyError) as error:
        parse_value("ratebatch_store", RawValue(url, COMMAND_LINE))
    assert problem in str(error.value)
    assert SECRET not in str(error.value)


# --- the limits sessions sharing a key must agree on --------------------------------------


def test_shared_limits_are_the_rate_the_windows_and_the_cap() -> None:
    base = build_policy(cli(rate_per_minute="120", burst="5", rate_limit="10/s"))
    same = build_policy(
        cli(rate_per_minute="120", burst="5", rate_limit="10/s", batch_size="2", max_failures="3")
    )
    assert base.shared_limits() == same.shared_limits()  # batches and stops stay per session
    assert base.shared_limits()[1] == "rate 120/min, burst 5, limits 10/1s"
    others = [
        cli(rate_per_minute="600", burst="5", rate_limit="10/s"),
        cli(rate_per_minute="120", burst="4", rate_limit="10/s"),
        cli(rate_per_minute="120", burst="5", rate_limit="10/2s"),
        cli(rate_per_minute="120", burst="5"),
        cli(rate_per_minute="120", burst="5", rate_limit="10/s", max_concurrency="2"),
        cli(rate_limit="10/s"),
    ]
    prints = {build_policy(values).shared_limits()[0] for values in others}
    assert len(prints) == len(others)
    assert base.shared_limits()[0] not in prints
    assert ExecutionPolicy().shared_limits()[1] == "no rate"


def test_a_window_stated_twice_is_one_limit() -> None:
    # Redis names a window's log by its count and length: two equal windows would share it.
    assert parse_windows("2000/h, 2000/h; 10/s") == (
        WindowLimit(2000, 3600 * 1_000_000_000),
        WindowLimit(10, 1_000_000_000),
    )
