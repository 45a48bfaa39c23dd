"""The execution policy: option specs, parsing, validation and the frozen value objects.

Nothing here imports pytest: the plugin feeds raw strings in and turns a ``PolicyError``
into ``pytest.UsageError``.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

from .values import Value

if TYPE_CHECKING:
    from .calls import CallLimit
    from .machine import MemoryFloor

__all__ = [
    "MARKER_KEYWORDS",
    "MAX_COUNT",
    "MAX_PRIORITY",
    "MAX_RATE_PER_MINUTE",
    "MAX_SECONDS",
    "MIN_RATE_PER_MINUTE",
    "MIN_SECONDS",
    "PARSERS",
    "ExecutionPolicy",
    "PolicyError",
    "RateLimit",
    "RawValue",
    "ThrottlePolicy",
    "WindowLimit",
    "build_policy",
    "format_duration",
    "format_rate",
    "mask_url",
    "parse_cost",
    "parse_duration",
    "parse_priority",
    "parse_store",
    "parse_value",
    "parse_windows",
    "url_secrets",
]

NANOS_PER_SECOND = 1_000_000_000


class RateLimit(Value):
    """A token bucket: ``per_minute`` tokens refill per minute, at most ``burst`` stored.

    ``per_minute=math.inf`` is a bucket without a rate of its own ("auto"): it admits at once
    until a throttle by the server pauses it or teaches it a rate.
    """

    __slots__ = ("burst", "per_minute")
    per_minute: float
    burst: int

    def __init__(self, per_minute: float, burst: int = 1) -> None:
        if not per_minute > 0:  # also refuses NaN
            raise ValueError(f"per_minute must be a number > 0, not {per_minute!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be an integer >= 1, not {burst!r}")
        self._set(per_minute=per_minute, burst=burst)

    @property
    def learned(self) -> bool:
        """Whether the rate is only what throttles by the server teach ("auto")."""
        return math.isinf(self.per_minute)

    @property
    def interval_ns(self) -> int:
        """Nanoseconds per token, rounded up so the bucket never runs faster than asked
        (0 for "auto": no rate of its own)."""
        if self.learned:
            return 0
        return max(1, math.ceil(60 * NANOS_PER_SECOND / self.per_minute))

    @property
    def per_second(self) -> float:
        return self.per_minute / 60


class WindowLimit(Value):
    """At most ``count`` cost starts in every (sliding) window of ``window_ns`` nanoseconds."""

    __slots__ = ("count", "window_ns")
    count: int
    window_ns: int

    def __init__(self, count: int, window_ns: int) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an integer >= 1, not {count!r}")
        if isinstance(window_ns, bool) or not isinstance(window_ns, int) or window_ns < 1:
            raise ValueError(f"window_ns must be an integer >= 1, not {window_ns!r}")
        self._set(count=count, window_ns=window_ns)

    @property
    def seconds(self) -> float:
        return self.window_ns / NANOS_PER_SECOND

    def describe(self) -> str:
        """``10/2s``, ``5000/1h``, ``10000/1d``: as written in the option, normalised."""
        seconds = self.seconds
        if seconds >= 86400 and seconds % 86400 == 0:
            return f"{self.count}/{int(seconds // 86400)}d"
        return f"{self.count}/{format_duration(seconds)}"

    def to_json(self) -> dict[str, Any]:
        """As the JSON report states a window limit."""
        return {
            "count": self.count,
            "window": self.seconds,
            "window_ns": self.window_ns,
            "text": self.describe(),
        }


class ThrottlePolicy(Value):
    """What happens when the server throttles a test (HTTP 429, or 503 with Retry-After).

    ``retries``: how often a throttled test runs again (0: never); ``max_wait``: the longest
    pause the server may ask for, in seconds, above which the session stops; ``adapt``:
    whether throttles lower the shared rate; ``exceptions``: the user's own exception types
    that mean "throttled", as ``module:Class``.
    """

    __slots__ = ("adapt", "exceptions", "max_wait", "retries")
    retries: int
    max_wait: float
    adapt: bool
    exceptions: tuple[str, ...]

    def __init__(
        self,
        retries: int = 2,
        max_wait: float = 300.0,
        adapt: bool = True,
        exceptions: tuple[str, ...] = (),
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, not {retries!r}")
        if not (math.isfinite(max_wait) and max_wait > 0):
            raise ValueError(f"max_wait must be > 0, not {max_wait!r}")
        self._set(retries=retries, max_wait=max_wait, adapt=adapt, exceptions=tuple(exceptions))


DEFAULT_THROTTLING = ThrottlePolicy()


class ExecutionPolicy(Value):
    """Everything the scheduler enforces; ``None`` means "no limit"."""

    __slots__ = (
        "batch_backoff",
        "batch_size",
        "call_limits",
        "max_concurrency",
        "max_failures",
        "max_load",
        "min_free_memory",
        "rate_limit",
        "resources",
        "throttling",
        "total_timeout",
        "windows",
    )
    rate_limit: RateLimit | None
    batch_size: int | None
    batch_backoff: float
    max_failures: int | None
    total_timeout: float | None
    throttling: ThrottlePolicy
    windows: tuple[WindowLimit, ...]
    max_concurrency: int | None
    call_limits: tuple[CallLimit, ...]
    #: ``--resources``: each name's capacity, sorted by name.
    resources: tuple[tuple[str, float], ...]
    min_free_memory: MemoryFloor | None
    max_load: float | None

    def __init__(
        self,
        rate_limit: RateLimit | None = None,
        batch_size: int | None = None,
        batch_backoff: float = 0.0,
        max_failures: int | None = None,
        total_timeout: float | None = None,
        throttling: ThrottlePolicy = DEFAULT_THROTTLING,
        windows: tuple[WindowLimit, ...] = (),
        max_concurrency: int | None = None,
        call_limits: tuple[CallLimit, ...] = (),
        resources: tuple[tuple[str, float], ...] = (),
        min_free_memory: MemoryFloor | None = None,
        max_load: float | None = None,
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size!r}")
        if not (math.isfinite(batch_backoff) and batch_backoff >= 0):
            raise ValueError(f"batch_backoff must be >= 0, not {batch_backoff!r}")
        if max_failures is not None and max_failures < 1:
            raise ValueError(f"max_failures must be >= 1, not {max_failures!r}")
        if total_timeout is not None and not (math.isfinite(total_timeout) and total_timeout > 0):
            raise ValueError(f"total_timeout must be > 0, not {total_timeout!r}")
        if rate_limit is not None and batch_size is not None and rate_limit.burst < batch_size:
            raise ValueError(
                f"burst ({rate_limit.burst}) is smaller than batch_size ({batch_size})"
            )
        for window in windows:
            if batch_size is not None and window.count < batch_size:
                raise ValueError(
                    f"window {window.describe()} is smaller than batch_size ({batch_size})"
                )
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, not {max_concurrency!r}")
        self._set(
            rate_limit=rate_limit,
            batch_size=batch_size,
            batch_backoff=batch_backoff,
            max_failures=max_failures,
            total_timeout=total_timeout,
            throttling=throttling,
            windows=tuple(windows),
            max_concurrency=max_concurrency,
            call_limits=tuple(call_limits),
            resources=tuple(sorted(resources)),
            min_free_memory=min_free_memory,
            max_load=max_load,
        )

    @property
    def is_active(self) -> bool:
        """Whether any limit is set (or throttles are handled otherwise than by default); an
        inactive policy lets the plugin stay out of the way."""
        return (
            self.rate_limit is not None
            or self.batch_size is not None
            or self.max_failures is not None
            or self.total_timeout is not None
            or self.throttling != DEFAULT_THROTTLING
            or bool(self.windows)
            or self.max_concurrency is not None
            or bool(self.call_limits)
            or self.gated
        )

    @property
    def gated(self) -> bool:
        """Whether a start waits for declared resources or the machine's memory or load."""
        return bool(self.resources) or self.min_free_memory is not None or self.max_load is not None

    @property
    def largest_cost(self) -> tuple[int, str] | None:
        """The most one start may cost, and the limit that says so (``None``: no bound)."""
        bounds = [(window.count, window.describe()) for window in self.windows]
        if self.rate_limit is not None:
            bounds.append((self.rate_limit.burst, "the burst"))
        return min(bounds) if bounds else None

    def shared_limits(self) -> tuple[str, str]:
        """What every session sharing a store's key must agree on (the rate and burst, the
        window limits, the concurrency cap): exactly, to compare, and as text for messages,
        e.g. ``rate 120/min, burst 1``."""
        rate = self.rate_limit
        exact = [
            f"interval {rate.interval_ns} burst {rate.burst}" if rate is not None else "no rate",
            " ".join(f"{window.count}/{window.window_ns}" for window in self.windows),
            f"cap {self.max_concurrency}",
            " ".join(f"{name}={amount!r}" for name, amount in self.resources),
            " ".join(
                f"{limit.pattern}:{'auto' if limit.auto else ''}"
                f"{'+'.join(f'{w.count}/{w.window_ns}' for w in limit.windows)}"
                f":{limit.concurrency}"
                for limit in self.call_limits
            ),
        ]
        text = ", ".join(self._limit_parts()) or "no rate"
        return "; ".join(exact), text

    def _limit_parts(self) -> list[str]:
        parts = []
        rate = self.rate_limit
        if rate is not None:
            per_minute = "auto" if rate.learned else f"{_format_number(rate.per_minute)}/min"
            parts.append(f"rate {per_minute}")
            parts.append(f"burst {rate.burst}")
        if self.windows:
            parts.append("limits " + ", ".join(window.describe() for window in self.windows))
        if self.max_concurrency is not None:
            parts.append(f"max concurrency {self.max_concurrency}")
        if self.call_limits:
            parts.append("calls " + "; ".join(limit.text for limit in self.call_limits))
        if self.resources:
            from .resources import describe_amounts

            parts.append(f"resources {describe_amounts(dict(self.resources))}")
        if self.min_free_memory is not None:
            parts.append(f"min free memory {self.min_free_memory.describe()}")
        if self.max_load is not None:
            parts.append(f"max load {_format_number(self.max_load)}")
        return parts

    def describe(self) -> str:
        """One line for the session header, e.g. ``rate 60/min, burst 5, batch size 5``."""
        parts = self._limit_parts()
        if self.batch_size is not None:
            parts.append(f"batch size {self.batch_size}")
            parts.append(f"backoff {format_duration(self.batch_backoff)}")
        if self.max_failures is not None:
            parts.append(f"max failures {self.max_failures}")
        if self.total_timeout is not None:
            parts.append(f"total timeout {format_duration(self.total_timeout)}")
        throttling = self.throttling
        if throttling != DEFAULT_THROTTLING:
            parts.append(f"throttle retries {throttling.retries}")
            parts.append(f"max wait {format_duration(throttling.max_wait)}")
            if not throttling.adapt:
                parts.append("no rate adaptation")
        return ", ".join(parts) if parts else "no limits"

    def to_json(self) -> dict[str, Any]:
        rate = self.rate_limit
        return {
            "rate_per_minute": ("auto" if rate.learned else rate.per_minute) if rate else None,
            "burst": rate.burst if rate else None,
            "interval_ns": rate.interval_ns if rate else None,
            "rate_limit": [window.to_json() for window in self.windows],
            "max_concurrency": self.max_concurrency,
            "call_limits": [
                {
                    "host": limit.pattern,
                    "rate_limit": [window.to_json() for window in limit.windows],
                    "auto": limit.auto,
                    "concurrency": limit.concurrency,
                    "text": limit.text,
                }
                for limit in self.call_limits
            ],
            "resources": dict(self.resources),
            "min_free_memory": (
                None if self.min_free_memory is None else self.min_free_memory.describe()
            ),
            "max_load": self.max_load,
            "batch_size": self.batch_size,
            "batch_backoff": self.batch_backoff,
            "max_failures": self.max_failures,
            "total_timeout": self.total_timeout,
            "throttle_retries": self.throttling.retries,
            "throttle_max_wait": self.throttling.max_wait,
            "throttle_adapt": self.throttling.adapt,
        }


