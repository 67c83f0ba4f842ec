"""The fake batch service over real HTTP (make_app) driven through AiohttpTransport."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from email.utils import formatdate
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from pytest_aiohttp import AiohttpServer

from aiobatch.errors import ConnectError, TransportError, TransportTimeoutError
from aiobatch.testing import (
    FakeBatchService,
    FakeConfig,
    Fault,
    VirtualClock,
    chat_requests,
    make_app,
    run_fake_server,
)
from aiobatch.transport import AiohttpTransport, FilePart, Multipart, Request, Response

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


# -- the app's translation, with a recording stand-in for the service ------------------


class Recorder:
    """Answers every request with ``answer`` and keeps what it was given."""

    def __init__(self, answer: Response | Exception | None = None) -> None:
        self.requests: list[Request] = []
        self.answer = answer

    async def handle(self, request: Request) -> Response:
        self.requests.append(request)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer or Response(200, {"content-type": "application/json"}, b"{}")


@pytest.fixture
async def transport() -> AsyncIterator[AiohttpTransport]:
    t = AiohttpTransport(timeout=10.0)
    yield t
    await t.aclose()


async def test_app_translates_the_request(
    aiohttp_server: AiohttpServer, transport: AiohttpTransport
) -> None:
    """The service sees the full URL, query parameters, lower-cased headers and body bytes."""
    recorder = Recorder()
    server = await aiohttp_server(make_app(recorder))
    url = str(server.make_url("/v1/batches"))
    await transport.send(
        Request(
            "POST",
            url,
            params={"limit": "5"},
            headers={"Authorization": "Bearer k", "X-Custom": "Yes"},
            body=b'{"a": 1}',
        )
    )
    (seen,) = recorder.requests
    assert (seen.method, seen.url, dict(seen.params)) == ("POST", url, {"limit": "5"})
    assert seen.headers["authorization"] == "Bearer k"
    assert seen.headers["x-custom"] == "Yes"
    assert seen.body == b'{"a": 1}'


async def test_app_without_body_gives_none(
    aiohttp_server: AiohttpServer, transport: AiohttpTransport
) -> None:
    """A GET without a body reaches the service with body None."""
    recorder = Recorder()
    server = await aiohttp_server(make_app(recorder))
    await transport.send(Request("GET", str(server.make_url("/v1/batches/b1"))))
    assert recorder.requests[0].body is None


async def test_app_parses_multipart(
    aiohttp_server: AiohttpServer, transport: AiohttpTransport, tmp_path: Path
) -> None:
    """An upload reaches the service as Multipart with in-memory file parts."""
    recorder = Recorder()
    server = await aiohttp_server(make_app(recorder))
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"x": 1}\n' * 1000)
    body = Multipart(
        fields=(("purpose", "batch"),),
        files=(("file", FilePart("in.jsonl", path=path, content_type="application/jsonl")),),
    )
    await transport.send(Request("POST", str(server.make_url("/v1/files")), body=body))
    seen = recorder.requests[0].body
    assert isinstance(seen, Multipart)
    assert seen.fields == (("purpose", "batch"),)
    ((name, part),) = seen.files
    assert (name, part.filename, part.content_type) == ("file", "in.jsonl", "application/jsonl")
    assert part.content == path.read_bytes()


async def test_app_passes_status_and_headers(
    aiohttp_server: AiohttpServer, transport: AiohttpTransport
) -> None:
    """The service's status and headers go out as they are."""
    answer = Response(429, {"retry-after": "2", "x-request-id": "req_1"}, b'{"error": {}}')
    server = await aiohttp_server(make_app(Recorder(answer)))
    response = await transport.send(Request("GET", str(server.make_url("/v1/batches"))))
    assert response.status == 429
    assert response.headers["retry-after"] == "2"
    assert response.headers["x-request-id"] == "req_1"
    assert await response.read() == b'{"error": {}}'


async def test_app_streams_a_streamed_body(
    aiohttp_server: AiohttpServer, transport: AiohttpTransport
) -> None:
    """A streamed service answer is written out chunk by chunk and arrives whole."""

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(100):
            yield b"%05d\n" % i

    answer = Response(200, {"content-type": "application/octet-stream"}, chunks=chunks())
    server = await aiohttp_server(make_app(Recorder(answer)))
    response = await transport.send(
        Request("GET", str(server.make_url("/v1/files/f/content"))), stream=True
    )
    assert await response.read() == b"".join(b"%05d\n" % i for i in range(100))


