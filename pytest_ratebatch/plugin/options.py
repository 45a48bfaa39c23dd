"""The options: one flag and one ini key per setting, sharing one help text.

This module is imported on every pytest run, policy or not, so it holds only the table and
reads raw values; parsing and validation live in ``limits.policy``. A flag wins over
``-o key=value``, which wins over the ini file (pytest's rule for ``-o``, which overrides ini
values, not flags); ``-o`` is reported as its own source.
"""

from __future__ import annotations

import pytest

__all__ = [
    "CALL_LIMITS_OPTION",
    "COMMAND_LINE",
    "KEY_OPTION",
    "OPTIONS",
    "REPORT_OPTION",
    "STORE_OPTION",
    "THROTTLE_EXCEPTIONS_OPTION",
    "TIMELINE_OPTION",
    "OptionSpec",
    "RawValue",
    "add_options",
    "flag_of",
    "read_raw_options",
]

COMMAND_LINE = "command line"
REPORT_OPTION = "ratebatch_report"
TIMELINE_OPTION = "ratebatch_timeline"
STORE_OPTION = "ratebatch_store"
KEY_OPTION = "ratebatch_key"
THROTTLE_EXCEPTIONS_OPTION = "ratebatch_throttle_exceptions"
CALL_LIMITS_OPTION = "call_limits"
#: Flags not spelled from their ini key: one ``--call-limit`` per host, ``call_limits`` lines.
_FLAGS = {CALL_LIMITS_OPTION: "--call-limit"}
#: Flags given once per entry; their entries are read as the lines of one value.
_REPEATED = frozenset(_FLAGS)
#: How much of a value a message shows (a value pasted by mistake can be any length).
SHOWN_CHARACTERS = 80


def flag_of(name: str) -> str:
    """The command-line flag of an ini key: ``rate_per_minute`` -> ``--rate-per-minute``."""
    return _FLAGS.get(name) or "--" + name.replace("_", "-")


class OptionSpec:
    """One setting: its ini key (``name``), the metavar of its flag, and its help text."""

    __slots__ = ("help", "metavar", "name")

    def __init__(self, name: str, metavar: str, help: str) -> None:
        self.name = name
        self.metavar = metavar
        self.help = help

    @property
    def flag(self) -> str:
        return flag_of(self.name)

    @property
    def dest(self) -> str:
        return self.name if self.name.startswith("ratebatch_") else f"ratebatch_{self.name}"


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec(
        "rate_per_minute",
        "N",
        "Average cost of tests started per minute, across all processes sharing the limiter "
        "(a number from 0.001 to 60000000, e.g. 60 or 0.5), or auto: no known limit, pace "
        "only at the rate learnt from the server's throttles. Default: no rate limit.",
    ),
    OptionSpec(
        "burst",
        "N",
        "Bucket capacity: how much may start back to back after idling (a whole number from "
        "1 to 1000000 that the rate refills within 365 days). Default: the batch size, else "
        "1. Needs a rate.",
    ),
    OptionSpec(
        "rate_limit",
        "LIMITS",
        "Limits as the API states them: N/DURATION, at most N cost started in every sliding "
        "window of that length, across all processes sharing the limiter; several separated "
        'by commas, all held at once (10/s, 100/15min, "10/2s, 500/h, 10000/day"); N from 1 '
        "to 1000000, a window from 1us to 365d. Combines with --rate-per-minute. Default: "
        "none.",
    ),
    OptionSpec(
        CALL_LIMITS_OPTION,
        "HOST=LIMITS",
        "Pace the HTTP calls tests make to HOST (a name or address, :port optional, * globs: "
        "api.example.com, 127.0.0.1:8080, *.example.com), whatever client sends them "
        "(http.client, urllib, requests, httpx, httpx2, aiohttp, and the SDKs on them): "
        'LIMITS as --rate-limit states them (20/2s, "500/min, 10000/day"), or auto (learn '
        "from the server's throttles and published budget), optionally with concurrency N "
        "(calls in flight at once). A throttled call (429) is sent again after the server's "
        "wait, up to --throttle-retries times. Give the flag once per host (one HOST = LIMITS "
        "per line in the ini file). Shared like the test rate. Default: calls are not paced.",
    ),
    OptionSpec(
        "max_concurrency",
        "N",
        "At most N tests in flight at once (from their start to the end of their teardown), "
        "across all processes sharing the limiter (1 to 1000000). Default: no limit.",
    ),
    OptionSpec(
        "resources",
        "NAME=AMOUNT",
        "What the machine (or the sessions sharing the store) has of resources you name, "
        'e.g. "memory=8, gpu=2": a test marked @pytest.mark.ratebatch(resources={"gpu": 1}) '
        "starts only when its amounts fit in what the tests in flight leave free; waiters in "
        "order, higher priority first. Amounts are positive numbers up to 1e12. Default: none.",
    ),
    OptionSpec(
        "min_free_memory",
        "SIZE",
        "Start a test only while the machine has at least SIZE of memory available "
        "(/proc/meminfo's MemAvailable): 512MiB, 2GiB, 1.5G, 10%. KiB/MiB/GiB/TiB and K/M/G/T "
        "are powers of 1024, KB/MB/GB/TB of 1000. Default: no gate.",
    ),
    OptionSpec(
        "max_load",
        "N",
        "Start a test only while the 1-minute load average is below N (a positive number up "
        "to 1000000). Default: no gate.",
    ),
    OptionSpec(
        "batch_size",
        "K",
        "Release tests in batches of at most K; a batch starts only after the previous one "
        "finished and the backoff passed (1 to 1000000). Default: no batches.",
    ),
    OptionSpec(
        "batch_backoff",
        "DURATION",
        "Pause after a batch finishes, before the next starts: 0, or from 1us to 365d (90, "
        "1.5s, 250ms, 10m, 2h, 1d). Default: 0. Needs a batch size.",
    ),
    OptionSpec(
        "max_failures",
        "N",
        "Start no more tests once N tests failed or errored (1 to 1000000); the rest are "
        "reported as cancelled skips. Default: no limit.",
    ),
    OptionSpec(
        "total_timeout",
        "DURATION",
        "Start no more tests once the session is this old, from 1us to 365d (90, 1.5s, 10m, "
        "2h, 1d); the rest are reported as cancelled skips. Default: no limit.",
    ),
    OptionSpec(
        "throttle_retries",
        "N",
        "How often a test the server throttled (HTTP 429, or 503 with Retry-After) runs "
        "again, after the server's wait (0 to 1000000); 0: never. Default: 2.",
    ),
    OptionSpec(
        "throttle_max_wait",
        "DURATION",
        "The longest wait a throttling server may ask for (Retry-After and the like), from "
        "1us to 365d; a longer one, or one past the total timeout, stops the session. "
        "Default: 5m.",
    ),
    OptionSpec(
        "throttle_adapt",
        "on|off",
        "Whether each throttle lowers the shared rate to what the server sustained, which "
        "then recovers toward the configured rate (on or off; also true/false, yes/no, "
        "1/0). Default: on.",
    ),
    OptionSpec(
        THROTTLE_EXCEPTIONS_OPTION,
        "MODULE:CLASS",
        "More exception types that mean the server throttled a test, as module:Class, "
        "separated by commas or spaces (HTTP 429 from the usual clients needs none).",
    ),
    OptionSpec(
        STORE_OPTION,
        "URL",
        "Where the token bucket lives: memory (one process), file (the workers of one "
        "pytest-xdist session), or redis://[user:password@]host:port/db (rediss:// for TLS; "
        "a / ? # or @ in the password percent-encoded) to share one rate across sessions and "
        "machines. Default: memory, file under xdist.",
    ),
    OptionSpec(
        KEY_OPTION,
        "NAME",
        "Name of the shared bucket in a Redis store: sessions with the same store and key "
        "share one rate and burst. A key names one limit: a session whose rate, burst, "
        "--rate-limit or --max-concurrency differ from those of a session using the key "
        "fails to start. Default: default.",
    ),
    OptionSpec(
        REPORT_OPTION,
        "PATH",
        "Write a JSON report (policy, each test's start, finish, batch, tokens, wait and "
        "outcome, stop reason) to PATH. Default: no report.",
    ),
    OptionSpec(
        TIMELINE_OPTION,
        "PATH",
        "Draw the session as an SVG timeline at PATH at the end: a lane per process, each "
        "test's run, waits, batches, pauses and throttles, and the cost started against the "
        "policy's bound. Default: no timeline.",
    ),
)


