"""``aiohttp``: ``ClientSession._request`` and ``ClientRequest.send``.

aiohttp has no public layer that can hold a request back (its tracing signals only
observe). ``ClientRequest.send`` sends each request once its connection is open: each one
to a limited host (a redirect's hops too) is admitted there, so that connecting does not
delay it past its admission. ``ClientSession._request``, which every request of a session
goes through, sends a throttled request again. A body given as bytes, text, a dict or a
list of pairs (and any ``json=``) can be sent again; a stream, a file or a ``FormData`` is
read once, and its throttle is handed to the test.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from types import ModuleType
from typing import Any

from ..views.calls import Call
from .pacer import CallPacer, HostPacer

__all__ = ["patch"]

_REPLAYABLE = (bytes, bytearray, str, dict, list, tuple)


class Sending:
    """The calls one ``_request`` sent (its redirect's hops), the last one first to answer
    for the response, and the call a re-send continues."""

    __slots__ = ("again", "calls")

    def __init__(self) -> None:
        self.calls: list[tuple[HostPacer, Call]] = []
        #: The throttled call the next send continues, and its pacer.
        self.again: tuple[HostPacer, Call] | None = None


_SENDING: ContextVar[Sending | None] = ContextVar("ratebatch_aiohttp_sending", default=None)


def patch(pacer: CallPacer, module: ModuleType) -> Callable[[], None]:
    """Patch ``module.ClientSession`` and ``module.ClientRequest`` (``module`` is
    ``aiohttp``); returns the undo."""
    session_cls: Any = module.ClientSession
    request_cls: Any = module.ClientRequest
    request = session_cls.__dict__["_request"]
    send = request_cls.__dict__["send"]
    response_error: Any = module.ClientResponseError

    async def paced_send(self: Any, conn: Any) -> Any:
        url = self.url
        host_pacer = pacer.host(url.host, url.port)
        if host_pacer is not None:
            sending = _SENDING.get()
            again = None
            if sending is not None and sending.again is not None:
                (_, again), sending.again = sending.again, None
            call = await host_pacer.admit_async(url.host, again)
            if sending is not None:
                sending.calls.append((host_pacer, call))
            else:  # not from a session's request: nothing will answer for it
                host_pacer.done(call)
        return await send(self, conn)

    async def paced_request(self: Any, method: str, str_or_url: Any, **kwargs: Any) -> Any:
        data = kwargs.get("data")
        replayable = data is None or isinstance(data, _REPLAYABLE)
        sending = Sending()
        token = _SENDING.set(sending)
        try:
            while True:
                sent = len(sending.calls)
                try:
                    response = await request(self, method, str_or_url, **kwargs)
                except response_error as error:  # raise_for_status: the status as an error
                    status, headers, response = getattr(error, "status", 0), error.headers, None
                    if len(sending.calls) == sent:
                        raise
                    host_pacer, call = sending.calls[-1]
                    if not host_pacer.respond(call, status, headers, replayable):
                        raise
                else:
                    if len(sending.calls) == sent:  # no limited host on the way
                        return response
                    host_pacer, call = sending.calls[-1]
                    if not host_pacer.respond(call, response.status, response.headers, replayable):
                        return response
                    response.close()
                sending.again = sending.calls.pop()  # the call goes on, sent again
        finally:
            _SENDING.reset(token)
            if sending.again is not None:  # a re-send that never reached a connection
                sending.calls.append(sending.again)
            for host_pacer, call in sending.calls:
                host_pacer.done(call)

    session_cls._request = paced_request
    request_cls.send = paced_send

    def restore() -> None:
        session_cls._request = request
        request_cls.send = send

    return restore
