"""Call limits: the limits of one API host, as ``--call-limit HOST=LIMITS`` states them.

``HOST`` is a host name or address, optionally ``:port``, with ``*`` globs
(``*.example.com``), matched case-insensitively; an IPv6 address is written in brackets
(``[::1]:8080``). ``LIMITS`` is the ``--rate-limit`` grammar (``500/min, 10000/day``) or
``auto`` (learn the rate from the server), and optionally ``concurrency N`` (requests in
flight to the host at once). Pure: no I/O, no pytest.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re

from .policy import MAX_COUNT, WindowLimit, _positive_int, _quote, parse_windows
from .values import Value

__all__ = ["CallLimit", "find_call_limit", "parse_call_limit", "parse_call_limits"]

_HOST_NAME = re.compile(r"[a-z0-9*_]([a-z0-9*_.-]*[a-z0-9*_])?")
_PORT = re.compile(r"[0-9]{1,5}")


class CallLimit(Value):
    """The limits of the hosts ``host`` matches (a glob), on ``port`` (``None``: any port)."""

    __slots__ = ("auto", "concurrency", "host", "port", "text", "windows")
    host: str
    port: int | None
    windows: tuple[WindowLimit, ...]
    auto: bool
    concurrency: int | None
    text: str  # the entry as the user wrote it, normalised: ``api.example.com=20/2s``

    def __init__(
        self,
        host: str,
        port: int | None = None,
        windows: tuple[WindowLimit, ...] = (),
        auto: bool = False,
        concurrency: int | None = None,
    ) -> None:
        if not (windows or auto or concurrency):
            raise ValueError("a call limit needs limits, auto or a concurrency")
        if windows and auto:
            raise ValueError("a call limit is either stated (N/DURATION) or auto, not both")
        parts = [window.describe() for window in windows]
        if auto:
            parts.append("auto")
        if concurrency is not None:
            parts.append(f"concurrency {concurrency}")
        self._set(
            host=host,
            port=port,
            windows=tuple(windows),
            auto=auto,
            concurrency=concurrency,
            text=f"{_host_text(host, port)}={', '.join(parts)}",
        )

    @property
    def pattern(self) -> str:
        """The host part as written (normalised): ``*.example.com``, ``127.0.0.1:8080``."""
        return _host_text(self.host, self.port)

    @property
    def paced(self) -> bool:
        """Whether calls take tokens (a stated limit or auto), not only a concurrency slot."""
        return bool(self.windows) or self.auto

    def matches(self, host: str, port: int | None) -> bool:
        if self.port is not None and port != self.port:
            return False
        host = host.lower().strip("[]").rstrip(".")
        if ":" in host:  # an IPv6 address, in whatever spelling the client got
            host = _normal_address(host)
        return host == self.host or ("*" in self.host and fnmatch.fnmatchcase(host, self.host))


def _normal_address(host: str) -> str:
    """An IPv6 address in its one compressed spelling (``0:0::1`` is ``::1``); a glob or
    anything else as it is."""
    try:
        return ipaddress.IPv6Address(host).compressed
    except ValueError:
        return host


def _host_text(host: str, port: int | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


def _parse_host(text: str) -> tuple[str, int | None]:
    """``HOST[:PORT]`` -> the lower-case host (brackets of IPv6 removed) and the port."""
    text = text.strip().lower().rstrip(".")
    port_text = ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{_quote(text)}: an IPv6 address needs its closing bracket")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{_quote(text)}: only :PORT may follow the address")
            port_text = rest[1:]
            if not port_text:
                raise ValueError(f"{_quote(text)}: a port after the colon")
        if not re.fullmatch(r"[0-9a-f:.*]+", host) or ":" not in host:
            raise ValueError(f"{_quote(text)}: not an IPv6 address")
        host = _normal_address(host)
    else:
        if "/" in text:
            raise ValueError(
                f"{_quote(text)}: write the host, not a URL (api.example.com, not "
                "https://api.example.com/v1)"
            )
        host, colon, port_text = text.partition(":")
        if colon and ":" in port_text:
            raise ValueError(
                f"{_quote(text)}: write an IPv6 address in brackets, e.g. [::1] or [::1]:8080"
            )
        if colon and not port_text:
            raise ValueError(f"{_quote(text)}: a port after the colon")
        if not host:
            raise ValueError("no host before the '=' (e.g. api.example.com=20/2s)")
        if not _HOST_NAME.fullmatch(host):
            raise ValueError(
                f"{_quote(host)} is not a host name (letters, digits, '.', '-', and * globs)"
            )
    port = None
    if port_text:
        if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
            raise ValueError(f"{_quote(port_text)} is not a port (1 to 65535)")
        port = int(port_text)
    return host, port


def parse_call_limit(entry: str) -> CallLimit:
    """One ``HOST=LIMITS`` entry, or ``ValueError`` with a short reason."""
    host_text, equals, limits_text = entry.partition("=")
    if not equals:
        raise ValueError(
            f"{_quote(entry.strip())} is not HOST=LIMITS (e.g. api.example.com=20/2s, "
            "127.0.0.1:8080=auto)"
        )
    host, port = _parse_host(host_text)
    parts = [part.strip() for part in re.split(r"[,;]", limits_text) if part.strip()]
    if not parts:
        raise ValueError(
            f"{_quote(entry.strip())}: no limits after the '=' (N/DURATION, auto, concurrency N)"
        )
    windows: list[WindowLimit] = []
    auto = False
    concurrency = None
    for part in parts:
        words = part.lower().split()
        if words == ["auto"]:
            auto = True
        elif words and words[0] == "concurrency":
            if len(words) != 2:
                raise ValueError(f"{_quote(part)}: write concurrency N (1 to {MAX_COUNT})")
            try:
                concurrency = _positive_int(words[1])
            except ValueError as error:
                raise ValueError(f"{_quote(part)}: {error}") from None
        else:
            try:
                windows += parse_windows(part)
            except ValueError as error:
                raise ValueError(f"{error} (or auto, or concurrency N)") from None
    if auto and windows:
        raise ValueError(
            f"{_quote(entry.strip())}: auto learns the limit; state N/DURATION or auto, not both"
        )
    return CallLimit(host, port, tuple(windows), auto, concurrency)


def parse_call_limits(text: str) -> tuple[CallLimit, ...]:
    """``HOST=LIMITS`` entries, one per line (the ini key; each ``--call-limit`` is a line).
    A host stated twice is refused: which limit holds would be a guess."""
    limits: list[CallLimit] = []
    seen: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        limit = parse_call_limit(line)
        if limit.pattern in seen:
            raise ValueError(
                f"{limit.pattern} is stated twice ({seen[limit.pattern]} and "
                f"{limit.text}): state each host once"
            )
        seen[limit.pattern] = limit.text
        limits.append(limit)
    if not limits:
        raise ValueError("no call limit given (HOST=LIMITS, e.g. api.example.com=20/2s)")
    return tuple(limits)


def find_call_limit(
    limits: tuple[CallLimit, ...], host: str, port: int | None
) -> tuple[int, CallLimit] | None:
    """The first limit (its index, and itself) that ``host:port`` falls under; an entry with
    a port comes before one without when both match."""
    found: tuple[int, CallLimit] | None = None
    for index, limit in enumerate(limits):
        if limit.matches(host, port):
            if limit.port is not None:
                return index, limit
            if found is None:
                found = index, limit
    return found