class PolicyError(ValueError):
    """A bad option value, with the option, the value and where it came from."""


# --- value parsers: each takes the raw text and raises ValueError with a short reason ---

# The bounds of the options' values. Every store keeps what they allow exactly: the memory
# and file stores in 64-bit integer nanoseconds, Redis in microseconds held in Lua's doubles
# (exact to 2**53, about 230 years past today's clock); every wait they lead to is one the
# OS can sleep; a window's state stays small. No real use comes near them.

#: The largest whole number an option takes: a burst, a batch size, failures, a concurrency
#: cap, retries, the N of "N per window".
MAX_COUNT = 1_000_000
#: Rates per minute: one start per 1000 minutes at least (fewer: a window limit such as
#: 1/day), one per microsecond at most (the grain of Redis's clock).
MIN_RATE_PER_MINUTE = 0.001
MAX_RATE_PER_MINUTE = 60_000_000
#: Durations (a backoff, a timeout, a wait, a window): from a microsecond (the finest grain
#: of every store's clock) to 365 days; a burst refills within 365 days too.
MIN_SECONDS = 0.000_001
MAX_SECONDS = 365 * 86_400.0
MAX_SECONDS_TEXT = "365d"

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Patterns, not compiled objects: re compiles them on first use (and caches them), so a
# session without a duration option never pays for it. ASCII digits only: ``\d`` would take
# any script's digits, which nobody types into a policy on purpose.
_DURATION_PART = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ms|s|m|h|d)"
_PLAIN_NUMBER = r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+"
_DECIMAL = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_WHOLE = r"[+-]?[0-9]+"


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``1.5s``, ``250ms``, ``10m``, ``2h``, ``1d`` or ``1h30m``."""
    compact = text.strip().lower().replace(" ", "")
    if re.fullmatch(_PLAIN_NUMBER, compact):
        seconds = float(compact)
    else:
        parts = re.findall(_DURATION_PART, compact)
        if not parts or "".join(number + unit for number, unit in parts) != compact:
            raise ValueError(
                "not a duration (use seconds or a unit: 90, 1.5s, 250ms, 10m, 2h, 1d)"
                + _digits_hint(compact)
            )
        seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
    if not math.isfinite(seconds):
        raise ValueError("not a finite duration")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact spelling: ``10m``, ``2h``, ``1m30s``, ``1.5s``, ``0s``."""
    if seconds >= 60 and float(seconds).is_integer():
        hours, rest = divmod(int(seconds), 3600)
        minutes, secs = divmod(rest, 60)
        units = ((hours, "h"), (minutes, "m"), (secs, "s"))
        return "".join(f"{amount}{unit}" for amount, unit in units if amount)
    return f"{_format_number(seconds)}s"