async def test_app_drops_the_connection_on_transport_error(
    aiohttp_server: AiohttpServer, transport: AiohttpTransport
) -> None:
    """A TransportError from the service reaches the client as a disconnect, not an answer."""
    server = await aiohttp_server(make_app(Recorder(TransportError("dropped"))))
    with pytest.raises(TransportError) as info:
        await transport.send(Request("POST", str(server.make_url("/v1/batches")), body=b"{}"))
    assert not isinstance(info.value, ConnectError)


async def test_run_fake_server_serves_and_stops() -> None:
    """run_fake_server listens on a free port, yields a /v1 base URL, and stops after."""
    recorder = Recorder()
    async with run_fake_server(recorder, port=0) as base_url, AiohttpTransport() as t:
        assert base_url.startswith("http://127.0.0.1:")
        assert base_url.endswith("/v1")
        response = await t.send(Request("GET", f"{base_url}/batches"))
        assert response.status == 200
    assert recorder.requests[0].url == f"{base_url}/batches"
    async with AiohttpTransport(connect_timeout=1.0) as t:
        with pytest.raises(ConnectError):
            await t.send(Request("GET", f"{base_url}/batches"))


# -- the real fake service over HTTP ---------------------------------------------------

CONFIG = FakeConfig(
    validation_seconds=10,
    lines_per_second=1,
    finalizing_seconds=5,
    cancel_seconds=30,
    chunk_size=1024,
)


