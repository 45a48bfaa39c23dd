"""``httpx`` 0.x and ``httpx2`` (under the openai, anthropic and google-genai SDKs), sync and
async.

The transport (``HTTPTransport.handle_request``, ``AsyncHTTPTransport.handle_async_request``)
is the lowest public layer that sees every request and its response, and clients made before
the patch hold instances of these classes: it finds the request's host and sends a throttled
request again. The admission itself happens below, in the connection that sends the request
(httpcore's ``HTTP11Connection`` and ``HTTP2Connection``, or httpcore2's), once the
connection is open, so that connecting (a TLS handshake) does not delay a request past its
admission; a transport over another kind of pool admits before handing the request on. A
request whose body was read into memory (bytes, text, JSON, a form) can be sent again; a
streamed one cannot, and its throttle is handed to the test.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextvars import ContextVar
from types import ModuleType
from typing import Any

from ..views.calls import Call
from .pacer import CallPacer, HostPacer

__all__ = ["patch"]

#: The connection library under each client library.
CORES = {"httpx": "httpcore", "httpx2": "httpcore2"}
_CONNECTIONS = ("HTTP11Connection", "HTTP2Connection")


class Attempt:
    """A request on its way down to a connection: admitted there (``due`` until then)."""

    __slots__ = ("call", "due", "host", "pacer")

    def __init__(self, pacer: HostPacer, host: str) -> None:
        self.pacer = pacer
        self.host = host
        self.call: Call | None = None
        self.due = True


#: The attempt of the request this thread (or task) is sending, for its connection to admit.
_ATTEMPT: ContextVar[Attempt | None] = ContextVar("ratebatch_httpx_attempt", default=None)


def _target(request: Any) -> tuple[str, int]:
    url = request.url
    return url.host, url.port or (443 if url.scheme == "https" else 80)


def _patch_connections(core: ModuleType) -> Callable[[], None]:
    """Admit the due attempt in each connection class of ``core`` before it sends."""
    undo: list[tuple[Any, str, Any]] = []
    for name in _CONNECTIONS:
        sync_cls: Any = getattr(core, name, None)
        async_cls: Any = getattr(core, f"Async{name}", None)
        if sync_cls is not None and "handle_request" in sync_cls.__dict__:
            handle = sync_cls.__dict__["handle_request"]
            sync_cls.handle_request = _admitting(handle)
            undo.append((sync_cls, "handle_request", handle))
        if async_cls is not None and "handle_async_request" in async_cls.__dict__:
            handle_async = async_cls.__dict__["handle_async_request"]
            async_cls.handle_async_request = _admitting_async(handle_async)
            undo.append((async_cls, "handle_async_request", handle_async))

    def restore() -> None:
        for cls, name, original in undo:
            setattr(cls, name, original)

    return restore


def _admitting(handle: Any) -> Any:
    def handle_request(self: Any, request: Any) -> Any:
        attempt = _ATTEMPT.get()
        if attempt is not None and attempt.due:
            attempt.due = False
            attempt.call = attempt.pacer.admit(attempt.host, attempt.call)
        return handle(self, request)

    return handle_request


def _admitting_async(handle: Any) -> Any:
    async def handle_async_request(self: Any, request: Any) -> Any:
        attempt = _ATTEMPT.get()
        if attempt is not None and attempt.due:
            attempt.due = False
            attempt.call = await attempt.pacer.admit_async(attempt.host, attempt.call)
        return await handle(self, request)

    return handle_async_request


def patch(pacer: CallPacer, module: ModuleType) -> Callable[[], None]:
    """Patch the transports of ``module`` (``httpx`` or ``httpx2``) and the connections of
    its httpcore; returns the undo."""
    core = importlib.import_module(CORES[module.__name__])  # already imported by ``module``
    pool_types = (core.ConnectionPool, core.AsyncConnectionPool)
    sync_cls: Any = module.HTTPTransport
    async_cls: Any = module.AsyncHTTPTransport
    handle = sync_cls.__dict__["handle_request"]
    handle_async = async_cls.__dict__["handle_async_request"]

    def paced_handle_request(self: Any, request: Any) -> Any:
        host, port = _target(request)
        host_pacer = pacer.host(host, port)
        if host_pacer is None:
            return handle(self, request)
        attempt = Attempt(host_pacer, host)
        token = _ATTEMPT.set(attempt)
        try:
            while True:
                if not isinstance(getattr(self, "_pool", None), pool_types):
                    attempt.call = host_pacer.admit(host, attempt.call)  # no connection of ours
                    attempt.due = False
                response = handle(self, request)
                call = attempt.call
                if call is None or not host_pacer.respond(
                    call, response.status_code, response.headers, hasattr(request, "_content")
                ):
                    return response
                response.close()
                attempt.due = True
        finally:
            _ATTEMPT.reset(token)
            if attempt.call is not None:
                host_pacer.done(attempt.call)

    async def paced_handle_async_request(self: Any, request: Any) -> Any:
        host, port = _target(request)
        host_pacer = pacer.host(host, port)
        if host_pacer is None:
            return await handle_async(self, request)
        attempt = Attempt(host_pacer, host)
        token = _ATTEMPT.set(attempt)
        try:
            while True:
                if not isinstance(getattr(self, "_pool", None), pool_types):
                    attempt.call = await host_pacer.admit_async(host, attempt.call)
                    attempt.due = False
                response = await handle_async(self, request)
                call = attempt.call
                if call is None or not host_pacer.respond(
                    call, response.status_code, response.headers, hasattr(request, "_content")
                ):
                    return response
                await response.aclose()
                attempt.due = True
        finally:
            _ATTEMPT.reset(token)
            if attempt.call is not None:
                host_pacer.done(attempt.call)

    sync_cls.handle_request = paced_handle_request
    async_cls.handle_async_request = paced_handle_async_request
    restore_connections = _patch_connections(core)

    def restore() -> None:
        sync_cls.handle_request = handle
        async_cls.handle_async_request = handle_async
        restore_connections()

    return restore