def format_rate(per_minute: float) -> str:
    """A rate per minute to read at a glance: ``17050/min``, ``119.8/min``, ``0.25/min``."""
    if per_minute >= 1000:
        return f"{per_minute:.0f}/min"
    if per_minute >= 1:
        return f"{_format_number(round(per_minute, 1))}/min"
    return f"{per_minute:.2g}/min"


def _format_number(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".") or "0"


def _quote(text: str) -> str:
    """``text`` quoted for a message, cut short if long (a value can be any length)."""
    return repr(text) if len(text) <= 40 else f"{text[:40]!r}..."


def _digits_hint(text: str) -> str:
    """A hint for digits of other scripts (Arabic-Indic, full-width...), which look like
    numbers but are not what anyone means to type into a policy."""
    if any(character.isdigit() and not character.isascii() for character in text):
        return " (write numbers with the digits 0-9)"
    return ""


def _decimal(text: str) -> float:
    """A plain decimal number, with an optional exponent: ``60``, ``0.5``, ``1e3``."""
    compact = text.strip()
    if re.fullmatch(_DECIMAL, compact):
        return float(compact)  # a huge exponent gives inf or 0: the bounds refuse both
    if compact.lower().lstrip("+-") in ("inf", "infinity", "nan"):
        raise ValueError("must be a finite number")
    raise ValueError("not a number" + _digits_hint(compact))


