"""AiohttpTransport against real aiohttp servers on loopback (pytest-aiohttp fixtures)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import traceback
import tracemalloc
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpRawServer, AiohttpServer

from aiobatch.errors import (
    ClosedError,
    ConnectError,
    InputError,
    TransportError,
    TransportTimeoutError,
)
from aiobatch.transport import (
    AiohttpTransport,
    FilePart,
    Multipart,
    Request,
    Response,
    Transport,
)

SECRET = "sk-very-secret-key"
#: A read timeout that must not fire before the server's first bytes: it outlasts a loaded
#: machine's stall between the request and the answer (0.05 s did not: a process stopped
#: for 10-150 ms at random moments timed out before ``first`` arrived), and the test
#: then waits it out once.
STREAM_TIMEOUT = 1.0


def _app(*routes: web.RouteDef) -> web.Application:
    app = web.Application()
    app.add_routes(routes)
    return app


def _open_fds_for(path: Path) -> int | None:
    """How many of this process's file descriptors point at ``path`` (None: cannot tell)."""
    fd_dir = "/proc/self/fd"
    if not os.path.isdir(fd_dir):
        return None
    count = 0
    for fd in os.listdir(fd_dir):
        try:
            if os.readlink(os.path.join(fd_dir, fd)) == str(path):
                count += 1
        except OSError:
            continue
    return count


@pytest.fixture
async def transport() -> AsyncIterator[AiohttpTransport]:
    t = AiohttpTransport()
    yield t
    await t.aclose()


def test_is_a_transport() -> None:
    """AiohttpTransport satisfies the Transport protocol and needs no loop to construct."""
    t = AiohttpTransport()
    assert isinstance(t, Transport)
    assert "own session" in repr(t)


async def test_json_round_trip(aiohttp_server: AiohttpServer, transport: AiohttpTransport) -> None:
    """A JSON body, query parameters and headers arrive as sent; the JSON answer comes back."""
    seen: dict[str, Any] = {}

    async def echo(request: web.Request) -> web.Response:
        seen["method"] = request.method
        seen["path"] = request.path
        seen["query"] = dict(request.query)
        seen["auth"] = request.headers.get("Authorization")
        seen["body"] = await request.json()
        return web.json_response({"ok": True, "echo": seen["body"]}, status=201)

    server = await aiohttp_server(_app(web.post("/v1/batches", echo)))
    body = json.dumps({"input_file_id": "file-1", "n": [1, 2]}).encode()
    response = await transport.send(
        Request(
            "POST",
            str(server.make_url("/v1/batches")),
            params={"limit": "2", "after": "batch_x"},
            headers={"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"},
            body=body,
        )
    )
    assert response.status == 201
    assert not response.is_streamed
    assert json.loads(await response.read()) == {"ok": True, "echo": json.loads(body)}
    assert seen == {
        "method": "POST",
        "path": "/v1/batches",
        "query": {"limit": "2", "after": "batch_x"},
        "auth": f"Bearer {SECRET}",
        "body": {"input_file_id": "file-1", "n": [1, 2]},
    }


async def test_status_and_headers_pass_through(
    aiohttp_server: AiohttpServer, transport: AiohttpTransport
) -> None:
    """Error statuses are answers, not exceptions; header names come back lower-cased."""

    async def limited(request: web.Request) -> web.Response:
        return web.json_response(
            {"error": {"message": "slow down"}},
            status=429,
            headers={"Retry-After": "3", "X-Request-ID": "req_123"},
        )

    server = await aiohttp_server(_app(web.get("/v1/batches", limited)))
    response = await transport.send(Request("GET", str(server.make_url("/v1/batches"))))
    assert response.status == 429
    assert response.headers["retry-after"] == "3"
    assert response.headers["x-request-id"] == "req_123"
    assert response.headers["content-type"].startswith("application/json")
    assert json.loads(await response.read()) == {"error": {"message": "slow down"}}


