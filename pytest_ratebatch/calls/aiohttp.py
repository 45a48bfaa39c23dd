"""``aiohttp``: ``ClientSession._request``, which every request of a session goes through
(``get``, ``post``, ``request``; redirects are followed inside it).

aiohttp has no public layer that can hold a request back (its tracing signals only
observe), so its one request method is patched. A body given as bytes, text, a dict or a
list of pairs (and any ``json=``) can be sent again; a stream, a file or a ``FormData`` is
read once, and its throttle is handed to the test.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from .pacer import CallPacer

__all__ = ["patch"]

_REPLAYABLE = (bytes, bytearray, str, dict, list, tuple)


def patch(pacer: CallPacer, module: ModuleType) -> Callable[[], None]:
    """Patch ``module.ClientSession`` (``module`` is ``aiohttp``); returns the undo."""
    cls: Any = module.ClientSession
    request = cls.__dict__["_request"]
    response_error: Any = module.ClientResponseError

    async def paced_request(self: Any, method: str, str_or_url: Any, **kwargs: Any) -> Any:
        build = getattr(self, "_build_url", None)
        url = build(str_or_url) if build is not None else module.client.URL(str_or_url)
        host_pacer = pacer.host(url.host, url.port)
        if host_pacer is None:
            return await request(self, method, str_or_url, **kwargs)
        data = kwargs.get("data")
        replayable = data is None or isinstance(data, _REPLAYABLE)
        call = await host_pacer.admit_async(url.host)
        try:
            while True:
                try:
                    response = await request(self, method, str_or_url, **kwargs)
                except response_error as error:  # raise_for_status: the status as an error
                    status = getattr(error, "status", 0)
                    if not host_pacer.respond(call, status, error.headers, replayable):
                        raise
                else:
                    if not host_pacer.respond(call, response.status, response.headers, replayable):
                        return response
                    response.close()
                await host_pacer.admit_async(url.host, call)
        finally:
            host_pacer.done(call)

    cls._request = paced_request

    def restore() -> None:
        cls._request = request

    return restore