def _whole_number(text: str, low: int) -> int:
    """A whole number from ``low`` to ``MAX_COUNT``."""
    compact = text.strip()
    if not re.fullmatch(_WHOLE, compact):
        raise ValueError("not a whole number" + _digits_hint(compact))
    value = _within_count(compact, low)
    if value is None:
        raise ValueError(f"must be a whole number from {low} to {MAX_COUNT}")
    return value


def _within_count(whole: str, low: int) -> int | None:
    """``whole`` (matching ``_WHOLE``) as an int if from ``low`` to ``MAX_COUNT``, else None."""
    digits = whole.lstrip("+-").lstrip("0")
    if len(digits) > len(str(MAX_COUNT)):
        return None  # not int() on thousands of digits (Python refuses past 4300)
    value = int(whole)
    return value if low <= value <= MAX_COUNT else None


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def _bounded_seconds(seconds: float, zero_allowed: bool) -> float:
    if seconds == 0 and zero_allowed:
        return 0.0
    if not MIN_SECONDS <= seconds <= MAX_SECONDS:
        allowed = f"from 1us to {MAX_SECONDS_TEXT}"
        raise ValueError(f"must be 0 or {allowed}" if zero_allowed else f"must be {allowed}")
    return seconds


def _non_negative_duration(text: str) -> float:
    return _bounded_seconds(parse_duration(text), zero_allowed=True)


