"""``http.client``: the layer under ``urllib``, ``urllib3``, ``requests`` and ``botocore``.

Every request goes through ``HTTPConnection.putrequest`` and its response through
``getresponse`` (urllib3's connection overrides both and calls them), so those are patched
on the base class and reach every subclass and every connection, however old. The request
is admitted in ``putrequest``, after the connection is open (so that connecting does not
delay the request past its admission); ``endheaders`` keeps the header lines http.client
buffered and ``send`` a body given as bytes, so that a throttled request can be sent again
on a fresh connection from ``getresponse``.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable
from typing import Any

from .pacer import Call, CallPacer, HostPacer

__all__ = ["patch"]

#: After a wait this long the connection opened before it may have been closed by the
#: server (keep-alive timeouts are often a few seconds): open a new one.
REOPEN_AFTER_NS = 1_000_000_000

_ATTRIBUTE = "_ratebatch_request"
_NAMES = ("putrequest", "endheaders", "send", "getresponse")
_BYTES = (bytes, bytearray, memoryview)


class Pending:
    """A request on one connection, from ``putrequest`` to ``getresponse``: what is needed
    to send it again."""

    __slots__ = (
        "body",
        "call",
        "chunked",
        "headers_done",
        "host",
        "lines",
        "method",
        "pacer",
        "replayable",
        "sent_after",
        "url",
    )

    def __init__(self, pacer: HostPacer, call: Call, host: str, method: str, url: str) -> None:
        self.pacer = pacer
        self.call = call
        self.host = host
        self.method = method
        self.url = url
        #: The request line and header lines as http.client buffers them before sending.
        self.lines: list[bytes] = []
        self.body: Any = None
        self.chunked = False
        self.headers_done = False
        self.sent_after: list[Any] = []  # body parts sent after the headers (urllib3)
        self.replayable = True


def _target(connection: http.client.HTTPConnection) -> tuple[str, int]:
    """The server the request is for: the tunnel's end through a proxy."""
    tunnel = getattr(connection, "_tunnel_host", None)
    if tunnel:
        return tunnel, getattr(connection, "_tunnel_port", None) or connection.port
    return connection.host, connection.port


def _reopen(connection: http.client.HTTPConnection) -> None:
    """A new socket for the connection, its state kept (``close`` would also drop what
    urllib3 keeps for the response it is about to read)."""
    sock, connection.sock = connection.sock, None
    if sock is not None:
        sock.close()
    connection.connect()


def patch(pacer: CallPacer) -> Callable[[], None]:
    """Patch ``http.client.HTTPConnection``; returns what undoes it."""
    cls = http.client.HTTPConnection
    original = {name: cls.__dict__[name] for name in _NAMES}
    putrequest = original["putrequest"]
    endheaders = original["endheaders"]
    send = original["send"]
    getresponse = original["getresponse"]

    def paced_putrequest(
        self: http.client.HTTPConnection,
        method: str,
        url: str,
        skip_host: bool = False,
        skip_accept_encoding: bool = False,
    ) -> None:
        previous: Pending | None = self.__dict__.pop(_ATTRIBUTE, None)
        if previous is not None:  # sent without a response read (an error): let its slot go
            previous.pacer.done(previous.call)
        host, port = _target(self)
        host_pacer = pacer.host(host, port)
        if host_pacer is not None:
            if self.sock is None:
                self.connect()
            call = host_pacer.admit(host)
            if call.wait_ns > REOPEN_AFTER_NS:
                _reopen(self)
            self.__dict__[_ATTRIBUTE] = Pending(host_pacer, call, host, method, url)
        putrequest(self, method, url, skip_host, skip_accept_encoding)

    def paced_endheaders(
        self: http.client.HTTPConnection,
        message_body: Any = None,
        *,
        encode_chunked: bool = False,
    ) -> None:
        pending: Pending | None = self.__dict__.get(_ATTRIBUTE)
        if pending is None:
            endheaders(self, message_body, encode_chunked=encode_chunked)
            return
        pending.body = message_body
        pending.chunked = encode_chunked
        lines: list[bytes] = self._buffer  # type: ignore[attr-defined]
        pending.lines = list(lines)  # sent and cleared by endheaders
        if message_body is not None and not isinstance(message_body, (*_BYTES, str)):
            pending.replayable = False  # a file or an iterable: read once
        elif b"\r\ntransfer-encoding:" in b"\r\n".join(lines).lower():
            pending.replayable = False  # a stream (urllib3 sends a generator's parts so)
        endheaders(self, message_body, encode_chunked=encode_chunked)
        pending.headers_done = True  # sends from here are the body's (urllib3 sends it so)

    def paced_send(self: http.client.HTTPConnection, data: Any) -> None:
        pending: Pending | None = self.__dict__.get(_ATTRIBUTE)
        if pending is not None and pending.headers_done and pending.replayable:
            # A body sent whole after the headers is kept to be sent again; one sent in
            # parts is a file or a stream read once (urllib3 reads those a block a time).
            if isinstance(data, _BYTES) and not pending.sent_after:
                pending.sent_after.append(data)
            else:
                pending.replayable = False
                pending.sent_after = []
        send(self, data)

    def paced_getresponse(self: http.client.HTTPConnection) -> http.client.HTTPResponse:
        pending: Pending | None = self.__dict__.pop(_ATTRIBUTE, None)
        if pending is None:
            return getresponse(self)  # type: ignore[no-any-return]
        host_pacer, call = pending.pacer, pending.call
        try:
            response: http.client.HTTPResponse = getresponse(self)
            while host_pacer.respond(call, response.status, response.msg, pending.replayable):
                response.close()
                _reopen(self)  # a fresh connection: the server may close the throttled one
                host_pacer.admit(pending.host, call)
                _send_again(self, pending)
                response = getresponse(self)
            return response
        finally:
            host_pacer.done(call)

    def _send_again(self: http.client.HTTPConnection, pending: Pending) -> None:
        putrequest(self, pending.method, pending.url, True, True)
        self._buffer[:] = pending.lines  # type: ignore[attr-defined]
        endheaders(self, pending.body, encode_chunked=pending.chunked)
        for part in pending.sent_after:
            send(self, part)

    cls.putrequest = paced_putrequest  # type: ignore[method-assign]
    cls.endheaders = paced_endheaders  # type: ignore[method-assign]
    cls.send = paced_send  # type: ignore[method-assign]
    cls.getresponse = paced_getresponse  # type: ignore[method-assign]

    def restore() -> None:
        for name, value in original.items():
            setattr(cls, name, value)

    return restore
