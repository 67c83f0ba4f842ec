"""Every provider end to end over real HTTP: BatchClient + AiohttpTransport against the
fake service in the matching dialect (OpenAI-compatible, Portkey, Azure OpenAI).

The service runs on a :class:`VirtualClock` shared with the client; ``auto_advance``
moves it whenever only the clock is waited on (see test_client_over_http.py).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import pytest
from pytest_aiohttp import AiohttpServer

from aiobatch import (
    AzureOpenAIProvider,
    BatchClient,
    BatchStatus,
    CompatibleProvider,
    OpenAIProvider,
    PortkeyProvider,
    Provider,
    ResultHTTPError,
    ResultSuccess,
    RetryPolicy,
)
from aiobatch.cli import build_parser
from aiobatch.cli._fake import build_fake_service
from aiobatch.errors import (
    AuthenticationError,
    BadRequestError,
    FileProcessingError,
    FileWaitTimeoutError,
    NoOutputError,
    NotFoundError,
    ServerError,
    UnsupportedError,
)
from aiobatch.testing import (
    FakeBatchService,
    FakeConfig,
    FakeDialect,
    LineErrorRule,
    VirtualClock,
    chat_requests,
    make_app,
)
from aiobatch.transport import AiohttpTransport, InMemoryTransport, Request, Response

KEY = "key-providers-0123456789abcdef"
ENDPOINT = "/v1/chat/completions"
CONFIG = FakeConfig(
    validation_seconds=10,
    lines_per_second=2,
    finalizing_seconds=5,
    cancel_seconds=30,
    line_errors=(LineErrorRule(status=400, custom_ids=frozenset({"req-3"})),),
)
CONTENT = chat_requests(6)

Serve = Callable[..., Awaitable[tuple[FakeBatchService, str]]]


@pytest.fixture
async def transport() -> AsyncIterator[AiohttpTransport]:
    """One real HTTP transport, closed after the test."""
    t = AiohttpTransport(timeout=10.0)
    yield t
    await t.aclose()


@pytest.fixture
def serve(aiohttp_server: AiohttpServer, clock: VirtualClock) -> Serve:
    """Start a fake service in a dialect on loopback; returns it and its root URL."""

    async def start(
        dialect: str | FakeDialect, *, api_key: str | None = KEY, config: FakeConfig = CONFIG
    ) -> tuple[FakeBatchService, str]:
        service = FakeBatchService(clock=clock, config=config, api_key=api_key, dialect=dialect)
        server = await aiohttp_server(make_app(service))
        return service, str(server.make_url("")).rstrip("/")

    return start


def client_for(
    provider: Provider, transport: AiohttpTransport | InMemoryTransport, clock: VirtualClock
) -> BatchClient:
    """A client with zero-wait retries on the shared clock."""
    return BatchClient(
        provider=provider,
        transport=transport,
        retry=RetryPolicy.for_testing(max_attempts=2),
        clock=clock,
    )


async def run_lifecycle(client: BatchClient, clock: VirtualClock) -> Any:
    """Upload, create and wait; returns the finished batch."""
    uploaded = await client.upload_file(CONTENT, filename="requests.jsonl")
    batch = await client.create_batch(uploaded.id, ENDPOINT, metadata={"job": "providers"})
    assert batch.status is BatchStatus.VALIDATING
    async with clock.auto_advance():
        return await client.wait(batch, poll_interval=5, max_interval=5, jitter=0)


# --- any OpenAI-compatible server ---------------------------------------------------------


async def test_compatible_server_without_a_key_with_ms_timestamps(
    serve: Serve, transport: AiohttpTransport, clock: VirtualClock
) -> None:
    """A keyless compatible server sending ms timestamps runs the whole lifecycle."""
    dialect = FakeDialect.openai(ms_timestamps=True, key_required=False)
    service, root = await serve(dialect, api_key=None)
    client = client_for(CompatibleProvider(base_url=f"{root}/v1"), transport, clock)
    done = await run_lifecycle(client, clock)
    assert done.status is BatchStatus.COMPLETED
    stored = await service.get_batch(done.id)
    assert done.created_at == stored.created_at < 10**11
    assert done.completed_at == stored.completed_at
    assert done.output_file_id is not None
    results = [line async for line in client.iter_results(done.output_file_id)]
    assert len(results) == 5
    assert (await client.retrieve_file(done.output_file_id)).created_at < 10**11


# --- Portkey ---------------------------------------------------------------------------------


def portkey(root: str, **kwargs: Any) -> PortkeyProvider:
    """A Portkey provider for the fake gateway at ``root``."""
    settings: dict[str, Any] = {"api_key": KEY, "provider": "@openai-test", **kwargs}
    return PortkeyProvider(base_url=f"{root}/v1", **settings)


async def test_portkey_full_lifecycle_and_the_output_endpoint(
    serve: Serve, transport: AiohttpTransport, clock: VirtualClock
) -> None:
    """Through Portkey: create, wait, then /batches/{id}/output streams the output file."""
    service, root = await serve("portkey")
    client = client_for(portkey(root), transport, clock)
    done = await run_lifecycle(client, clock)
    assert done.status is BatchStatus.COMPLETED
    assert done.output_file_id is not None and done.error_file_id is not None
    via_output = [line async for line in client.iter_batch_output(done.id)]
    via_file = [line async for line in client.iter_results(done.output_file_id)]
    assert via_output == via_file
    assert all(isinstance(line, ResultSuccess) for line in via_output)
    assert len(via_output) == 5
    assert service.request_count("GET", "/batches/*/output") == 1
    (failed,) = [line async for line in client.iter_results(done.error_file_id)]
    assert isinstance(failed, ResultHTTPError) and failed.custom_id == "req-3"


async def test_portkey_with_a_plain_provider_name_and_its_key(
    serve: Serve, transport: AiohttpTransport, clock: VirtualClock
) -> None:
    """provider="openai" with the provider's key as a bearer is accepted by the gateway."""
    _, root = await serve("portkey")
    provider = portkey(root, provider="openai", provider_api_key="sk-upstream")
    page = await client_for(provider, transport, clock).list_batches_page()
    assert page.data == ()