def _positive_duration(text: str) -> float:
    return _bounded_seconds(parse_duration(text), zero_allowed=False)


def _rate(text: str) -> float:
    """A rate per minute, or ``auto``: learn it from the server (``math.inf`` here)."""
    if text.strip().lower() == "auto":
        return math.inf
    try:
        value = _decimal(text)
    except ValueError as error:
        raise ValueError(f"{error} (or auto: learn the rate from the server)") from None
    if not MIN_RATE_PER_MINUTE <= value <= MAX_RATE_PER_MINUTE:
        raise ValueError(
            f"must be from {_format_number(MIN_RATE_PER_MINUTE)} to {MAX_RATE_PER_MINUTE} "
            "(or auto); for fewer starts, state a window limit (--rate-limit 1/day)"
        )
    return value


_SWITCHES = {"on": True, "yes": True, "true": True, "1": True}
_SWITCHES.update({"off": False, "no": False, "false": False, "0": False})


def _switch(text: str) -> bool:
    try:
        return _SWITCHES[text.strip().lower()]
    except KeyError:
        raise ValueError("not on or off (also true/false, yes/no, 1/0)") from None


def _dotted_name(text: str) -> bool:
    return all(part.isidentifier() for part in text.split("."))


def _class_names(text: str) -> tuple[str, ...]:
    """``module:Class`` entries, separated by commas, spaces or lines."""
    names = tuple(name for name in re.split(r"[\s,]+", text.strip()) if name)
    if not names:
        raise ValueError("no module:Class given (e.g. myclient.errors:QuotaError)")
    for name in names:
        module, _, attribute = name.partition(":")
        if not (_dotted_name(module) and _dotted_name(attribute)):
            raise ValueError(f"{name!r} is not module:Class (e.g. myclient.errors:QuotaError)")
    return names


def _any_text(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _path(text: str) -> str:
    value = _any_text(text)
    if "\0" in value:
        raise ValueError("a path cannot hold a NUL character")
    return value


STORE_KINDS = ("memory", "file")
STORE_SCHEMES = ("redis", "rediss", "unix")


def parse_store(text: str) -> str:
    """``memory``, ``file`` or a Redis URL that splits as the user meant (else ``ValueError``
    with a reason that never quotes the URL)."""
    value = text.strip()
    if value in STORE_KINDS:
        return value
    if not value.startswith(tuple(f"{scheme}://" for scheme in STORE_SCHEMES)):
        raise ValueError(
            "not a store (use memory, file, redis://[user:password@]host:port/db or rediss://...)"
        )
    # Checked here, so that redis-py never reads (nor quotes in its errors) a URL that
    # splits elsewhere than the user meant.
    rest = value.partition("://")[2]
    if "@" in rest[_authority_end(rest) :]:
        raise ValueError(
            "'@' after the host: a '/', '?', '#' or '@' in the user or password must be "
            "percent-encoded (%2F, %3F, %23, %40)"
        )
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises for a port that is not a number)
    except ValueError:
        raise ValueError(
            "malformed host or port (host:port, a port from 0 to 65535, an IPv6 address in "
            "brackets: redis://[::1]:6379/0)"
        ) from None
    if not (parts.hostname or parts.path):
        raise ValueError("no host (redis://host:port/db, or unix:///path/to/socket)")
    return value


def _key(text: str) -> str:
    value = text.strip()
    if not value or any(character.isspace() for character in value):
        raise ValueError("must be a non-empty name without spaces")
    return value