class Api:
    """A few lines of plumbing: JSON calls against the served fake through the transport."""

    def __init__(self, transport: AiohttpTransport, base_url: str) -> None:
        self.transport = transport
        self.base_url = base_url

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        body = json.dumps(json_body).encode() if json_body is not None else None
        response = await self.transport.send(
            Request(
                method,
                self.base_url + path,
                params=params or {},
                headers=AUTH if headers is None else headers,
                body=body,
            )
        )
        return response.status, json.loads(await response.read())

    async def upload(self, content: bytes, tmp_path: Path) -> dict[str, Any]:
        path = tmp_path / "input.jsonl"
        path.write_bytes(content)
        body = Multipart(
            fields=(("purpose", "batch"),), files=(("file", FilePart("input.jsonl", path=path)),)
        )
        response = await self.transport.send(
            Request("POST", f"{self.base_url}/files", headers=AUTH, body=body)
        )
        assert response.status == 200
        return dict(json.loads(await response.read()))

    async def create(self, file_id: str) -> dict[str, Any]:
        status, batch = await self.call(
            "POST",
            "/batches",
            json_body={
                "input_file_id": file_id,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        )
        assert status == 200, batch
        return dict(batch)

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        status, batch = await self.call("GET", f"/batches/{batch_id}")
        assert status == 200, batch
        return dict(batch)


@pytest.fixture
def service(clock: VirtualClock) -> FakeBatchService:
    return FakeBatchService(clock=clock, config=CONFIG, api_key=KEY)


@pytest.fixture
async def api(
    aiohttp_server: AiohttpServer, service: FakeBatchService, transport: AiohttpTransport
) -> Api:
    server = await aiohttp_server(make_app(service))
    return Api(transport, str(server.make_url("/v1")))


async def test_upload_retrieve_and_download_a_file(api: Api, tmp_path: Path) -> None:
    """An upload streamed from disk is stored exactly and downloads back in several chunks."""
    content = chat_requests(1000)  # > 64 KiB: more than one client chunk
    uploaded = await api.upload(content, tmp_path)
    assert uploaded["object"] == "file"
    assert (uploaded["purpose"], uploaded["bytes"], uploaded["filename"]) == (
        "batch",
        len(content),
        "input.jsonl",
    )
    status, again = await api.call("GET", f"/files/{uploaded['id']}")
    assert (status, again) == (200, uploaded)
    response = await api.transport.send(
        Request("GET", f"{api.base_url}/files/{uploaded['id']}/content", headers=AUTH), stream=True
    )
    chunks = [chunk async for chunk in response.iter_chunks()]
    assert b"".join(chunks) == content
    assert len(chunks) > 1


async def test_batch_lifecycle_over_http(api: Api, clock: VirtualClock, tmp_path: Path) -> None:
    """validating -> in_progress -> finalizing -> completed as the clock moves; output downloads."""
    uploaded = await api.upload(chat_requests(4), tmp_path)
    batch = await api.create(uploaded["id"])
    assert batch["status"] == "validating"
    assert batch["expires_at"] == batch["created_at"] + 86_400
    clock.advance(10)
    batch = await api.retrieve(batch["id"])
    assert batch["status"] == "in_progress"
    assert batch["request_counts"]["total"] == 4
    clock.advance(4)
    assert (await api.retrieve(batch["id"]))["status"] == "finalizing"
    clock.advance(5)
    batch = await api.retrieve(batch["id"])
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
    response = await api.transport.send(
        Request("GET", f"{api.base_url}/files/{batch['output_file_id']}/content", headers=AUTH)
    )
    lines = [json.loads(line) for line in (await response.read()).splitlines()]
    assert sorted(line["custom_id"] for line in lines) == [f"req-{i}" for i in range(4)]
    assert all(line["response"]["status_code"] == 200 for line in lines)


async def test_list_batches_pages_newest_first(api: Api, tmp_path: Path) -> None:
    """GET /batches pages with limit and after, newest first, until has_more is false."""
    uploaded = await api.upload(chat_requests(1), tmp_path)
    created = [(await api.create(uploaded["id"]))["id"] for _ in range(5)]
    seen: list[str] = []
    params = {"limit": "2"}
    for _ in range(5):
        status, page = await api.call("GET", "/batches", params=params)
        assert status == 200
        assert page["object"] == "list"
        seen += [b["id"] for b in page["data"]]
        if not page["has_more"]:
            break
        params = {"limit": "2", "after": page["data"][-1]["id"]}
    assert seen == created[::-1]


async def test_cancel_over_http(api: Api, clock: VirtualClock, tmp_path: Path) -> None:
    """POST /batches/{id}/cancel answers cancelling; the batch is cancelled after cancel_seconds."""
    uploaded = await api.upload(chat_requests(100), tmp_path)
    batch = await api.create(uploaded["id"])
    clock.advance(12)
    status, cancelling = await api.call("POST", f"/batches/{batch['id']}/cancel")
    assert (status, cancelling["status"]) == (200, "cancelling")
    clock.advance(30)
    cancelled = await api.retrieve(batch["id"])
    assert cancelled["status"] == "cancelled"
    assert cancelled["cancelled_at"] is not None


async def test_missing_credentials_get_401(api: Api) -> None:
    """No Authorization header: 401 with OpenAI's error envelope."""
    status, body = await api.call("GET", "/batches", headers={})
    assert status == 401
    assert set(body["error"]) == {"message", "type", "param", "code"}


async def test_wrong_key_gets_401(api: Api) -> None:
    """A key other than the configured one: 401 invalid_api_key, and the key is masked."""
    status, body = await api.call(
        "GET", "/batches", headers={"Authorization": "Bearer sk-wrong-key-123456"}
    )
    assert status == 401
    assert body["error"]["code"] == "invalid_api_key"
    assert "sk-wrong-key-123456" not in body["error"]["message"]


async def test_unknown_batch_is_404(api: Api) -> None:
    """Retrieving an unknown batch id answers 404 batch_not_found."""
    status, body = await api.call("GET", "/batches/batch_nope")
    assert status == 404
    assert body["error"]["code"] == "batch_not_found"


async def test_dropped_connection_fault_is_a_disconnect(
    api: Api, service: FakeBatchService, tmp_path: Path
) -> None:
    """A drop fault reaches the client as TransportError (not ConnectError) and has no effect."""
    uploaded = await api.upload(chat_requests(1), tmp_path)
    service.faults.add(Fault.drop(method="POST", path="/batches"))
    with pytest.raises(TransportError) as info:
        await api.create(uploaded["id"])
    assert not isinstance(info.value, ConnectError)
    assert service.batch_ids == []
    assert (await api.create(uploaded["id"]))["status"] == "validating"


async def test_drop_after_fault_took_effect(
    api: Api, service: FakeBatchService, tmp_path: Path
) -> None:
    """A drop-after fault loses the answer, but the batch was created: the double-pay hazard."""
    uploaded = await api.upload(chat_requests(1), tmp_path)
    service.faults.add(Fault.drop(after=True, method="POST", path="/batches"))
    with pytest.raises(TransportError):
        await api.create(uploaded["id"])
    assert len(service.batch_ids) == 1


async def test_http_fault_headers_reach_the_client(api: Api, service: FakeBatchService) -> None:
    """An injected 429 arrives with its retry-after and x-request-id headers."""
    service.faults.add(Fault.http(429, retry_after=7, path="/batches"))
    response = await api.transport.send(Request("GET", f"{api.base_url}/batches", headers=AUTH))
    assert response.status == 429
    assert response.headers["retry-after"] == "7"
    assert response.headers["x-request-id"].startswith("req_")


async def test_slow_fault_times_the_client_out(api: Api, service: FakeBatchService) -> None:
    """A slow fault on the virtual clock holds the answer; the client's timeout fires."""
    service.faults.add(Fault.slow(60, path="/batches"))
    with pytest.raises(TimeoutError):
        await api.transport.send(
            Request("GET", f"{api.base_url}/batches", headers=AUTH, timeout=0.05)
        )


async def test_app_survives_a_client_hanging_up_mid_download(
    aiohttp_server: AiohttpServer, transport: AiohttpTransport
) -> None:
    """A client closing a streamed download early leaves the app serving the next request."""

    class Endless:
        async def handle(self, request: Request) -> Response:
            if request.url.endswith("/ping"):
                return Response(200, {}, b"pong")

            async def forever() -> AsyncIterator[bytes]:
                while True:
                    yield b"z" * 65536

            return Response(200, {}, chunks=forever())

    server = await aiohttp_server(make_app(Endless()))
    response = await transport.send(
        Request("GET", str(server.make_url("/v1/files/f/content"))), stream=True
    )
    chunks = cast(AsyncGenerator[bytes, None], response.iter_chunks())
    assert await chunks.__anext__()
    await chunks.aclose()
    again = await transport.send(Request("GET", str(server.make_url("/v1/ping"))))
    assert await again.read() == b"pong"


async def test_date_header_comes_from_the_service_clock(
    api: Api, clock: VirtualClock, tmp_path: Path
) -> None:
    """Over HTTP the date header is the service clock's, not aiohttp's wall-clock one."""
    clock.advance(12.5)
    expected = formatdate(clock.now(), usegmt=True)
    uploaded = await api.upload(chat_requests(1), tmp_path)
    for path, stream in (("/batches", False), (f"/files/{uploaded['id']}/content", True)):
        response = await api.transport.send(
            Request("GET", api.base_url + path, headers=AUTH), stream=stream
        )
        await response.read()
        assert response.headers["date"] == expected
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{api.base_url}/batches", headers=AUTH) as raw,
    ):
        assert raw.headers.getall("Date") == [expected]  # exactly one, ours