@pytest.mark.parametrize(
    ("settings", "error", "status", "message"),
    [
        ({"api_key": "pk-wrong-0123456789"}, AuthenticationError, 401, "Invalid API Key"),
        ({"provider": "openai"}, AuthenticationError, 401, "openai error: You didn't provide"),
    ],
)
async def test_portkey_auth_failures_have_the_gateway_shapes(
    serve: Serve,
    transport: AiohttpTransport,
    clock: VirtualClock,
    settings: dict[str, Any],
    error: type[Exception],
    status: int,
    message: str,
) -> None:
    """A wrong Portkey key is the gateway's failure envelope; no provider key, the wrapped 401."""
    _, root = await serve("portkey")
    client = client_for(portkey(root, **settings), transport, clock)
    with pytest.raises(AuthenticationError) as info:
        await client.list_batches_page()
    err = info.value
    assert err.status_code == status
    assert err.message.startswith(message)
    assert "pk-wrong-0123456789" not in str(err)
    assert KEY not in str(err)


async def test_portkey_raw_401_and_400_bodies(
    serve: Serve, transport: AiohttpTransport, clock: VirtualClock
) -> None:
    """Without x-portkey-api-key: 401 {status: failure}; without provider or config: 400."""
    _, root = await serve("portkey")
    no_key = await transport.send(Request("GET", f"{root}/v1/batches"))
    assert no_key.status == 401
    assert json.loads(await no_key.read()) == {
        "status": "failure",
        "message": "x-portkey-api-key header is required",
    }
    no_route = await transport.send(
        Request("GET", f"{root}/v1/batches", headers={"x-portkey-api-key": KEY})
    )
    assert no_route.status == 400
    body = json.loads(await no_route.read())
    assert body["status"] == "failure" and "x-portkey-provider" in body["message"]


