"""``httpx`` 0.x and ``httpx2`` (under the openai, anthropic and google-genai SDKs), sync and
async.

Patched at the transport, the lowest public layer that sees every request and its
response: ``HTTPTransport.handle_request`` and ``AsyncHTTPTransport.handle_async_request``
(clients made before the patch hold instances of these classes, and see it). A request
whose body was read into memory (bytes, text, JSON, a form) can be sent again; a streamed
one cannot, and its throttle is handed to the test.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from .pacer import CallPacer

__all__ = ["patch"]


def _target(request: Any) -> tuple[str, int]:
    url = request.url
    return url.host, url.port or (443 if url.scheme == "https" else 80)


def patch(pacer: CallPacer, module: ModuleType) -> Callable[[], None]:
    """Patch the transports of ``module`` (``httpx`` or ``httpx2``); returns the undo."""
    sync_cls: Any = module.HTTPTransport
    async_cls: Any = module.AsyncHTTPTransport
    handle = sync_cls.__dict__["handle_request"]
    handle_async = async_cls.__dict__["handle_async_request"]

    def paced_handle_request(self: Any, request: Any) -> Any:
        host, port = _target(request)
        host_pacer = pacer.host(host, port)
        if host_pacer is None:
            return handle(self, request)
        call = host_pacer.admit(host)
        try:
            response = handle(self, request)
            replayable = hasattr(request, "_content")
            while host_pacer.respond(call, response.status_code, response.headers, replayable):
                response.close()
                host_pacer.admit(host, call)
                response = handle(self, request)
            return response
        finally:
            host_pacer.done(call)

    async def paced_handle_async_request(self: Any, request: Any) -> Any:
        host, port = _target(request)
        host_pacer = pacer.host(host, port)
        if host_pacer is None:
            return await handle_async(self, request)
        call = await host_pacer.admit_async(host)
        try:
            response = await handle_async(self, request)
            replayable = hasattr(request, "_content")
            while host_pacer.respond(call, response.status_code, response.headers, replayable):
                await response.aclose()
                await host_pacer.admit_async(host, call)
                response = await handle_async(self, request)
            return response
        finally:
            host_pacer.done(call)

    sync_cls.handle_request = paced_handle_request
    async_cls.handle_async_request = paced_handle_async_request

    def restore() -> None:
        sync_cls.handle_request = handle
        async_cls.handle_async_request = handle_async

    return restore
