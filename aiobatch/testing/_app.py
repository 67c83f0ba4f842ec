"""The fake batch service over real HTTP: an aiohttp web application.

The app only translates: an incoming :class:`aiohttp.web.Request` becomes our
:class:`~aiobatch.transport.Request` (full URL, query parameters, lower-cased headers,
body bytes or a parsed multipart form), the service answers, and its
:class:`~aiobatch.transport.Response` goes back out, streamed when its body is a stream.
When the service raises :class:`~aiobatch.errors.TransportError` (a simulated network
failure) the app drops the TCP connection without answering.

The service's headers go out as they are; its ``date`` header (from the service's
clock, which may be virtual) is kept, since aiohttp adds its own only when there is
none. As on a real server, a handler keeps running when its client hangs up (aiohttp's
``handler_cancellation`` is off), so a request whose client timed out still takes
effect (see ``Fault.slow(..., act_after_delay=True)``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from aiohttp import BodyPartReader, web

from ..errors import TransportError
from ..transport._base import FilePart, Multipart, Request, Response

__all__ = ["SERVICE_KEY", "Handles", "make_app", "run_fake_server"]

# Uploads are read into memory by the fake service: allow the Batch API's largest file
# (512 MB) plus room for the multipart framing.
MAX_BODY = 600 * 1024 * 1024

# Headers that describe the framing of a body: aiohttp computes its own.
_HOP_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


class Handles(Protocol):
    """What the app needs from a service: :meth:`FakeBatchService.handle`."""

    async def handle(self, request: Request) -> Response:
        """Answer one request; raise TransportError to drop the connection."""
        ...


SERVICE_KEY: web.AppKey[Handles] = web.AppKey("aiobatch_service", Handles)


def make_app(service: Handles, *, client_max_size: int = MAX_BODY) -> web.Application:
    """Build an aiohttp application that serves ``service`` on every path.

    Args:
        service: the fake batch service (anything with ``async handle(Request)``).
        client_max_size: the largest request body accepted, in bytes.

    Returns:
        The application; run it with :func:`run_fake_server`, ``aiohttp.web.run_app``
        or pytest-aiohttp's ``aiohttp_server`` fixture.
    """
    app = web.Application(client_max_size=client_max_size)
    app[SERVICE_KEY] = service
    app.router.add_route("*", "/{tail:.*}", _handle)
    return app


async def _handle(web_request: web.Request) -> web.StreamResponse:
    service = web_request.app[SERVICE_KEY]
    request = await _to_request(web_request)
    try:
        response = await service.handle(request)
    except TransportError:
        _drop(web_request)
        # The connection is gone; aiohttp ignores the failed write of this answer.
        return web.Response(status=500)
    return await _to_web_response(web_request, response)


def _drop(web_request: web.Request) -> None:
    """Close the connection without answering, so the client sees a disconnect."""
    transport = web_request.transport
    if transport is not None:
        transport.abort()


async def _to_request(web_request: web.Request) -> Request:
    """Our Request for an incoming one."""
    url = web_request.url.with_query(None)
    headers = {k.lower(): v for k, v in web_request.headers.items()}
    body: bytes | Multipart | None
    if web_request.content_type.startswith("multipart/"):
        body = await _read_multipart(web_request)
    elif web_request.body_exists:
        body = await web_request.read()
    else:
        body = None
    return Request(
        method=web_request.method,
        url=str(url),
        params=dict(web_request.query),
        headers=headers,
        body=body,
    )


async def _read_multipart(web_request: web.Request) -> Multipart:
    """Parse a multipart/form-data body into plain fields and in-memory file parts."""
    fields: list[tuple[str, str]] = []
    files: list[tuple[str, FilePart]] = []
    reader = await web_request.multipart()
    while True:
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            raise web.HTTPBadRequest(text="nested multipart bodies are not supported")
        name = part.name or ""
        data = await part.read()
        if part.filename is not None:
            content_type = part.headers.get("Content-Type", "application/octet-stream")
            files.append(
                (
                    name,
                    FilePart(
                        filename=part.filename, content=bytes(data), content_type=content_type
                    ),
                )
            )
        else:
            fields.append((name, data.decode(part.get_charset("utf-8"))))
    return Multipart(fields=tuple(fields), files=tuple(files))


async def _to_web_response(web_request: web.Request, response: Response) -> web.StreamResponse:
    """Send our Response; a streamed body goes out chunk by chunk."""
    headers = {k: v for k, v in response.headers.items() if k not in _HOP_HEADERS}
    if not response.is_streamed:
        return web.Response(status=response.status, headers=headers, body=await response.read())
    out = web.StreamResponse(status=response.status, headers=headers)
    chunks = response.iter_chunks()
    try:
        await out.prepare(web_request)
        async for chunk in chunks:
            await out.write(chunk)
        await out.write_eof()
    except TransportError:
        # The service failed mid-stream: cut the connection so the client sees it.
        _drop(web_request)
    except ConnectionError:
        pass  # the client hung up part way; nobody is left to answer
    finally:
        close = getattr(chunks, "aclose", None)  # an async generator: end it now, not at GC
        if close is not None:
            await close()
        await response.aclose()
    return out


@contextlib.asynccontextmanager
async def run_fake_server(
    service: Handles,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    access_log: logging.Logger | None = None,
    shutdown_timeout: float = 1.0,
) -> AsyncIterator[str]:
    """Serve ``service`` over HTTP while the block runs.

    Args:
        service: the fake batch service.
        host: the address to listen on.
        port: the port; 0 picks a free one.
        access_log: a logger for one line per request (e.g. ``aiohttp.web.access_logger``);
            None logs nothing.
        shutdown_timeout: seconds that requests still in flight (a slow fault, say) get
            to finish when the block ends.

    Yields:
        The base URL to give a client, ending in ``/v1`` (``http://127.0.0.1:8000/v1``).

    Raises:
        OSError: the address cannot be listened on (the port is taken, say).
    """
    runner = web.AppRunner(
        make_app(service),
        access_log=access_log,
        handle_signals=False,
        handler_cancellation=False,
        shutdown_timeout=shutdown_timeout,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        yield f"{_base(runner, host, port)}/v1"
    finally:
        await runner.cleanup()


def _base(runner: web.AppRunner, host: str, port: int) -> str:
    """``http://host:port`` with the port actually bound."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            bound_host, bound_port = str(address[0]), int(address[1])
            shown = host or bound_host
            if ":" in shown:
                shown = f"[{shown}]"
            return f"http://{shown}:{bound_port}"
    return f"http://{host}:{port}"