@pytest.mark.parametrize("status", [BatchStatus.FILE_UPLOAD_FAILED, BatchStatus.BATCH_START_FAILED])
async def test_portkey_only_statuses_end_the_batch_with_a_clear_outcome(
    serve: Serve, transport: AiohttpTransport, clock: VirtualClock, status: BatchStatus
) -> None:
    """A batch ending file_upload_failed / batch_start_failed is terminal and explained."""
    service, root = await serve("portkey")
    service.fail_next_batches("provider_unavailable", status=status.value)
    client = client_for(portkey(root), transport, clock)
    done = await run_lifecycle(client, clock)
    assert done.status is status
    assert done.is_terminal
    assert done.failed_at is not None
    assert (done.output_file_id, done.error_file_id) == (None, None)
    assert "nothing was billed" in done.outcome
    assert "provider_unavailable" in done.outcome
    with pytest.raises(NoOutputError) as info:
        [line async for line in client.iter_batch_output(done.id)]
    assert info.value.batch_id == done.id
    assert info.value.errors.data[0].code == "provider_unavailable"


async def test_portkey_output_of_an_unfinished_batch_is_the_wrapped_404(
    serve: Serve, transport: AiohttpTransport, clock: VirtualClock
) -> None:
    """/output before the batch has an output file is the provider's 404 for the null
    file id the gateway asks for, wrapped."""
    _, root = await serve("portkey")
    client = client_for(portkey(root), transport, clock)
    uploaded = await client.upload_file(CONTENT)
    batch = await client.create_batch(uploaded.id, ENDPOINT)
    with pytest.raises(NotFoundError) as info:
        [line async for line in client.iter_batch_output(batch.id)]
    assert info.value.message.startswith("openai error: No such File object: null")
    assert isinstance(info.value.body, dict) and info.value.body["provider"] == "openai"


async def test_portkey_output_of_a_batch_without_a_successful_line_yields_nothing(
    serve: Serve, transport: AiohttpTransport, clock: VirtualClock
) -> None:
    """/output of a finished batch whose every line failed (no output file: the gateway
    relays the provider's 404 for a null file id) yields nothing; the error file holds
    the lines."""
    every_line_fails = attrs.evolve(CONFIG, line_errors=(LineErrorRule(status=400, ratio=1.0),))
    service, root = await serve("portkey", config=every_line_fails)
    client = client_for(portkey(root), transport, clock)
    done = await run_lifecycle(client, clock)
    assert done.status is BatchStatus.COMPLETED
    assert done.output_file_id is None and done.error_file_id is not None
    assert [line async for line in client.iter_batch_output(done.id)] == []
    assert [line async for line in client.iter_batch_output(done)] == []
    failed = [line async for line in client.iter_results(done.error_file_id)]
    assert len(failed) == 6
    assert service.request_count("GET", "/batches/*/output") == 2


@pytest.mark.parametrize("body", [b"{}", b'{"object": "list", "data": []}', b""])
async def test_output_answered_with_no_errors_and_no_lines_yields_nothing(
    clock: VirtualClock, body: bytes
) -> None:
    """A gateway answering /output of a batch without successes with an empty errors
    object ({}), an empty errors list or no body yields nothing."""

    async def gateway(request: Request) -> Response:
        assert request.url.endswith("/batches/batch_1/output")
        return Response(200, {"content-type": "application/json"}, body)

    provider = PortkeyProvider(api_key=KEY, provider="@p", base_url="http://gw/v1")
    client = client_for(provider, InMemoryTransport(gateway, clock=clock), clock)
    assert [line async for line in client.iter_batch_output("batch_1")] == []