async def test_redirects_are_not_followed(
    aiohttp_server: AiohttpServer, transport: AiohttpTransport
) -> None:
    """A 3xx comes back as it is, so credential headers never travel to another host."""

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://elsewhere.invalid/")

    server = await aiohttp_server(_app(web.get("/x", moved)))
    response = await transport.send(Request("GET", str(server.make_url("/x"))))
    assert response.status == 302
    assert response.headers["location"] == "http://elsewhere.invalid/"


async def test_multipart_upload_streamed_from_path(
    aiohttp_server: AiohttpServer, transport: AiohttpTransport, tmp_path: Path
) -> None:
    """A file part with a path arrives byte for byte with its filename and the plain fields."""
    received: dict[str, Any] = {}

    async def upload(request: web.Request) -> web.Response:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            assert isinstance(part, aiohttp.BodyPartReader)
            data = await part.read()
            content_type = part.headers.get("Content-Type") if part.filename else None
            received[part.name or ""] = (part.filename, content_type, bytes(data))
        return web.json_response({"id": "file-1"})

    payload = b"".join(b'{"custom_id": "r%06d"}\n' % i for i in range(20_000))  # ~440 KB
    path = tmp_path / "requests.jsonl"
    path.write_bytes(payload)
    server = await aiohttp_server(_app(web.post("/v1/files", upload)))
    body = Multipart(
        fields=(("purpose", "batch"),),
        files=(("file", FilePart("requests.jsonl", path=path, content_type="application/jsonl")),),
    )
    response = await transport.send(Request("POST", str(server.make_url("/v1/files")), body=body))
    assert response.status == 200
    assert received == {
        "purpose": (None, None, b"batch"),
        "file": ("requests.jsonl", "application/jsonl", payload),
    }
    assert _open_fds_for(path) in (0, None), "the uploaded file was left open"


async def test_multipart_upload_from_content(
    aiohttp_server: AiohttpServer, transport: AiohttpTransport
) -> None:
    """A file part given as bytes is sent as a file field too."""
    received: dict[str, Any] = {}

    async def upload(request: web.Request) -> web.Response:
        form = await request.post()
        file_field = form["file"]
        assert isinstance(file_field, web.FileField)
        received["name"] = file_field.filename
        received["data"] = file_field.file.read()
        received["purpose"] = form["purpose"]
        return web.json_response({})

    server = await aiohttp_server(_app(web.post("/v1/files", upload)))
    body = Multipart(
        fields=(("purpose", "batch"),), files=(("file", FilePart("a.jsonl", content=b"{}\n")),)
    )
    response = await transport.send(Request("POST", str(server.make_url("/v1/files")), body=body))
    assert response.status == 200
    assert received == {"name": "a.jsonl", "data": b"{}\n", "purpose": "batch"}