class Watched:
    """Wraps a service: events for a request reaching it and for its handler ending."""

    def __init__(self, service: FakeBatchService) -> None:
        self.service = service
        self.arrived = asyncio.Event()
        self.finished = asyncio.Event()

    async def handle(self, request: Request) -> Response:
        self.arrived.set()
        try:
            return await self.service.handle(request)
        finally:
            self.finished.set()


@pytest.mark.parametrize("act_after_delay", [False, True])
async def test_create_that_times_out_takes_effect_on_the_server(
    service: FakeBatchService,
    clock: VirtualClock,
    transport: AiohttpTransport,
    tmp_path: Path,
    act_after_delay: bool,
) -> None:
    """A slow create the client gave up on still makes its batch: on arrival, or after the delay."""
    watched = Watched(service)
    # Served as run_fake_server serves (a handler outlives its client), not by
    # aiohttp_server, whose handler a hang-up cancels when the loop sees it first.
    async with run_fake_server(watched) as base_url:
        api = Api(transport, base_url)
        uploaded = await api.upload(chat_requests(1), tmp_path)
        watched.arrived.clear()
        watched.finished.clear()
        service.faults.add(
            Fault.slow(60, act_after_delay=act_after_delay, method="POST", path="/batches")
        )
        body = json.dumps(
            {
                "input_file_id": uploaded["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            }
        ).encode()
        start = clock.now()
        send = asyncio.ensure_future(
            transport.send(
                Request("POST", f"{base_url}/batches", headers=AUTH, body=body, timeout=1.0)
            )
        )
        # The service now sleeps on the virtual clock. (The timeout is a second, not less:
        # a stalled machine must not see it fire before the request is even written.)
        arrival = asyncio.ensure_future(watched.arrived.wait())
        await asyncio.wait([arrival, send], return_when=asyncio.FIRST_COMPLETED)
        if not arrival.done():
            arrival.cancel()
            pytest.fail("the client timed out before its request reached the server")
        with pytest.raises(TransportTimeoutError):
            await send
        assert len(service.batch_ids) == (0 if act_after_delay else 1)
        clock.advance(60)
        await watched.finished.wait()
    (batch_id,) = service.batch_ids
    batch = await service.get_batch(batch_id)
    assert batch.created_at == int(start + 60 if act_after_delay else start)