async def test_portkey_gateway_failure_envelope_is_a_server_error_with_its_message(
    clock: VirtualClock,
) -> None:
    """The gateway's 500 {"status": "failure", "message"} becomes a ServerError saying it."""

    async def gateway(request: Request) -> Response:
        body = b'{"status":"failure","message":"Something went wrong"}'
        return Response(500, {"content-type": "application/json"}, body)

    provider = PortkeyProvider(api_key=KEY, provider="@p", base_url="http://gw/v1")
    client = client_for(provider, InMemoryTransport(gateway, clock=clock), clock)
    with pytest.raises(ServerError) as info:
        await client.retrieve_batch("batch_1")
    assert (info.value.message, info.value.error_type) == ("Something went wrong", "failure")


async def test_output_endpoint_on_a_provider_without_it_is_unsupported(
    serve: Serve, transport: AiohttpTransport, clock: VirtualClock
) -> None:
    """iter_batch_output on OpenAI raises UnsupportedError and sends nothing."""
    service, root = await serve("openai")
    client = client_for(OpenAIProvider(api_key=KEY, base_url=f"{root}/v1"), transport, clock)
    with pytest.raises(UnsupportedError, match="openai provider has no"):
        [line async for line in client.iter_batch_output("batch_1")]
    assert service.requests == ()
    with pytest.raises(ValueError, match="Portkey status"):
        service.fail_next_batches("x", status="file_upload_failed")


# --- Azure OpenAI ----------------------------------------------------------------------------


def azure(root: str, **kwargs: Any) -> AzureOpenAIProvider:
    """An Azure provider for the fake resource at ``root``."""
    settings: dict[str, Any] = {"api_key": KEY, **kwargs}
    return AzureOpenAIProvider(endpoint=root, **settings)


@pytest.mark.parametrize("api_version", ["2024-10-21", "v1"])
async def test_azure_full_lifecycle_on_both_path_styles(
    serve: Serve, transport: AiohttpTransport, clock: VirtualClock, api_version: str
) -> None:
    """Legacy ?api-version and v1 paths: upload waits for processed, batch completes."""
    service, root = await serve("azure")
    client = client_for(azure(root, api_version=api_version), transport, clock)
    async with clock.auto_advance():
        uploaded = await client.upload_file(CONTENT, filename="requests.jsonl")
    assert uploaded.status == "processed"
    assert service.request_count("GET", "/files/*") >= 1  # it was pending first
    batch = await client.create_batch(uploaded.id, ENDPOINT)
    async with clock.auto_advance():
        done = await client.wait(batch, poll_interval=5, max_interval=5, jitter=0)
    assert done.status is BatchStatus.COMPLETED
    assert {r.params.get("api-version") for r in service.requests} == (
        {None} if api_version == "v1" else {api_version}
    )
    assert done.error_file_id is not None
    (failed,) = [line async for line in client.iter_results(done.error_file_id)]
    assert failed.custom_id == "req-3"


async def test_azure_successful_batch_gets_an_empty_error_file_read_as_no_errors(
    serve: Serve, transport: AiohttpTransport, clock: VirtualClock
) -> None:
    """A batch with no failed line has an error_file_id for 0 bytes; it yields no lines."""
    service, root = await serve("azure", config=FakeConfig(validation_seconds=1))
    client = client_for(azure(root), transport, clock)
    async with clock.auto_advance():
        uploaded = await client.upload_file(CONTENT)
        done = await client.wait(await client.create_batch(uploaded.id, ENDPOINT), jitter=0)
    assert done.status is BatchStatus.COMPLETED
    assert done.request_counts is not None and done.request_counts.failed == 0
    assert done.error_file_id is not None
    assert service.file_content(done.error_file_id) == b""
    assert [line async for line in client.iter_results(done.error_file_id)] == []
    assert (await client.retrieve_file(done.error_file_id)).bytes == 0


