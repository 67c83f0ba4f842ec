"""The in-memory transport: requests go to a handler, failures become our own errors."""

from __future__ import annotations

import asyncio

import pytest

from aiobatch.errors import TransportError, TransportTimeoutError
from aiobatch.testing import VirtualClock
from aiobatch.transport import InMemoryTransport, Request, Response, Transport


async def echo(request: Request) -> Response:
    return Response(
        200, {"X-Method": request.method}, request.body if isinstance(request.body, bytes) else b""
    )


async def test_request_reaches_the_handler_and_back() -> None:
    """The handler sees the request and its response comes back unchanged."""
    transport = InMemoryTransport(echo)
    assert isinstance(transport, Transport)
    response = await transport.send(Request("POST", "http://fake/v1/x", body=b"hello"))
    assert response.status == 200
    assert response.headers["x-method"] == "POST"
    assert await response.read() == b"hello"


async def test_streamed_response_is_read_in_chunks_and_released() -> None:
    """A chunked response yields its chunks and calls its release hook once."""
    released: list[bool] = []

    async def chunks():  # type: ignore[no-untyped-def]
        for part in (b"ab", b"", b"cd"):
            yield part

    async def release() -> None:
        released.append(True)

    async def handler(request: Request) -> Response:
        return Response(200, {}, chunks=chunks(), release=release)

    response = await InMemoryTransport(handler).send(
        Request("GET", "http://fake/v1/f"), stream=True
    )
    assert response.is_streamed
    assert [c async for c in response.iter_chunks()] == [b"ab", b"cd"]
    await response.aclose()
    assert released == [True]


async def test_handler_exceptions_become_transport_errors() -> None:
    """An unexpected exception in the handler surfaces as TransportError, chained."""

    async def broken(request: Request) -> Response:
        raise RuntimeError("boom")

    with pytest.raises(TransportError, match="boom") as info:
        await InMemoryTransport(broken).send(Request("GET", "http://fake/v1/x"))
    assert isinstance(info.value.__cause__, RuntimeError)


async def test_timeout_is_measured_on_the_injected_clock() -> None:
    """A handler slower than the timeout raises TransportTimeoutError in virtual time."""
    clock = VirtualClock(start=0.0)

    async def slow(request: Request) -> Response:
        await clock.sleep(30)
        return Response(200, {})

    transport = InMemoryTransport(slow, clock=clock, timeout=10)
    async with clock.auto_advance():
        with pytest.raises(TransportTimeoutError):
            await transport.send(Request("GET", "http://fake/v1/x"))
        assert clock.now() == 10
        ok = await transport.send(Request("GET", "http://fake/v1/x", timeout=60))
    assert ok.status == 200


async def test_closed_transport_refuses_requests() -> None:
    """After aclose() the transport raises instead of calling the handler."""
    transport = InMemoryTransport(echo)
    await transport.aclose()
    await transport.aclose()
    with pytest.raises(TransportError, match="closed"):
        await transport.send(Request("GET", "http://fake/v1/x"))


def test_request_repr_hides_headers_and_body() -> None:
    """A Request's repr shows method and URL but never headers (credentials) or body."""
    request = Request(
        "POST", "http://fake/v1/x", headers={"Authorization": "Bearer sk-secret"}, body=b"{}"
    )
    assert "sk-secret" not in repr(request)
    assert request.headers["authorization"] == "Bearer sk-secret"
    _ = asyncio