async def test_streamed_download_in_chunks(
    aiohttp_server: AiohttpServer, transport: AiohttpTransport
) -> None:
    """stream=True yields the body in chunks of at most 64 KiB, in order, then closes."""
    blob = bytes(range(256)) * 1024  # 256 KiB

    async def download(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await out.prepare(request)
        for i in range(0, len(blob), 10_000):
            await out.write(blob[i : i + 10_000])
        await out.write_eof()
        return out

    server = await aiohttp_server(_app(web.get("/v1/files/f/content", download)))
    response = await transport.send(
        Request("GET", str(server.make_url("/v1/files/f/content"))), stream=True
    )
    assert response.status == 200
    assert response.is_streamed
    chunks = [chunk async for chunk in response.iter_chunks()]
    assert b"".join(chunks) == blob
    assert all(0 < len(chunk) <= 64 * 1024 for chunk in chunks)
    await response.aclose()  # already closed by the iteration: a no-op


async def test_streamed_download_closed_early(
    aiohttp_server: AiohttpServer, transport: AiohttpTransport
) -> None:
    """Closing a stream after one chunk releases it; the transport keeps working."""
    big = b"x" * (4 * 1024 * 1024)

    async def download(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse()
        await out.prepare(request)
        with contextlib.suppress(ConnectionError):  # the client may hang up part way
            for i in range(0, len(big), 64 * 1024):
                await out.write(big[i : i + 64 * 1024])
        return out

    async def ping(request: web.Request) -> web.Response:
        return web.Response(text="pong")

    server = await aiohttp_server(_app(web.get("/big", download), web.get("/ping", ping)))
    response = await transport.send(Request("GET", str(server.make_url("/big"))), stream=True)
    chunks = cast(AsyncGenerator[bytes, None], response.iter_chunks())
    first = await chunks.__anext__()
    assert first
    await response.aclose()
    await response.aclose()
    await chunks.aclose()
    again = await transport.send(Request("GET", str(server.make_url("/ping"))))
    assert await again.read() == b"pong"


async def test_read_of_a_streamed_response(
    aiohttp_server: AiohttpServer, transport: AiohttpTransport
) -> None:
    """Response.read() on a streamed response gathers every chunk."""

    async def small(request: web.Request) -> web.Response:
        return web.Response(body=b"abc" * 100_000)

    server = await aiohttp_server(_app(web.get("/s", small)))
    response = await transport.send(Request("GET", str(server.make_url("/s"))), stream=True)
    assert await response.read() == b"abc" * 100_000


async def test_connect_refused_is_connect_error(
    unused_tcp_port: int, transport: AiohttpTransport
) -> None:
    """Nobody listening: ConnectError (never sent), chained to aiohttp's error, no secrets."""
    url = f"http://127.0.0.1:{unused_tcp_port}/v1/batches"
    with pytest.raises(ConnectError) as info:
        await transport.send(
            Request("POST", url, headers={"Authorization": f"Bearer {SECRET}"}, body=b"{}")
        )
    err = info.value
    assert isinstance(err.__cause__, aiohttp.ClientConnectorError)
    assert (err.method, err.url) == ("POST", url)
    assert SECRET not in str(err)
    assert SECRET not in repr(err)


@pytest.mark.parametrize(
    ("host", "reason"),
    [("127.0.0.1", "connection refused"), ("aiobatch-test.invalid", "name does not resolve")],
)
async def test_connect_error_says_plainly_why(
    unused_tcp_port: int, transport: AiohttpTransport, host: str, reason: str
) -> None:
    """A refused connection and a name that does not resolve (the reserved .invalid
    domain: no query leaves the machine) are told apart by ConnectError.reason."""
    url = f"http://{host}:{unused_tcp_port}/v1/files"
    with pytest.raises(ConnectError) as info:
        await transport.send(Request("GET", url))
    assert info.value.reason == reason


async def test_server_drop_is_transport_error_not_connect_error(
    aiohttp_raw_server: AiohttpRawServer, transport: AiohttpTransport
) -> None:
    """A server that hangs up without answering: TransportError, since it may have acted."""

    async def hang_up(request: web.BaseRequest) -> web.Response:
        await request.read()
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    server = await aiohttp_raw_server(hang_up)
    with pytest.raises(TransportError) as info:
        await transport.send(
            Request(
                "POST",
                str(server.make_url("/v1/batches")),
                headers={"Authorization": f"Bearer {SECRET}"},
                body=b"{}",
            )
        )
    assert not isinstance(info.value, ConnectError)
    assert not isinstance(info.value, TransportTimeoutError)
    assert isinstance(info.value.__cause__, aiohttp.ClientError)
    assert SECRET not in str(info.value)


async def test_drop_in_the_middle_of_a_stream(
    aiohttp_raw_server: AiohttpRawServer, transport: AiohttpTransport
) -> None:
    """A body cut short is mapped while iterating: TransportError from the chunk iterator."""

    async def truncated(request: web.BaseRequest) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Length": "100000"})
        await out.prepare(request)
        await out.write(b"y" * 1000)
        assert request.transport is not None
        request.transport.close()  # flushes what was written, then hangs up
        return out

    server = await aiohttp_raw_server(truncated)
    response = await transport.send(Request("GET", str(server.make_url("/f"))), stream=True)
    with pytest.raises(TransportError) as info:
        async for _ in response.iter_chunks():
            pass
    assert not isinstance(info.value, ConnectError)


async def test_timeout_is_transport_timeout_error(
    aiohttp_server: AiohttpServer, transport: AiohttpTransport
) -> None:
    """No answer within Request.timeout: TransportTimeoutError, also a builtin TimeoutError."""
    release = asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response()

    server = await aiohttp_server(_app(web.get("/slow", stall)))
    try:
        with pytest.raises(TransportTimeoutError) as info:
            await transport.send(Request("GET", str(server.make_url("/slow")), timeout=0.05))
    finally:
        release.set()
    assert isinstance(info.value, TimeoutError)


async def test_default_timeout_applies(aiohttp_server: AiohttpServer) -> None:
    """Without Request.timeout the transport's own timeout bounds the exchange."""
    release = asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response()

    server = await aiohttp_server(_app(web.get("/slow", stall)))
    async with AiohttpTransport(timeout=0.05) as t:
        try:
            with pytest.raises(TransportTimeoutError):
                await t.send(Request("GET", str(server.make_url("/slow"))))
        finally:
            release.set()


async def test_stalled_stream_times_out_while_iterating(
    aiohttp_server: AiohttpServer, transport: AiohttpTransport
) -> None:
    """A stream that stops sending raises TransportTimeoutError from the chunk iterator."""
    release = asyncio.Event()

    async def stall_midway(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse()
        await out.prepare(request)
        await out.write(b"first")
        await release.wait()
        return out

    server = await aiohttp_server(_app(web.get("/f", stall_midway)))
    response = await transport.send(
        Request("GET", str(server.make_url("/f")), timeout=STREAM_TIMEOUT), stream=True
    )
    chunks = cast(AsyncGenerator[bytes, None], response.iter_chunks())
    try:
        assert await chunks.__anext__() == b"first"
        with pytest.raises(TransportTimeoutError):
            await chunks.__anext__()
    finally:
        release.set()
        await chunks.aclose()


async def test_cancellation_passes_through(
    aiohttp_server: AiohttpServer, transport: AiohttpTransport
) -> None:
    """Cancelling a pending send raises CancelledError, not a transport error."""
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.Response()

    server = await aiohttp_server(_app(web.get("/slow", stall)))
    task = asyncio.ensure_future(transport.send(Request("GET", str(server.make_url("/slow")))))
    await arrived.wait()
    task.cancel()
    try:
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        release.set()


async def test_aclose_is_idempotent_and_final(aiohttp_server: AiohttpServer) -> None:
    """aclose twice is fine; a send after it raises ClosedError."""

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    server = await aiohttp_server(_app(web.get("/", ok)))
    t = AiohttpTransport()
    assert (await t.send(Request("GET", str(server.make_url("/"))))).status == 200
    await t.aclose()
    await t.aclose()
    assert "closed" in repr(t)
    with pytest.raises(ClosedError):
        await t.send(Request("GET", str(server.make_url("/"))))


async def test_aclose_without_any_request() -> None:
    """Closing a transport that never sent anything is fine."""
    t = AiohttpTransport()
    await t.aclose()
    await t.aclose()


async def test_borrowed_session_is_not_closed(aiohttp_server: AiohttpServer) -> None:
    """A borrowed session serves the requests and stays open after aclose."""

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    server = await aiohttp_server(_app(web.get("/", ok)))
    async with aiohttp.ClientSession() as session:
        t = AiohttpTransport(session=session)
        response = await t.send(Request("GET", str(server.make_url("/"))))
        assert await response.read() == b"ok"
        await t.aclose()
        assert not session.closed
        assert "borrowed" in repr(t)


async def test_many_concurrent_requests_share_the_pool(aiohttp_server: AiohttpServer) -> None:
    """More requests than connections all succeed (waiting for the pool is not a timeout)."""

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text=request.query["i"])

    server = await aiohttp_server(_app(web.get("/", ok)))
    async with AiohttpTransport(limit=4, connect_timeout=1.0) as t:
        url = str(server.make_url("/"))
        responses: list[Response] = await asyncio.gather(
            *(t.send(Request("GET", url, params={"i": str(i)})) for i in range(50))
        )
    assert [await r.read() for r in responses] == [str(i).encode() for i in range(50)]


async def test_closed_borrowed_session_is_a_closed_error() -> None:
    """A borrowed session closed by its owner: ClosedError (not retried), not a RuntimeError."""
    session = aiohttp.ClientSession()
    await session.close()
    t = AiohttpTransport(session=session)
    with pytest.raises(ClosedError, match="session is closed"):
        await t.send(Request("GET", "http://127.0.0.1:9/"))


async def test_secret_in_url_userinfo_is_not_shown(unused_tcp_port: int) -> None:
    """Credentials in a URL's user info never reach the error message."""
    url = f"http://user:{SECRET}@127.0.0.1:{unused_tcp_port}/v1/batches"
    async with AiohttpTransport() as t:
        with pytest.raises(ConnectError) as info:
            await t.send(Request("GET", url))
    assert SECRET not in str(info.value)
    assert SECRET not in info.value.url


def test_chunk_size_must_be_positive() -> None:
    """A zero chunk size is refused at construction."""
    with pytest.raises(ValueError, match="chunk_size"):
        AiohttpTransport(chunk_size=0)


# -- credentials never ride along in exception chains -------------------------------------


def _assert_no_secret(err: BaseException) -> None:
    """The secret is in no message, repr, chained exception or formatted traceback."""
    assert SECRET not in str(err)
    assert SECRET not in repr(err)
    assert SECRET not in repr(err.__cause__)
    assert SECRET not in repr(err.__context__)
    assert SECRET not in "".join(traceback.format_exception(err))


async def test_redirect_loop_error_does_not_chain_the_request_headers(
    aiohttp_server: AiohttpServer,
) -> None:
    """TooManyRedirects holds request_info (headers): not chained; status and hops in our text."""

    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound("/v1/batches/x")

    server = await aiohttp_server(_app(web.get("/v1/batches/x", loop)))
    async with AiohttpTransport(follow_redirects=True) as t:
        with pytest.raises(TransportError) as info:
            await t.send(
                Request(
                    "GET",
                    str(server.make_url("/v1/batches/x")),
                    headers={"Authorization": f"Bearer {SECRET}"},
                )
            )
    err = info.value
    assert not isinstance(err, ConnectError)
    assert err.__cause__ is None
    assert err.__context__ is None
    assert "TooManyRedirects" in str(err)
    assert "302" in str(err)
    _assert_no_secret(err)


async def test_garbled_answer_error_does_not_chain_the_request_headers(
    unused_tcp_port: int, transport: AiohttpTransport
) -> None:
    """An unparsable status line (aiohttp's ClientResponseError) is not chained either."""

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 twohundred OK\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(garbage, "127.0.0.1", unused_tcp_port)
    try:
        with pytest.raises(TransportError) as info:
            await transport.send(
                Request(
                    "GET",
                    f"http://127.0.0.1:{unused_tcp_port}/v1/batches",
                    headers={"Authorization": f"Bearer {SECRET}"},
                )
            )
    finally:
        server.close()
        await server.wait_closed()
    err = info.value
    assert err.__cause__ is None
    assert err.__context__ is None
    assert "ClientResponseError" in str(err)
    _assert_no_secret(err)


async def test_ordinary_errors_keep_their_cause(
    unused_tcp_port: int, transport: AiohttpTransport
) -> None:
    """Errors without request info stay chained (useful for debugging) and hold no secret."""
    with pytest.raises(ConnectError) as info:
        await transport.send(
            Request(
                "GET",
                f"http://127.0.0.1:{unused_tcp_port}/",
                headers={"Authorization": f"Bearer {SECRET}"},
            )
        )
    assert isinstance(info.value.__cause__, aiohttp.ClientConnectorError)
    _assert_no_secret(info.value)


# -- uploads from a path -------------------------------------------------------------------


async def test_missing_upload_file_fails_before_sending(
    aiohttp_server: AiohttpServer, transport: AiohttpTransport, tmp_path: Path
) -> None:
    """A file part whose path does not exist: FileNotFoundError, not a retryable network error."""
    hits: list[str] = []

    async def upload(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({})

    server = await aiohttp_server(_app(web.post("/v1/files", upload)))
    present = tmp_path / "present.jsonl"
    present.write_bytes(b"{}\n")
    missing = tmp_path / "missing.jsonl"
    body = Multipart(
        files=(
            ("file", FilePart("present.jsonl", path=present)),
            ("file", FilePart("missing.jsonl", path=missing)),
        )
    )
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        await transport.send(Request("POST", str(server.make_url("/v1/files")), body=body))
    assert not isinstance(info.value, TransportError)
    assert info.value.filename == str(missing)
    assert hits == []
    assert _open_fds_for(present) in (0, None)


# -- constant memory, measured -------------------------------------------------------------

BIG = 24 * 1024 * 1024  # bytes moved by the memory tests
BLOCK = 1024 * 1024


def _block(index: int) -> bytes:
    """A 1 MiB block that differs from every other one."""
    return hashlib.sha256(b"%d" % index).digest() * (BLOCK // 32)


@contextlib.contextmanager
def _traced() -> Iterator[list[int]]:
    """Trace Python allocations in the block; yields a list that receives the peak bytes."""
    peak: list[int] = []
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        yield peak
        peak.append(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()


async def _file_sha256(request: web.Request) -> tuple[str, int]:
    """The SHA-256 and size of the file part of an upload, read as it arrives."""
    received = hashlib.sha256()
    size = 0
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        assert isinstance(part, aiohttp.BodyPartReader)
        if part.filename is None:
            await part.release()
            continue
        while chunk := await part.read_chunk(64 * 1024):
            received.update(chunk)
            size += len(chunk)
    return received.hexdigest(), size


def _upload_body(path: Path) -> Multipart:
    return Multipart(
        fields=(("purpose", "batch"),), files=(("file", FilePart(path.name, path=path)),)
    )


async def test_upload_from_a_path_streams_in_constant_memory(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    """A 24 MiB upload from a path peaks far below its size in memory; the bytes arrive exact."""
    path = tmp_path / "big.jsonl"
    sent = hashlib.sha256()
    with path.open("wb") as fh:
        for index in range(BIG // BLOCK):
            block = _block(index)
            sent.update(block)
            fh.write(block)

    async def sink(request: web.Request) -> web.Response:
        digest, size = await _file_sha256(request)
        return web.json_response({"sha256": digest, "bytes": size})

    server = await aiohttp_server(_app(web.post("/v1/files", sink)))
    body = _upload_body(path)
    async with AiohttpTransport() as t:
        with _traced() as peak:
            response = await t.send(Request("POST", str(server.make_url("/v1/files")), body=body))
            answer = json.loads(await response.read())
    assert answer == {"sha256": sent.hexdigest(), "bytes": BIG}
    assert peak[0] < BIG / 5, f"peak {peak[0]:,} bytes for a {BIG:,}-byte upload"


async def test_an_upload_from_a_path_states_its_length(
    aiohttp_server: AiohttpServer, transport: AiohttpTransport, tmp_path: Path
) -> None:
    """An upload streamed from a path has a Content-Length (not chunked), the body's size."""
    path = tmp_path / "requests.jsonl"
    path.write_bytes(_block(0)[: 300 * 1024] + b"tail")  # under the server's 1 MiB limit
    seen: dict[str, Any] = {}

    async def upload(request: web.Request) -> web.Response:
        seen["length"] = request.content_length
        seen["encoding"] = request.headers.get("Transfer-Encoding")
        seen["body"] = len(await request.read())
        return web.json_response({"id": "file-1"})

    server = await aiohttp_server(_app(web.post("/v1/files", upload)))
    url = str(server.make_url("/v1/files"))
    response = await transport.send(Request("POST", url, body=_upload_body(path)))
    assert response.status == 200
    assert seen["encoding"] is None
    assert seen["length"] == seen["body"] > 300 * 1024


async def test_a_followed_redirect_sends_the_uploaded_file_again_whole(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    """Behind a 307 the file part is sent again from its first byte, exact."""
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"".join(_block(i) for i in range(3)))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()

    async def moved(request: web.Request) -> web.Response:
        await _file_sha256(request)
        raise web.HTTPTemporaryRedirect("/v1/files2")

    async def upload(request: web.Request) -> web.Response:
        digest, size = await _file_sha256(request)
        return web.json_response({"sha256": digest, "bytes": size})

    server = await aiohttp_server(
        _app(web.post("/v1/files", moved), web.post("/v1/files2", upload))
    )
    async with AiohttpTransport(follow_redirects=True) as t:
        url = str(server.make_url("/v1/files"))
        response = await t.send(Request("POST", url, body=_upload_body(path)))
        answer = json.loads(await response.read())
    assert answer == {"sha256": expected, "bytes": 3 * BLOCK}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
async def test_an_upload_from_a_named_pipe_is_streamed_to_its_end(
    aiohttp_server: AiohttpServer, transport: AiohttpTransport, tmp_path: Path
) -> None:
    """A path that is a pipe (no size known) is uploaded whole, byte for byte."""
    path = tmp_path / "requests.jsonl"
    os.mkfifo(path)
    content = b"".join(_block(i) for i in range(3))

    def feed() -> None:
        with path.open("wb") as fh:
            fh.write(content)

    received: list[bytes] = []

    async def upload(request: web.Request) -> web.Response:
        # The raw body (chunked: its size is not known): aiohttp's multipart reader
        # warns on chunked parts, which this suite turns into errors.
        async for data in request.content.iter_any():
            received.append(data)
        return web.json_response({"id": "file-1"})

    server = await aiohttp_server(_app(web.post("/v1/files", upload)))
    url = str(server.make_url("/v1/files"))
    feeding = asyncio.get_running_loop().run_in_executor(None, feed)
    response = await transport.send(Request("POST", url, body=_upload_body(path)))
    await feeding
    assert response.status == 200
    body = b"".join(received)
    assert content in body
    assert len(body) < len(content) + 1000  # the part's framing and the purpose field


async def test_a_file_cut_short_while_it_is_uploaded_fails_the_upload(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    """A file that gets shorter during its upload ends the request at once with an
    InputError naming the file (the caller's, never retried), rather than leaving the
    server waiting for the bytes promised."""
    path = tmp_path / "big.jsonl"
    with path.open("wb") as fh:
        for index in range(BIG // BLOCK):
            fh.write(_block(index))

    async def upload(request: web.Request) -> web.Response:
        os.truncate(path, BLOCK)  # the client has sent at most what the sockets hold
        with contextlib.suppress(Exception):
            await _file_sha256(request)
        return web.json_response({"id": "file-1"})

    server = await aiohttp_server(_app(web.post("/v1/files", upload)))
    async with AiohttpTransport(timeout=30) as t:
        url = str(server.make_url("/v1/files"))
        with pytest.raises(InputError, match=r"big\.jsonl: the file got shorter while it was"):
            await t.send(Request("POST", url, body=_upload_body(path)))
    assert _open_fds_for(path) in (0, None), "the uploaded file was left open"


async def test_streamed_download_in_constant_memory(aiohttp_server: AiohttpServer) -> None:
    """A 24 MiB download through iter_chunks peaks far below its size; the bytes arrive exact."""
    sent = hashlib.sha256()

    async def source(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Length": str(BIG)})
        await out.prepare(request)
        for index in range(BIG // BLOCK):
            block = _block(index)
            sent.update(block)
            for start in range(0, BLOCK, 64 * 1024):
                await out.write(block[start : start + 64 * 1024])
        await out.write_eof()
        return out

    server = await aiohttp_server(_app(web.get("/v1/files/f/content", source)))
    received = hashlib.sha256()
    size = 0
    async with AiohttpTransport() as t:
        with _traced() as peak:
            response = await t.send(
                Request("GET", str(server.make_url("/v1/files/f/content"))), stream=True
            )
            async for chunk in response.iter_chunks():
                received.update(chunk)
                size += len(chunk)
    assert size == BIG
    assert received.hexdigest() == sent.hexdigest()
    assert peak[0] < BIG / 5, f"peak {peak[0]:,} bytes for a {BIG:,}-byte download"