#: The ``ratebatch`` marker's keywords, and what a misspelt one is told.
MARKER_KEYWORDS = frozenset({"cost", "pace_calls", "priority", "resources"})
MARKER_TAKES = "takes cost=N, priority=N, resources={NAME: AMOUNT} and pace_calls=True|False"
#: The highest priority (and, negated, the lowest) a test may state.
MAX_PRIORITY = 1_000_000


def parse_priority(value: object) -> int:
    """``@pytest.mark.ratebatch(priority=N)``: a whole number, higher starts first."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"priority must be a whole number, not {value!r}")
    if not -MAX_PRIORITY <= value <= MAX_PRIORITY:
        shown = str(value) if len(str(value)) <= 40 else f"{str(value)[:40]}..."
        raise ValueError(f"priority must be within -{MAX_PRIORITY}..{MAX_PRIORITY}, not {shown}")
    return value


def parse_cost(
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    burst: int | None,
    bound: str = "the burst",
) -> int:
    """Tokens from ``@pytest.mark.ratebatch(cost=N)`` (or ``ratebatch(N)``); 1 by default.

    ``burst`` is the most one start may cost, ``bound`` the limit that says so. The marker's
    keywords are checked here too: ``pace_calls=False`` (the test's calls are not paced);
    ``priority`` and ``resources`` are read on their own (``parse_priority``).
    """
    if len(args) > 1 or set(kwargs) - MARKER_KEYWORDS or (args and "cost" in kwargs):
        raise ValueError(MARKER_TAKES)
    pace_calls = kwargs.get("pace_calls", True)
    if not isinstance(pace_calls, bool):
        raise ValueError(f"pace_calls must be True or False, not {pace_calls!r}")
    cost = kwargs.get("cost", args[0] if args else 1)
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
        raise ValueError(f"cost must be a whole number >= 0, not {cost!r}")
    if cost > MAX_COUNT:  # what any burst or window holds at most, limits or not
        shown = str(cost) if len(str(cost)) <= 40 else f"{str(cost)[:40]}..."
        raise ValueError(f"cost must be at most {MAX_COUNT}, not {shown}")
    if burst is not None and cost > burst:
        remedy = "raise --burst" if bound == "the burst" else f"raise {bound}"
        raise ValueError(
            f"cost {cost} exceeds {bound} ({burst}): such a test could never start within "
            f"the limits; {remedy} or lower the cost"
        )
    return cost


_WINDOW_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
_WINDOW = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)?([a-z]+)"


def parse_windows(text: str) -> tuple[WindowLimit, ...]:
    """``N/DURATION`` limits, separated by commas, semicolons or lines: ``10/s``,
    ``100/15min``, ``10/2s; 5000/h``, ``10000/day``. A window without a number is one unit
    long. N is at most ``MAX_COUNT``, a window from 1us to 365 days."""
    entries = [entry.strip() for entry in re.split(r"[,;\n]", text) if entry.strip()]
    if not entries:
        raise ValueError("no limit given (use N/DURATION, e.g. 10/s, 100/15min, 5000/h)")
    windows = []
    for entry in entries:
        count_text, slash, window_text = entry.partition("/")
        if not slash:
            raise ValueError(f"{_quote(entry)} is not N/DURATION (e.g. 10/2s, 5000/h, 10000/day)")
        count_text = count_text.strip()
        if not re.fullmatch(_WHOLE, count_text):
            hint = _digits_hint(count_text)
            raise ValueError(f"{_quote(entry)}: {_quote(count_text)} is not a whole number{hint}")
        count = _within_count(count_text, 1)
        if count is None:
            raise ValueError(f"{_quote(entry)}: the number of starts must be from 1 to {MAX_COUNT}")
        seconds = _window_seconds(entry, window_text.strip().lower().replace(" ", ""))
        if not MIN_SECONDS <= seconds <= MAX_SECONDS:
            raise ValueError(f"{_quote(entry)}: the window must be from 1us to {MAX_SECONDS_TEXT}")
        window = WindowLimit(count, round(seconds * NANOS_PER_SECOND))
        if window not in windows:  # stated twice, one limit (a store keeps one log for it)
            windows.append(window)
    return tuple(windows)


def _window_seconds(entry: str, text: str) -> float:
    match = re.fullmatch(_WINDOW, text)
    if match and match.group(2) in _WINDOW_UNITS:
        number, unit = match.groups()
        seconds = (float(number) if number else 1.0) * _WINDOW_UNITS[unit]
        if not math.isfinite(seconds):
            raise ValueError(f"{_quote(entry)}: the window must be from 1us to {MAX_SECONDS_TEXT}")
        return seconds
    if re.fullmatch(_PLAIN_NUMBER, text):
        raise ValueError(f"{_quote(entry)}: the window needs a unit (e.g. {text[:20]}s)")
    try:
        return parse_duration(text)  # compound spellings: 1h30m
    except ValueError:
        raise ValueError(
            f"{_quote(entry)}: {_quote(text)} is not a duration (ms, s, min, h, day: 10/s, "
            f"100/15min){_digits_hint(text)}"
        ) from None


#: Query parameters of a store URL that hold a secret (redis-py hands every parameter to
#: the connection: ``?password=...`` authenticates).
_SECRET_PARAMETER = r"(?i)([?&][^=&#]*(?:pass|secret|token|auth|credential)[^=&#]*=)([^&#]*)"


def _authority_end(rest: str) -> int:
    """Where the host part of ``rest`` (a URL after its ``scheme://``) ends."""
    ends = [index for index in (rest.find(mark) for mark in "/?#") if index >= 0]
    return min(ends, default=len(rest))


def _user_info(url: str) -> tuple[int, int] | None:
    """Where the user information lies in ``url`` (after the scheme, up to its last '@'),
    whatever the URL's shape; ``None`` without an '@'."""
    marker = url.find("://")
    start = marker + 3 if marker >= 0 else url.find(":") + 1
    end = url.rfind("@")
    return (start, end) if end >= start else None


def mask_url(url: str) -> str:
    """``url`` with its secrets replaced by ``***``, whatever its shape: safe to print.

    A password (``user:***@host``, ``:***@host``), a user name alone (often a password
    written in the wrong place: ``***@host``), and query parameters such as ``?password=``.
    A URL that does not split cleanly (an '@' after its host part, a malformed host or port)
    loses everything from its scheme to its last '@'.
    """
    masked = re.sub(_SECRET_PARAMETER, r"\1***", url)
    span = _user_info(masked)
    if span is None:
        return masked
    try:
        parts = urlsplit(masked)
        parts.port  # noqa: B018 (raises for a malformed port)
        clean = "@" in parts.netloc and "@" not in parts.path + parts.query + parts.fragment
    except ValueError:
        clean = False
    if clean:
        host = parts.netloc.rsplit("@", 1)[1]
        user = f"{parts.username or ''}:" if parts.password is not None else ""
        return urlunsplit(parts._replace(netloc=f"{user}***@{host}"))
    start, end = span
    return f"{masked[:start]}***{masked[end:]}"


def url_secrets(url: str) -> list[str]:
    """Every text of ``url`` that ``mask_url`` hides, as written and percent-decoded,
    longest first: what an error message from elsewhere (redis-py) must not show."""
    found = [match.group(2) for match in re.finditer(_SECRET_PARAMETER, url)]
    span = _user_info(url)
    if span is not None:
        info = url[span[0] : span[1]]
        found += [info, info.partition(":")[2] or info]
    with contextlib.suppress(ValueError):
        parts = urlsplit(url)
        found.append(parts.password if parts.password is not None else parts.username or "")
    found += [unquote(secret) for secret in found]
    return sorted({secret for secret in found if secret}, key=len, reverse=True)


class RawValue(Protocol):
    """An option's value as the user wrote it, and a description naming where it came from
    (the plugin's ``options.RawValue``)."""

    @property
    def text(self) -> str: ...

    def describe(self, name: str) -> str: ...


def _resources(text: str) -> tuple[tuple[str, float], ...]:
    from .resources import parse_resources  # loaded only when resources are set

    return tuple(sorted(parse_resources(text).items()))


def _min_free_memory(text: str) -> MemoryFloor:
    from .machine import parse_memory_size

    return parse_memory_size(text)


def _max_load(text: str) -> float:
    from .machine import parse_max_load

    return parse_max_load(text)


def _call_limits(text: str) -> tuple[CallLimit, ...]:
    from .calls import parse_call_limits  # loaded only when call limits are set

    return parse_call_limits(text)


#: Each option's parser: raw text in, value out, or ``ValueError`` with a short reason.
PARSERS: dict[str, Callable[[str], Any]] = {
    "rate_per_minute": _rate,
    "rate_limit": parse_windows,
    "max_concurrency": _positive_int,
    "burst": _positive_int,
    "batch_size": _positive_int,
    "batch_backoff": _non_negative_duration,
    "max_failures": _positive_int,
    "total_timeout": _positive_duration,
    "throttle_retries": _non_negative_int,
    "throttle_max_wait": _positive_duration,
    "throttle_adapt": _switch,
    "ratebatch_throttle_exceptions": _class_names,
    "ratebatch_store": parse_store,
    "ratebatch_key": _key,
    "ratebatch_report": _path,
    "ratebatch_timeline": _path,
    "call_limits": _call_limits,
    "resources": _resources,
    "min_free_memory": _min_free_memory,
    "max_load": _max_load,
}


def parse_value(name: str, raw: RawValue) -> Any:
    """Parse one raw value, or raise ``PolicyError`` naming option, value and source."""
    try:
        return PARSERS[name](raw.text)
    except ValueError as error:
        raise PolicyError(f"ratebatch: {raw.describe(name)}: {error}") from None


def build_policy(raw: Mapping[str, RawValue]) -> ExecutionPolicy:
    """The validated policy from raw option values (missing keys mean "not set")."""
    values = {name: parse_value(name, value) for name, value in raw.items()}

    def conflict(name: str, problem: str) -> PolicyError:
        return PolicyError(f"ratebatch: {raw[name].describe(name)}: {problem}")

    batch_size: int | None = values.get("batch_size")
    rate: float | None = values.get("rate_per_minute")
    burst: int | None = values.get("burst")
    if burst is not None and rate is None:
        raise conflict("burst", "a burst needs a rate (--rate-per-minute)")
    windows: tuple[WindowLimit, ...] = values.get("rate_limit", ())
    for window in windows:
        if batch_size is not None and window.count < batch_size:
            raise conflict(
                "rate_limit",
                f"{window.describe()} allows fewer starts than the batch size ({batch_size}); "
                "a batch takes its tokens in every window at once",
            )
    if "batch_backoff" in values and batch_size is None:
        raise conflict("batch_backoff", "a batch backoff needs a batch size (--batch-size)")
    if burst is not None and batch_size is not None and burst < batch_size:
        raise conflict(
            "burst",
            f"smaller than the batch size ({batch_size}); a batch takes its tokens at once, "
            "so the burst must hold a whole batch",
        )
    rate_limit = None
    if rate is not None:
        rate_limit = RateLimit(rate, burst if burst is not None else (batch_size or 1))
        refill = rate_limit.burst * rate_limit.interval_ns / NANOS_PER_SECOND
        if refill > MAX_SECONDS:  # the bucket's times would run centuries ahead
            name = "burst" if burst is not None else "batch_size"
            raise conflict(
                name,
                f"a burst of {rate_limit.burst} takes {format_duration(round(refill))} to "
                f"refill at {_format_number(rate)}/min, more than {MAX_SECONDS_TEXT}: lower "
                "it or raise the rate",
            )
    throttling = ThrottlePolicy(
        retries=values.get("throttle_retries", DEFAULT_THROTTLING.retries),
        max_wait=values.get("throttle_max_wait", DEFAULT_THROTTLING.max_wait),
        adapt=values.get("throttle_adapt", DEFAULT_THROTTLING.adapt),
        exceptions=values.get("ratebatch_throttle_exceptions", ()),
    )
    return ExecutionPolicy(
        rate_limit=rate_limit,
        batch_size=batch_size,
        batch_backoff=values.get("batch_backoff", 0.0),
        max_failures=values.get("max_failures"),
        total_timeout=values.get("total_timeout"),
        throttling=throttling,
        windows=windows,
        max_concurrency=values.get("max_concurrency"),
        call_limits=values.get("call_limits", ()),
        resources=values.get("resources", ()),
        min_free_memory=values.get("min_free_memory"),
        max_load=values.get("max_load"),
    )