class RawValue:
    """An option value as the user wrote it, and where: the command line or an ini file."""

    __slots__ = ("source", "text")

    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RawValue):
            return NotImplemented
        return (self.text, self.source) == (other.text, other.source)

    def __hash__(self) -> int:
        return hash((self.text, self.source))

    def __repr__(self) -> str:
        return f"RawValue({self.text!r}, {self.source!r})"

    def describe(self, name: str) -> str:
        """``--burst='3' (command line)`` or ``burst='3' (ini file /repo/pytest.ini)``."""
        option = flag_of(name) if self.source == COMMAND_LINE else name
        text = self.text
        if name == STORE_OPTION:
            from ..limits.policy import mask_url  # only ever needed for an error message

            text = mask_url(text)
        if len(text) > SHOWN_CHARACTERS:
            shown = text[:SHOWN_CHARACTERS]
            return f"{option}={shown!r}... ({len(text)} characters, {self.source})"
        return f"{option}={text!r} ({self.source})"


def add_options(parser: pytest.Parser) -> None:
    """Each setting as a flag and an ini key, sharing one help text."""
    group = parser.getgroup(
        "ratebatch", "rate limit, batches and stop conditions (pytest-ratebatch)"
    )
    for spec in OPTIONS:
        group.addoption(
            spec.flag,
            dest=spec.dest,
            metavar=spec.metavar,
            default=None,
            help=spec.help.replace("%", "%%"),  # argparse formats a flag's help with %
            action="append" if spec.name in _REPEATED else "store",
        )
        parser.addini(spec.name, help=spec.help, default=None)


def read_raw_options(config: pytest.Config) -> dict[str, RawValue]:
    """Each option the user set, as written: a flag wins over ``-o``, which wins over the ini
    file.

    Empty when nothing is set, which is what keeps an unconfigured session free.
    """
    raw: dict[str, RawValue] = {}
    ini_source = ""
    for spec in OPTIONS:
        value = getattr(config.option, spec.dest, None)
        if value is not None:
            text = "\n".join(value) if isinstance(value, list) else str(value)
            raw[spec.name] = RawValue(text, COMMAND_LINE)
            continue
        if not ini_source:
            ini_source = f"ini file {config.inipath}"
        try:
            ini_value = config.getini(spec.name)
        except (TypeError, ValueError) as error:
            raise pytest.UsageError(
                f"ratebatch: {spec.name} ({ini_source}): {error}; "
                f'write the value as a string, e.g. {spec.name} = "60"'
            ) from None
        if ini_value not in (None, ""):
            # The keys as pytest reads them: the text before the first "=", unstripped.
            overrides = {entry.split("=", 1)[0] for entry in config.option.override_ini or ()}
            source = "-o/--override-ini" if spec.name in overrides else ini_source
            raw[spec.name] = RawValue(str(ini_value), source)
    return raw
