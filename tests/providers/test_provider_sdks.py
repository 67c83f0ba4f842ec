"""Wire compatibility per dialect: the official ``portkey-ai`` SDK against the fake in
Portkey mode, and the official ``openai`` SDK's ``AsyncAzureOpenAI`` against it in Azure
mode, over HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from openai import AsyncAzureOpenAI
from portkey_ai import AsyncPortkey
from pytest_aiohttp import AiohttpServer

from aiobatch.testing import FakeBatchService, FakeConfig, VirtualClock, chat_requests, make_app

KEY = "key-sdk-0123456789abcdef"
CONFIG = FakeConfig(validation_seconds=10, lines_per_second=2, finalizing_seconds=5)


async def _root(aiohttp_server: AiohttpServer, service: FakeBatchService) -> str:
    server = await aiohttp_server(make_app(service))
    return str(server.make_url("")).rstrip("/")


def _input(tmp_path: Path, lines: int = 4) -> Path:
    path = tmp_path / "input.jsonl"
    path.write_bytes(chat_requests(lines))
    return path


async def _close(client: AsyncPortkey) -> None:
    # The SDK drives a vendored OpenAI client with its own connection pool, which its
    # close() leaves open.
    await client.openai_client.close()
    await client.close()


# --- portkey-ai -------------------------------------------------------------------------------


@pytest.fixture
def portkey_service(clock: VirtualClock) -> FakeBatchService:
    """The fake gateway, accepting only KEY."""
    return FakeBatchService(clock=clock, config=CONFIG, api_key=KEY, dialect="portkey")


@pytest.fixture
async def portkey(
    aiohttp_server: AiohttpServer, portkey_service: FakeBatchService
) -> AsyncIterator[AsyncPortkey]:
    """An AsyncPortkey client routed to a Model Catalog slug, against the fake gateway."""
    root = await _root(aiohttp_server, portkey_service)
    client = AsyncPortkey(api_key=KEY, base_url=f"{root}/v1", provider="@openai-test")
    yield client
    await _close(client)


async def test_portkey_sdk_runs_a_batch_and_reads_its_output(
    portkey: AsyncPortkey, portkey_service: FakeBatchService, clock: VirtualClock, tmp_path: Path
) -> None:
    """files.create, batches.create/retrieve/list and batches.output work through the SDK."""
    uploaded = await portkey.files.create(file=_input(tmp_path), purpose="batch")
    assert uploaded.status == "processed"
    batch = await portkey.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "validating"
    listed = await portkey.batches.list()
    assert [b.id for b in listed.data] == [batch.id]
    clock.advance(3600)
    done = await portkey.batches.retrieve(batch.id)
    assert done.status == "completed"
    assert done.output_file_id is not None
    output = await portkey.batches.output(batch.id)
    lines = [json.loads(line) for line in output.text.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == [f"req-{i}" for i in range(4)]
    content = await portkey.files.content(done.output_file_id)
    assert content.content == output.content
    assert portkey_service.request_count("GET", "/batches/*/output") == 1


async def test_portkey_sdk_cancel_and_a_portkey_only_status(
    portkey: AsyncPortkey, portkey_service: FakeBatchService, clock: VirtualClock, tmp_path: Path
) -> None:
    """batches.cancel answers cancelling; a batch_start_failed batch decodes in the SDK."""
    uploaded = await portkey.files.create(file=_input(tmp_path, 50), purpose="batch")
    batch = await portkey.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    clock.advance(11)
    assert (await portkey.batches.cancel(batch.id)).status == "cancelling"
    portkey_service.fail_next_batches("provider_refused", status="batch_start_failed")
    failing = await portkey.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    clock.advance(11)
    ended = await portkey.batches.retrieve(failing.id)
    assert ended.status == "batch_start_failed"
    assert ended.errors is not None


async def test_portkey_sdk_sees_the_gateway_401(
    aiohttp_server: AiohttpServer, portkey_service: FakeBatchService
) -> None:
    """A wrong Portkey key is an AuthenticationError carrying the gateway's message."""
    # batches.list goes through the OpenAI client the SDK vendors, and raises its errors.
    from portkey_ai._vendor.openai import AuthenticationError

    root = await _root(aiohttp_server, portkey_service)
    client = AsyncPortkey(api_key="pk-wrong", base_url=f"{root}/v1", provider="@openai-test")
    try:
        with pytest.raises(AuthenticationError) as info:
            await client.batches.list()
    finally:
        await _close(client)
    assert info.value.status_code == 401
    assert "Invalid API Key" in str(info.value.body)


# --- openai.AsyncAzureOpenAI -------------------------------------------------------------------


@pytest.fixture
def azure_service(clock: VirtualClock) -> FakeBatchService:
    """The fake Azure resource, accepting only KEY."""
    return FakeBatchService(clock=clock, config=CONFIG, api_key=KEY, dialect="azure")


