"""The in-memory transport: requests go to a handler; timeouts leave it running."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aiobatch.errors import ClosedError, TransportError, TransportTimeoutError
from aiobatch.testing import VirtualClock
from aiobatch.transport import (
    FilePart,
    InMemoryTransport,
    Multipart,
    Request,
    Response,
    Transport,
)


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


async def test_handler_bugs_propagate_unchanged() -> None:
    """A bug in the handler (not a TransportError) is raised as it is, never as a network error."""

    async def broken(request: Request) -> Response:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom") as info:
        await InMemoryTransport(broken).send(Request("GET", "http://fake/v1/x"))
    assert not isinstance(info.value, TransportError)


async def test_handler_transport_errors_pass_through() -> None:
    """A TransportError from the handler (a simulated network failure) reaches the caller."""
    dropped = TransportError("dropped")

    async def drop(request: Request) -> Response:
        raise dropped

    clock = VirtualClock(start=0.0)
    for transport in (InMemoryTransport(drop), InMemoryTransport(drop, clock=clock, timeout=5)):
        with pytest.raises(TransportError) as info:
            await transport.send(Request("GET", "http://fake/v1/x"))
        assert info.value is dropped


async def test_missing_upload_file_fails_before_the_handler(tmp_path: Path) -> None:
    """A file part whose path does not exist raises FileNotFoundError; nothing is sent."""
    calls: list[Request] = []

    async def handler(request: Request) -> Response:
        calls.append(request)
        return Response(200, {})

    missing = tmp_path / "nope.jsonl"
    body = Multipart(files=(("file", FilePart("nope.jsonl", path=missing)),))
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        await InMemoryTransport(handler).send(Request("POST", "http://fake/v1/files", body=body))
    assert info.value.filename == str(missing)
    assert not isinstance(info.value, TransportError)
    assert calls == []


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


async def test_timed_out_handler_runs_to_completion() -> None:
    """After a timeout the handler is not cancelled: it finishes later, like a real server."""
    clock = VirtualClock(start=0.0)
    finished: list[float] = []

    async def slow(request: Request) -> Response:
        await clock.sleep(30)
        finished.append(clock.now())
        return Response(200, {})

    transport = InMemoryTransport(slow, clock=clock, timeout=10)
    task = asyncio.ensure_future(transport.send(Request("POST", "http://fake/v1/batches")))
    await clock.run_for(10)
    with pytest.raises(TransportTimeoutError):
        await task
    assert transport.abandoned == 1
    assert finished == []
    await clock.run_for(20)
    assert finished == [30.0]
    assert transport.abandoned == 0
    await transport.aclose()


async def test_late_streamed_response_is_released() -> None:
    """A streamed response that arrives after its caller timed out is closed unread."""
    clock = VirtualClock(start=0.0)
    released: list[bool] = []

    async def chunks() -> AsyncIterator[bytes]:
        yield b"data"

    async def release() -> None:
        released.append(True)

    async def slow(request: Request) -> Response:
        await clock.sleep(30)
        return Response(200, {}, chunks=chunks(), release=release)

    transport = InMemoryTransport(slow, clock=clock, timeout=10)
    async with clock.auto_advance():
        with pytest.raises(TransportTimeoutError):
            await transport.send(Request("GET", "http://fake/v1/files/f/content"), stream=True)
        await clock.sleep(30)
    await clock.run_for(0)
    assert released == [True]
    assert transport.abandoned == 0
    await transport.aclose()


async def test_aclose_cancels_abandoned_handlers() -> None:
    """aclose() cancels handlers still running after a timeout and waits for them to end."""
    clock = VirtualClock(start=0.0)
    ended: list[str] = []

    async def forever(request: Request) -> Response:
        try:
            await clock.sleep(1e9)
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise
        return Response(200, {})

    transport = InMemoryTransport(forever, clock=clock, timeout=1)
    async with clock.auto_advance():
        with pytest.raises(TransportTimeoutError):
            await transport.send(Request("GET", "http://fake/v1/x"))
    assert transport.abandoned == 1
    await transport.aclose()
    assert ended == ["cancelled"]
    assert transport.abandoned == 0


async def test_bug_in_an_abandoned_handler_is_raised_by_aclose() -> None:
    """A handler that crashes after its caller timed out makes aclose() raise that crash."""
    clock = VirtualClock(start=0.0)

    async def late_bug(request: Request) -> Response:
        await clock.sleep(30)
        raise KeyError("missing")

    transport = InMemoryTransport(late_bug, clock=clock, timeout=10)
    async with clock.auto_advance():
        with pytest.raises(TransportTimeoutError):
            await transport.send(Request("GET", "http://fake/v1/x"))
        await clock.sleep(30)
    await clock.run_for(0)
    with pytest.raises(KeyError, match="missing"):
        await transport.aclose()
    await transport.aclose()  # reported once


async def test_cancelled_caller_cancels_its_handler() -> None:
    """Cancelling the caller of send() cancels the handler (nothing is left running)."""
    clock = VirtualClock(start=0.0)
    entered = asyncio.Event()
    ended: list[str] = []

    async def slow(request: Request) -> Response:
        entered.set()
        try:
            await clock.sleep(30)
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise
        return Response(200, {})

    transport = InMemoryTransport(slow, clock=clock, timeout=10)
    task = asyncio.ensure_future(transport.send(Request("GET", "http://fake/v1/x")))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await clock.run_for(0)
    assert ended == ["cancelled"]
    assert transport.abandoned == 0


async def test_closed_transport_refuses_requests() -> None:
    """After aclose() the transport raises instead of calling the handler."""
    transport = InMemoryTransport(echo)
    await transport.aclose()
    await transport.aclose()
    with pytest.raises(ClosedError, match="closed"):
        await transport.send(Request("GET", "http://fake/v1/x"))


def test_request_repr_hides_headers_and_body() -> None:
    """A Request's repr shows method and URL but never headers (credentials) or body."""
    request = Request(
        "POST", "http://fake/v1/x", headers={"Authorization": "Bearer sk-secret"}, body=b"{}"
    )
    assert "sk-secret" not in repr(request)
    assert request.headers["authorization"] == "Bearer sk-secret"
