"""Exactly once when the server's answer to an upload or a create is lost or late: the run
adopts what the server made (only once it is usable) and never makes a second batch for
a shard, whether the run goes on, or ends and is resumed at once.

Every test drives the in-memory fake service on a virtual clock. Where the fake has no
switch for a server behaviour (a server that does not keep metadata, a create committed
a few seconds after it arrived), a small handler in front of the service plays it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    API_KEY,
    Handler,
    client_for,
    config,
    executed,
    in_front,
    path_of,
    requests,
    run_to_end,
    service_on,
    shards_of_batches,
    write_jsonl,
)

from aiobatch import BatchRun, RetryPolicy
from aiobatch._provider import AzureOpenAIProvider
from aiobatch.errors import AiobatchError
from aiobatch.testing import FakeBatchService, FakeConfig, FakeDialect, Fault, VirtualClock
from aiobatch.transport import Request, Response


async def edited_json(response: Response, edit: Callable[[Any], None]) -> Response:
    """``response`` with its JSON body changed in place by ``edit``."""
    body = json.loads(await response.read())
    edit(body)
    headers = {k: v for k, v in response.headers.items() if k != "content-length"}
    return Response(response.status, headers, json.dumps(body).encode())


def late_committing_create(
    service: FakeBatchService, delay: float, when_sent: Callable[[], None]
) -> tuple[Any, list[asyncio.Future[Response]]]:
    """A transport whose first create reaches the server ``delay`` seconds after it was
    sent, and is committed then even if the client has gone (a real server keeps running
    a handler whose client hung up); ``when_sent`` is called once it is on its way. Also
    returns the server-side work of that create, to wait for."""
    creates = 0
    committed: list[asyncio.Future[Response]] = []

    async def handler(request: Request, handle: Handler) -> Response:
        nonlocal creates
        if request.method == "POST" and path_of(request) == "/batches":
            creates += 1
            if creates == 1:

                async def commit() -> Response:
                    await service.clock.sleep(delay)
                    return await handle(request)

                task = asyncio.ensure_future(commit())
                committed.append(task)
                when_sent()
                return await asyncio.shield(task)
        return await handle(request)

    return in_front(service, handler), committed


# --- a lost upload answer --------------------------------------------------------------------


async def test_on_azure_an_adopted_upload_is_not_used_before_it_is_processed(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """On Azure, an upload whose answer was lost is adopted by its name only once it is
    'processed' (as upload_file waits for), so the create is accepted and every request
    succeeds instead of ending with batch_create_rejected."""
    service = FakeBatchService(
        clock=clock,
        config=FakeConfig(validation_seconds=5.0, lines_per_second=1.0, finalizing_seconds=5.0),
        dialect=FakeDialect.azure(file_pending_seconds=60.0),  # a big file, a busy resource
    )
    # The service stores the first upload; its answer never reaches the run.
    service.faults.add(Fault.drop(after=True, method="POST", path="/files"))
    source = write_jsonl(tmp_path / "in.jsonl", requests(4))
    provider = AzureOpenAIProvider(endpoint="http://fake.local", api_key=API_KEY)
    transport = service.transport()
    async with client_for(
        clock, transport, provider=provider, retry=RetryPolicy.for_testing(max_attempts=1)
    ) as client:
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=config())
        async with clock.auto_advance():
            report, results = await run_to_end(run)
    assert report.errors.get("batch_create_rejected", 0) == 0, dict(report.errors)
    assert report.succeeded == 4
    assert all(r.ok for r in results)


# --- a lost or late create answer ------------------------------------------------------------


async def test_on_a_server_without_metadata_a_lost_create_answer_makes_no_second_batch(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """On a server that does not keep batch metadata (the client learns it from the first
    create and then refuses to look keys up), a create whose answer is lost is never sent
    again for the same shard: no shard gets a second batch."""
    service = service_on(clock)
    creates = 0

    def strip(body: Any) -> None:
        items = body.get("data") if body.get("object") == "list" else [body]
        for item in items or ():
            if isinstance(item, dict) and item.get("object") == "batch":
                item["metadata"] = None

    async def forgetful(request: Request, handle: Handler) -> Response:
        nonlocal creates
        path = path_of(request)
        response = await handle(request)
        if request.method == "POST" and path == "/batches":
            creates += 1
            if creates == 1:
                # From the second create on, the answer is lost once, after the service
                # made the batch.
                service.faults.add(Fault.drop(after=True, method="POST", path="/batches"))
        if path.startswith("/batches") and response.status == 200:
            return await edited_json(response, strip)
        return response

    source = write_jsonl(tmp_path / "in.jsonl", requests(4))
    settings = config(max_lines=2, max_submissions=1)
    async with client_for(clock, in_front(service, forgetful)) as client:
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=settings)
        async with clock.auto_advance():
            with contextlib.suppress(AiobatchError):  # stopping with an error is fine
                await run.run()
    shards = await shards_of_batches(service)
    assert all(count == 1 for count in shards.values()), shards


@pytest.mark.parametrize("how", ["stop-and-restart", "cancel-timeout-and-resume"])
async def test_a_create_still_on_its_way_never_gets_a_second_batch(
    clock: VirtualClock, tmp_path: Path, how: str
) -> None:
    """A run that ends while its create is on its way (SIGTERM then an immediate restart, or a
    cancel whose cancel_timeout runs out) and is resumed makes no second batch for the shard
    when the server commits that create 5 s later (less than the client's create_settle)."""
    service = service_on(clock)
    holder: list[BatchRun] = []

    def end_the_run() -> None:
        if how == "stop-and-restart":
            holder[0].stop()
        else:
            holder[0].cancel()

    transport, committed = late_committing_create(service, 5.0, end_the_run)
    source = write_jsonl(tmp_path / "in.jsonl", requests(3))
    journal = tmp_path / "run.journal"
    first_config = config(cancel_timeout=2.0) if how != "stop-and-restart" else config()
    async with client_for(clock, transport) as client, clock.auto_advance():
        run = BatchRun(client, source, journal=journal, config=first_config)
        holder.append(run)
        first = await run.run()
        assert first.state in ("stopped", "cancelled")
        # At once, as a supervisor restarts a service (no wait on the clock).
        final = await BatchRun(client, source, journal=journal, config=config()).run()
        await asyncio.gather(*committed)
        await clock.sleep(600.0)  # every batch on the server ends
    shards = await shards_of_batches(service)
    assert final.state == "done"
    assert all(count == 1 for count in shards.values()), shards
    runs = await executed(service)
    assert max(runs.values()) == 1, runs