@pytest.fixture
async def azure_root(aiohttp_server: AiohttpServer, azure_service: FakeBatchService) -> str:
    """The fake resource's endpoint."""
    return await _root(aiohttp_server, azure_service)


@pytest.fixture
async def azure(azure_root: str) -> AsyncIterator[AsyncAzureOpenAI]:
    """An AsyncAzureOpenAI client on a dated API version (the /openai/...?api-version= paths).

    Not in strict-validation mode: Azure's file status ``pending`` is not in the SDK's
    own list of file statuses, and users run the SDK without strict validation.
    """
    async with AsyncAzureOpenAI(
        api_key=KEY, azure_endpoint=azure_root, api_version="2024-10-21", max_retries=0
    ) as client:
        yield client


async def test_azure_sdk_runs_a_batch_through_the_lifecycle(
    azure: AsyncAzureOpenAI,
    azure_service: FakeBatchService,
    clock: VirtualClock,
    tmp_path: Path,
) -> None:
    """files.create (pending, then processed), batches.create/retrieve/list, files.content."""
    uploaded = await azure.files.create(file=_input(tmp_path), purpose="batch")
    assert uploaded.status == "pending"
    clock.advance(2)
    assert (await azure.files.retrieve(uploaded.id)).status == "processed"
    batch = await azure.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "validating"
    assert [b.id async for b in azure.batches.list()] == [batch.id]
    clock.advance(3600)
    done = await azure.batches.retrieve(batch.id)
    assert done.status == "completed"
    assert done.output_file_id is not None and done.error_file_id is not None
    output = await azure.files.content(done.output_file_id)
    assert len(output.text.splitlines()) == 4
    assert (await azure.files.content(done.error_file_id)).content == b""
    versions = {r.params.get("api-version") for r in azure_service.requests}
    assert versions == {"2024-10-21"}


def azure_doc_lines(deployment: str, count: int = 3) -> bytes:
    """Input lines as Azure's batch how-to writes them: ``"url": "/chat/completions"``
    (no ``/v1``) and a Global-Batch deployment's name as the ``model``."""
    lines = [
        {
            "custom_id": f"task-{i}",
            "method": "POST",
            "url": "/chat/completions",
            "body": {
                "model": deployment,
                "messages": [
                    {"role": "system", "content": "You are an AI assistant."},
                    {"role": "user", "content": f"Question {i}?"},
                ],
            },
        }
        for i in range(count)
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


async def test_azure_sdk_runs_the_documentation_example_on_the_legacy_endpoint(
    azure: AsyncAzureOpenAI, clock: VirtualClock, tmp_path: Path
) -> None:
    """Azure's how-to with a dated api-version: lines for /chat/completions naming a
    deployment, batches.create(endpoint="/chat/completions"): the batch completes with a
    chat completion per task."""
    source = tmp_path / "test.jsonl"
    source.write_bytes(azure_doc_lines("gpt-4o-batch"))
    uploaded = await azure.files.create(file=source, purpose="batch")
    clock.advance(2)
    batch = await azure.batches.create(
        input_file_id=uploaded.id,
        endpoint="/chat/completions",  # type: ignore[arg-type]  # Azure's dated versions
        completion_window="24h",
    )
    clock.advance(3600)
    done = await azure.batches.retrieve(batch.id)
    assert done.status == "completed", done.errors
    assert done.request_counts is not None and done.request_counts.completed == 3
    assert done.output_file_id is not None
    output = [
        json.loads(x) for x in (await azure.files.content(done.output_file_id)).text.splitlines()
    ]
    assert sorted(r["custom_id"] for r in output) == ["task-0", "task-1", "task-2"]
    bodies = [r["response"]["body"] for r in output]
    assert all(b["object"] == "chat.completion" and b["model"] == "gpt-4o-batch" for b in bodies)


async def test_azure_sdk_cancel_and_auth_errors(
    azure: AsyncAzureOpenAI, azure_root: str, clock: VirtualClock, tmp_path: Path
) -> None:
    """batches.cancel answers cancelling; a wrong key is the SDK's AuthenticationError."""
    uploaded = await azure.files.create(file=_input(tmp_path, 50), purpose="batch")
    clock.advance(2)
    batch = await azure.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    clock.advance(11)
    assert (await azure.batches.cancel(batch.id)).status == "cancelling"
    async with AsyncAzureOpenAI(
        api_key="az-wrong", azure_endpoint=azure_root, api_version="2024-10-21", max_retries=0
    ) as wrong:
        with pytest.raises(openai.AuthenticationError) as info:
            await wrong.batches.list()
    assert info.value.code == "401"
    assert "invalid subscription key" in info.value.message


async def test_openai_sdk_on_azures_v1_api(azure_root: str, clock: VirtualClock) -> None:
    """The plain AsyncOpenAI client on {endpoint}/openai/v1 (Azure's v1 API) lists batches."""
    async with openai.AsyncOpenAI(
        api_key=KEY, base_url=f"{azure_root}/openai/v1", max_retries=0
    ) as client:
        page = await client.batches.list()
    assert page.data == []