async def test_azure_batches_outlive_the_24h_window(
    serve: Serve, transport: AiohttpTransport, clock: VirtualClock
) -> None:
    """On Azure a batch still running after 24 h is not expired, and completes later."""
    slow = FakeConfig(validation_seconds=1, lines_per_second=6 / 100_000)  # ~28 h for 6 lines
    _, root = await serve("azure", config=slow)
    client = client_for(azure(root), transport, clock)
    async with clock.auto_advance():
        uploaded = await client.upload_file(CONTENT)
    batch = await client.create_batch(uploaded.id, ENDPOINT)
    assert batch.expires_at == batch.created_at + 86_400
    clock.advance(90_000)
    late = await client.retrieve_batch(batch.id)
    assert late.status is BatchStatus.IN_PROGRESS
    assert late.expired_at is None
    clock.advance(20_000)
    assert (await client.retrieve_batch(batch.id)).status is BatchStatus.COMPLETED


async def test_openai_dialect_expires_where_azure_does_not(
    serve: Serve, transport: AiohttpTransport, clock: VirtualClock
) -> None:
    """The same slow batch on the OpenAI dialect expires at the end of the window."""
    slow = FakeConfig(validation_seconds=1, lines_per_second=6 / 100_000)
    _, root = await serve("openai", config=slow)
    client = client_for(OpenAIProvider(api_key=KEY, base_url=f"{root}/v1"), transport, clock)
    batch = await client.create_batch((await client.upload_file(CONTENT)).id, ENDPOINT)
    clock.advance(90_000)
    assert (await client.retrieve_batch(batch.id)).status is BatchStatus.EXPIRED


async def test_azure_preview_quirks_decode(
    serve: Serve, transport: AiohttpTransport, clock: VirtualClock
) -> None:
    """ISO timestamps, capitalised statuses and null counts decode to the usual models."""
    dialect = FakeDialect.azure(
        iso_timestamps=True, capitalised_statuses=True, null_request_counts=True
    )
    service, root = await serve(dialect)
    client = client_for(azure(root, api_version="2024-07-01-preview"), transport, clock)
    uploaded_at = int(clock.now())
    async with clock.auto_advance():
        uploaded = await client.upload_file(CONTENT)
    assert uploaded.created_at == uploaded_at  # sent as an ISO-8601 string
    assert uploaded.status == "processed"
    batch = await client.create_batch(uploaded.id, ENDPOINT)
    assert (batch.status, batch.raw_status) == (BatchStatus.VALIDATING, "Validating")
    assert batch.request_counts is not None and batch.request_counts.total == 0
    stored = await service.get_batch(batch.id)
    assert (batch.created_at, batch.expires_at) == (stored.created_at, stored.expires_at)
    clock.advance(11)
    running = await client.retrieve_batch(batch.id)
    assert (running.status, running.raw_status) == (BatchStatus.IN_PROGRESS, "InProgress")
    async with clock.auto_advance():
        done = await client.wait(running, jitter=0)
    assert (done.status, done.raw_status) == (BatchStatus.COMPLETED, "Completed")
    assert done.request_counts is not None and done.request_counts.total == 6
    assert done.completed_at == (await service.get_batch(batch.id)).completed_at


@pytest.mark.parametrize(
    ("provider_kwargs", "message"),
    [
        ({"api_key": "az-wrong-0123456789"}, "Access denied due to invalid subscription key"),
        ({"api_key": None, "ad_token": "entra-wrong-token"}, "Access denied due to invalid"),
    ],
)
async def test_azure_auth_failures_have_azures_shape(
    serve: Serve,
    transport: AiohttpTransport,
    clock: VirtualClock,
    provider_kwargs: dict[str, Any],
    message: str,
) -> None:
    """A wrong key or token is Azure's 401 {error: {code: "401", message}}."""
    _, root = await serve("azure")
    client = client_for(azure(root, **provider_kwargs), transport, clock)
    with pytest.raises(AuthenticationError) as info:
        await client.list_files_page()
    err = info.value
    assert (err.status_code, err.error_code, err.error_type) == (401, "401", None)
    assert err.message.startswith(message)
    assert "az-wrong-0123456789" not in str(err) and "entra-wrong-token" not in str(err)


async def test_azure_raw_requests_missing_key_and_api_version(
    serve: Serve, transport: AiohttpTransport
) -> None:
    """No key: 401 missing subscription key; legacy path without api-version: 404."""
    _, root = await serve("azure")
    no_key = await transport.send(Request("GET", f"{root}/openai/batches?api-version=2024-10-21"))
    assert no_key.status == 401
    body = json.loads(await no_key.read())
    assert body["error"]["code"] == "401" and "missing subscription key" in body["error"]["message"]
    headers = {"api-key": KEY}
    no_version = await transport.send(Request("GET", f"{root}/openai/batches", headers=headers))
    assert no_version.status == 404
    assert json.loads(await no_version.read()) == {
        "error": {"code": "404", "message": "Resource not found"}
    }
    bad = await transport.send(
        Request("GET", f"{root}/openai/batches", params={"api-version": "x"}, headers=headers)
    )
    assert bad.status == 400
    outside = await transport.send(Request("GET", f"{root}/v1/batches", headers=headers))
    assert outside.status == 404
    v1 = await transport.send(Request("GET", f"{root}/openai/v1/batches", headers=headers))
    assert v1.status == 200


async def test_azure_create_with_a_pending_file_is_refused(
    serve: Serve, transport: AiohttpTransport, clock: VirtualClock
) -> None:
    """Without the wait, creating from a pending file is a 400 naming input_file_id."""
    _, root = await serve("azure")
    client = client_for(azure(root), transport, clock)
    uploaded = await client.upload_file(CONTENT, wait_processed=False)
    assert uploaded.status == "pending"
    with pytest.raises(BadRequestError) as info:
        await client.create_batch(uploaded.id, ENDPOINT)
    assert info.value.error_param == "input_file_id"
    clock.advance(2)
    assert (await client.wait_for_file(uploaded.id)).status == "processed"


async def test_azure_file_wait_has_a_deadline(
    serve: Serve, transport: AiohttpTransport, clock: VirtualClock
) -> None:
    """A file pending past processing_timeout raises FileWaitTimeoutError on the clock."""
    _, root = await serve(FakeDialect.azure(file_pending_seconds=3600))
    client = client_for(azure(root), transport, clock)
    start = clock.monotonic()
    async with clock.auto_advance():
        with pytest.raises(FileWaitTimeoutError) as info:
            await client.upload_file(CONTENT, processing_timeout=60)
    assert info.value.status == "pending"
    assert 60 <= clock.monotonic() - start < 120
    assert isinstance(info.value, TimeoutError)


async def test_a_file_that_ends_in_error_is_a_processing_error(
    serve: Serve, clock: VirtualClock
) -> None:
    """A file the server marks error stops the wait with FileProcessingError and its details."""
    service, root = await serve("azure")

    async def broken(request: Request) -> Response:
        response = await service.handle(request)
        if request.method == "GET" and "/files/" in request.url:
            body = {**json.loads(await response.read()), "status": "error"}
            body["status_details"] = "line 1 is not JSON"
            return Response(200, response.headers, json.dumps(body).encode())
        return response

    client = client_for(azure(root), InMemoryTransport(broken, clock=clock), clock)
    with pytest.raises(FileProcessingError, match="line 1 is not JSON") as info:
        async with clock.auto_advance():
            await client.upload_file(CONTENT)
    assert (info.value.status, info.value.status_details) == ("error", "line 1 is not JSON")


# --- the command line ------------------------------------------------------------------------


def test_fake_server_dialect_and_quirk_flags() -> None:
    """--dialect and --quirks give the service that dialect with those switches on."""
    args = build_parser().parse_args(
        ["fake-server", "--dialect", "azure", "--quirks", "ms-timestamps,capitalised-statuses"]
    )
    dialect = build_fake_service(args).dialect
    assert dialect == FakeDialect.azure(ms_timestamps=True, capitalised_statuses=True)
    plain = build_fake_service(build_parser().parse_args(["fake-server", "--dialect", "portkey"]))
    assert plain.dialect == FakeDialect.portkey()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fake-server", "--quirks", "nope"])
