"""The coalescing client: awaited calls gathered into batches, each answered with its own
result; its flush policy, errors, bad input, close, cancellation and backpressure.

Every test drives the in-memory fake service on an auto-advancing virtual clock.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import FAST_FLEET, executed, within

from aiobatch import (
    BatchClient,
    BatchCreated,
    BatchedOpenAI,
    BatchedResult,
    BatchEnded,
    BatchEvent,
    ProgressDisplay,
    RunConfig,
    RunProgress,
)
from aiobatch.errors import (
    BatchedTimeoutError,
    BatchEndedError,
    ClosedError,
    InputError,
    PreflightError,
    RequestFailedError,
)
from aiobatch.testing import (
    DefaultResponder,
    FakeBatchService,
    FakeConfig,
    VirtualClock,
    fake_client,
)

FAST = {"validation_seconds": 5.0, "lines_per_second": 1000.0, "finalizing_seconds": 5.0}


@asynccontextmanager
async def fake(
    clock: VirtualClock, responder: Any = None, **settings: Any
) -> AsyncIterator[tuple[FakeBatchService, BatchClient]]:
    """A fake service with fast timings, a client on it, the clock auto-advancing."""
    service = FakeBatchService(
        clock=clock,
        config=FakeConfig(**{**FAST, "request_log_size": None, **settings}),
        responder=responder,
    )
    async with fake_client(service=service) as setup, clock.auto_advance():
        yield service, setup.client


def run_config(**overrides: Any) -> RunConfig:
    """A run config polling fast."""
    return RunConfig(**{"fleet": FAST_FLEET, **overrides})


def chat(openai: BatchedOpenAI, text: str, model: str = "gpt-4o-mini", **extra: Any) -> Any:
    """A chat call with one user message."""
    return openai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], **extra
    )


def text_of(result: BatchedResult) -> str:
    """The reply text of a chat, completions or responses answer (our type)."""
    body = result.body
    if body["object"] == "chat.completion":
        return str(body["choices"][0]["message"]["content"])
    if body["object"] == "text_completion":
        return str(body["choices"][0]["text"])
    return str(body["output"][0]["content"][0]["text"])


async def test_ten_thousand_calls_resolve_each_with_its_own_result(clock: VirtualClock) -> None:
    """10,000 concurrent calls across two models and three endpoints each get their own
    answer, in a handful of batches (one per endpoint and model)."""
    async with (
        fake(clock) as (service, client),
        BatchedOpenAI(client, config=run_config(), sdk_types=False) as openai,
    ):
        calls = []
        for i in range(10_000):
            model = ("gpt-4o-mini", "gpt-4.1")[i % 2]
            prompt = f"question {i}"
            kind = (i // 2) % 3
            if kind == 0:
                calls.append(chat(openai, prompt, model))
            elif kind == 1:
                calls.append(openai.completions.create(model=model, prompt=prompt))
            else:
                calls.append(openai.responses.create(model=model, input=prompt))
        results = await within(clock, 3600, asyncio.gather(*calls))
        assert len(results) == 10_000
        for i, result in enumerate(results):
            assert isinstance(result, BatchedResult)
            assert result.status_code == 200
            assert text_of(result).endswith(f"to: question {i}"), (i, text_of(result))
            assert result.body["model"] == ("gpt-4o-mini", "gpt-4.1")[i % 2]
        assert len(service.batch_ids) == 6
        assert sum((await executed(service)).values()) == 10_000
        stats = openai.stats()
        assert (stats.done, stats.failed, stats.pending) == (10_000, 0, 0)


async def test_sdk_types_are_returned_when_openai_is_installed(clock: VirtualClock) -> None:
    """With the openai package, each endpoint's answer is the SDK's own type."""
    openai_types = pytest.importorskip("openai.types")
    from openai.types.chat import ChatCompletion
    from openai.types.responses import Response

    async with fake(clock) as (_, client), BatchedOpenAI(client, config=run_config()) as openai:
        answers = await within(
            clock,
            600,
            asyncio.gather(
                chat(openai, "hi"),
                openai.embeddings.create(model="text-embedding-3-small", input="hi"),
                openai.responses.create(model="gpt-4o-mini", input="hi"),
                openai.completions.create(model="gpt-4o-mini", prompt="hi"),
                openai.moderations.create(model="omni-moderation-latest", input="hi"),
            ),
        )
    completion, embedding, response, text, moderation = answers
    assert isinstance(completion, ChatCompletion)
    assert completion.choices[0].message.content.endswith("to: hi")  # type: ignore[union-attr]
    assert completion.usage is not None
    assert completion.usage.total_tokens > 0
    assert isinstance(embedding, openai_types.CreateEmbeddingResponse)
    assert len(embedding.data[0].embedding) == 8
    assert isinstance(response, Response)
    assert response.output_text.endswith("to: hi")
    assert isinstance(text, openai_types.Completion)
    assert isinstance(moderation, openai_types.ModerationCreateResponse)


async def test_a_failed_line_raises_with_the_status_code_message_and_request_id(
    clock: VirtualClock,
) -> None:
    """A line answered with an HTTP error raises RequestFailedError carrying what the
    SDK's APIStatusError carries; the other calls of its batch still succeed."""
    default = DefaultResponder(clock=clock)

    def responder(request: Any) -> Any:
        if "refuse me" in str(request.body):
            error = {"message": "no thanks", "type": "invalid_request_error", "code": "nope"}
            return 400, {"error": {**error, "param": "messages"}}
        return default(request)

    async with (
        fake(clock, responder=responder) as (_, client),
        BatchedOpenAI(client, config=run_config(), sdk_types=False) as openai,
    ):
        good, bad = await within(
            clock,
            600,
            asyncio.gather(chat(openai, "fine"), chat(openai, "refuse me"), return_exceptions=True),
        )
    assert isinstance(good, BatchedResult)
    assert isinstance(bad, RequestFailedError)
    assert (bad.status_code, bad.error_code, bad.error_param) == (400, "nope", "messages")
    assert bad.message == "no thanks"
    assert bad.request_id
    assert bad.batch_id
    assert openai.stats().failed == 1


async def test_an_expired_line_past_its_rounds_raises_batch_ended(clock: VirtualClock) -> None:
    """A request whose batches expired in every round raises BatchEndedError."""
    async with (
        fake(clock, lines_per_second=0.001, completion_window_seconds=60.0) as (_, client),
        BatchedOpenAI(client, config=run_config(max_rounds=1)) as openai,
    ):
        with pytest.raises(BatchEndedError) as caught:
            await within(clock, 3600, chat(openai, "too slow"))
    assert caught.value.code == "batch_expired"
    assert caught.value.batch_id


@pytest.mark.parametrize(
    ("params", "what"),
    [
        ({"stream": True}, "stream"),
        ({"model": ""}, "model"),
        ({"messages": [{"role": "user", "content": "x" * 5000}]}, "bytes"),
    ],
)
async def test_a_call_a_batch_refuses_raises_at_once(
    clock: VirtualClock, params: dict[str, Any], what: str
) -> None:
    """stream=True, a missing model or a body larger than a batch raises before anything
    is queued."""
    async with (
        fake(clock) as (service, client),
        BatchedOpenAI(client, config=run_config(max_bytes=4096)) as openai,
    ):
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        with pytest.raises(PreflightError):
            await openai.chat.completions.create(**{**body, **params})
        assert openai.stats().pending == 0
    assert service.batch_ids == []


async def test_calls_run_as_tasks_as_the_sdk_calls_do(clock: VirtualClock) -> None:
    """A call's create() is used as the SDK's coroutine is: run as a task (create_task,
    ensure_future then asyncio.wait) it is answered, a cancelled one is taken out, a
    refused one raises."""
    async with (
        fake(clock) as (_, client),
        BatchedOpenAI(client, config=run_config(), sdk_types=False) as openai,
    ):
        tasks = [asyncio.create_task(chat(openai, f"q{i}")) for i in range(3)]
        refused = asyncio.create_task(chat(openai, "streamed", stream=True))
        waited = asyncio.ensure_future(chat(openai, "waited"))
        await asyncio.sleep(0)
        tasks[2].cancel()
        results = await within(clock, 600, asyncio.gather(*tasks[:2]))
        with pytest.raises(PreflightError):
            await refused
        done, _ = await within(clock, 600, asyncio.wait([waited]))
        stats = openai.stats()
    assert [text_of(r)[-5:] for r in results] == ["o: q0", "o: q1"]
    assert text_of(done.pop().result()).endswith("to: waited")
    assert tasks[2].cancelled()
    assert (stats.done, stats.cancelled, stats.pending) == (3, 1, 0)


async def test_a_refused_call_leaves_the_next_calls_unaffected(clock: VirtualClock) -> None:
    """After a call a batch refuses has raised, the next calls are checked afresh: a
    second refused call names only its own problem, good calls are answered."""
    async with (
        fake(clock) as (_, client),
        BatchedOpenAI(client, config=run_config(), sdk_types=False) as openai,
    ):
        with pytest.raises(PreflightError):
            await chat(openai, "streamed", stream=True)
        with pytest.raises(PreflightError) as caught:
            await chat(openai, "no model", model="")
        assert caught.value.count == 1
        assert "stream" not in str(caught.value)
        results = await within(clock, 600, asyncio.gather(chat(openai, "a"), chat(openai, "b")))
    assert text_of(results[0]).endswith("to: a")
    assert text_of(results[1]).endswith("to: b")


async def test_an_unknown_endpoint_raises_at_once(clock: VirtualClock) -> None:
    """An endpoint batches cannot call raises InputError before anything is queued."""
    async with fake(clock) as (service, client), BatchedOpenAI(client) as openai:
        with pytest.raises(InputError, match="/v1/images/generations"):
            await openai.request("/v1/images/generations", {"model": "dall-e-3"})
    assert service.batch_ids == []


async def test_a_group_is_flushed_when_its_oldest_call_waited_max_wait(
    clock: VirtualClock,
) -> None:
    """A lone call goes out max_wait seconds after it was made, not before."""
    async with (
        fake(clock) as (service, client),
        BatchedOpenAI(client, max_wait=30.0, config=run_config()) as openai,
    ):
        start = clock.now()
        task = asyncio.ensure_future(chat(openai, "hello"))
        await clock.sleep(29.0)
        assert service.batch_ids == []
        await clock.sleep(2.0)
        assert len(service.batch_ids) == 1
        batch = await service.get_batch(service.batch_ids[0])
        assert 30.0 <= batch.created_at - start <= 31.0
        await within(clock, 600, task)


async def test_a_full_group_is_flushed_at_once(clock: VirtualClock) -> None:
    """A group reaching the batch's line limit goes out without waiting for max_wait."""
    async with (
        fake(clock) as (service, client),
        BatchedOpenAI(client, max_wait=3600.0, config=run_config(max_lines=10)) as openai,
    ):
        tasks = [asyncio.ensure_future(chat(openai, f"q{i}")) for i in range(25)]
        await clock.sleep(60.0)
        assert len(service.batch_ids) == 2  # two full batches; the last 5 still wait
        assert openai.stats().queued == 5
        await openai.flush()
        await within(clock, 600, asyncio.gather(*tasks))
        assert len(service.batch_ids) == 3


async def test_flushing_does_not_block_callers(clock: VirtualClock) -> None:
    """While a flush's batch run is busy, new calls are queued at once."""
    async with fake(clock) as (_, client), BatchedOpenAI(client, config=run_config()) as openai:
        first = asyncio.ensure_future(chat(openai, "one"))
        await asyncio.sleep(0)
        await openai.flush()
        second = asyncio.ensure_future(chat(openai, "two"))
        await asyncio.sleep(0)
        assert openai.stats().queued == 1
        assert openai.stats().submitted == 1
        await within(clock, 600, asyncio.gather(first, second))


async def test_close_waits_for_every_call_by_default(clock: VirtualClock) -> None:
    """Leaving the client flushes the queued calls and waits for their answers."""
    async with fake(clock) as (_, client):
        openai = BatchedOpenAI(client, max_wait=3600.0, config=run_config(), sdk_types=False)
        await openai.start()
        tasks = [asyncio.ensure_future(chat(openai, f"q{i}")) for i in range(5)]
        await asyncio.sleep(0)
        await within(clock, 600, openai.aclose())
        assert all(task.done() and not task.cancelled() for task in tasks)
        assert all(isinstance(task.result(), BatchedResult) for task in tasks)
        with pytest.raises(ClosedError):
            await chat(openai, "late")


async def test_close_with_cancel_cancels_the_batches_and_fails_the_calls(
    clock: VirtualClock,
) -> None:
    """aclose(cancel=True) cancels the open batches; every waiting call raises
    ClosedError, none hangs."""
    async with fake(clock, lines_per_second=0.01) as (service, client):
        openai = BatchedOpenAI(client, max_wait=3600.0, config=run_config())
        await openai.start()
        sent = [asyncio.ensure_future(chat(openai, f"sent {i}")) for i in range(3)]
        await asyncio.sleep(0)
        await openai.flush()
        await clock.sleep(60.0)
        queued = [asyncio.ensure_future(chat(openai, f"queued {i}")) for i in range(2)]
        await asyncio.sleep(0)
        await within(clock, 600, openai.aclose(cancel=True))
        for task in sent + queued:
            assert task.done()
            assert isinstance(task.exception(), ClosedError)
        (batch_id,) = service.batch_ids
        assert (await service.get_batch(batch_id)).status.value == "cancelled"


async def test_a_caller_cancelled_before_the_flush_leaves_nothing(clock: VirtualClock) -> None:
    """A call cancelled while queued is removed: it is never sent, nothing is held."""
    async with (
        fake(clock) as (service, client),
        BatchedOpenAI(client, max_wait=3600.0, config=run_config()) as openai,
    ):
        tasks = [asyncio.ensure_future(chat(openai, f"q{i}")) for i in range(10)]
        await asyncio.sleep(0)
        for task in tasks[:4]:
            task.cancel()
        await asyncio.sleep(0)
        assert openai.stats().queued == 6
        await openai.flush()
        await within(clock, 600, asyncio.gather(*tasks[4:]))
        assert sum((await executed(service)).values()) == 6
        stats = openai.stats()
        assert (stats.pending, stats.cancelled, stats.done) == (0, 4, 6)


async def test_a_caller_cancelled_after_the_flush_has_its_result_dropped(
    clock: VirtualClock,
) -> None:
    """A call cancelled after its batch was sent: the batch runs, the answer is dropped,
    nothing is left held."""
    async with (
        fake(clock) as (_, client),
        BatchedOpenAI(client, config=run_config(), sdk_types=False) as openai,
    ):
        gone = asyncio.ensure_future(chat(openai, "gone"))
        kept = asyncio.ensure_future(chat(openai, "kept"))
        await asyncio.sleep(0)
        await openai.flush()
        await asyncio.sleep(0)
        gone.cancel()
        result = await within(clock, 600, kept)
        assert text_of(result).endswith("to: kept")
        stats = openai.stats()
        assert (stats.pending, stats.cancelled, stats.done) == (0, 1, 1)


async def test_max_pending_makes_callers_wait_and_flushes(clock: VirtualClock) -> None:
    """Beyond max_pending, a call waits for room; reaching it flushes the held calls at
    once rather than after max_wait."""
    async with (
        fake(clock) as (service, client),
        BatchedOpenAI(
            client, max_pending=4, max_wait=3600.0, config=run_config(), sdk_types=False
        ) as openai,
    ):
        tasks = [asyncio.ensure_future(chat(openai, f"q{i}")) for i in range(8)]
        held = []
        while not all(task.done() for task in tasks):
            held.append(openai.stats().pending)
            await clock.sleep(1.0)
            assert clock.now() < 1_750_000_000.0 + 3000, "waited for max_wait"
        assert max(held) == 4
        for i, task in enumerate(tasks):
            assert text_of(task.result()).endswith(f"to: q{i}")
        assert len(service.batch_ids) >= 3


async def test_the_journal_folder_keeps_one_journal_per_flush(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """With a journal folder, each flush leaves its SQLite journal there."""
    async with (
        fake(clock) as (_, client),
        BatchedOpenAI(client, journal=tmp_path / "j", config=run_config()) as openai,
    ):
        await within(clock, 600, asyncio.gather(chat(openai, "a"), chat(openai, "b")))
    assert len(list((tmp_path / "j").glob("*.journal"))) == 1


async def test_progress_sums_every_flush_for_the_run_display(clock: VirtualClock) -> None:
    """on_progress receives RunProgress snapshots summed over the flushes, as
    ProgressDisplay takes them; the last one counts every answered call."""
    seen: list[RunProgress] = []
    async with (
        fake(clock) as (_, client),
        BatchedOpenAI(client, config=run_config(), on_progress=seen.append) as openai,
    ):
        await within(
            clock,
            600,
            asyncio.gather(chat(openai, "a"), chat(openai, "b", model="gpt-4.1")),
        )
        progress = openai.progress()
    assert (progress.total, progress.succeeded, progress.failed) == (2, 2, 0)
    assert seen
    assert seen[-1].succeeded == 2
    assert any(snapshot.open_batches == 2 for snapshot in seen)
    with ProgressDisplay(stream=io.StringIO(), interactive=False) as display:
        display.update(progress)


async def test_events_tell_each_batch_made_and_ended(clock: VirtualClock) -> None:
    """on_event gets BatchCreated (id, endpoint, model, request count) when a flush's
    batch is open, then BatchEnded with its final status and counts."""
    events: list[BatchEvent] = []
    async with (
        fake(clock) as (service, client),
        BatchedOpenAI(client, config=run_config(), on_event=events.append) as openai,
    ):
        await within(
            clock,
            600,
            asyncio.gather(
                chat(openai, "a"),
                chat(openai, "b"),
                openai.embeddings.create(model="text-embedding-3-small", input="c"),
            ),
        )
    created = {e.batch_id: e for e in events if isinstance(e, BatchCreated)}
    ended = {e.batch_id: e for e in events if isinstance(e, BatchEnded)}
    assert set(created) == set(ended) == set(service.batch_ids)
    assert sorted((e.endpoint, e.model, e.requests) for e in created.values()) == [
        ("/v1/chat/completions", "gpt-4o-mini", 2),
        ("/v1/embeddings", "text-embedding-3-small", 1),
    ]
    for batch_id, end in ended.items():
        assert events.index(created[batch_id]) < events.index(end)
        assert (end.status, end.reason) == ("completed", "finished")
        assert end.counts is not None
        assert (end.counts.total, end.counts.completed) == (created[batch_id].requests,) * 2


async def test_an_expired_batch_ends_with_its_status(clock: VirtualClock) -> None:
    """Each batch that expires (one per round) is told as BatchEnded with status
    ``expired``."""
    events: list[BatchEvent] = []
    async with (
        fake(clock, lines_per_second=0.001, completion_window_seconds=60.0) as (_, client),
        BatchedOpenAI(client, config=run_config(max_rounds=1), on_event=events.append) as openai,
    ):
        with pytest.raises(BatchEndedError):
            await within(clock, 3600, chat(openai, "too slow"))
    created = [e.batch_id for e in events if isinstance(e, BatchCreated)]
    ended = [(e.batch_id, e.status) for e in events if isinstance(e, BatchEnded)]
    assert created
    assert ended == [(batch_id, "expired") for batch_id in created]


async def test_a_deadline_raises_a_typed_timeout_naming_the_request(clock: VirtualClock) -> None:
    """A call whose result is not in by its deadline (the client's, or its own) raises
    BatchedTimeoutError naming its key, endpoint and model; a call in time is answered."""
    async with (
        fake(clock, lines_per_second=0.001, completion_window_seconds=600.0) as (_, client),
        BatchedOpenAI(
            client, config=run_config(max_rounds=1), deadline=120.0, max_wait=1.0, sdk_types=False
        ) as openai,
    ):
        started = clock.monotonic()
        with pytest.raises(BatchedTimeoutError) as caught:
            await within(clock, 3600, chat(openai, "too slow"))
        assert clock.monotonic() - started == pytest.approx(120.0)
        with pytest.raises(BatchedTimeoutError) as own:
            await within(clock, 3600, chat(openai, "too slow", deadline=30.0))
        assert own.value.deadline == 30.0
    assert caught.value.custom_id
    assert (caught.value.url, caught.value.model) == ("/v1/chat/completions", "gpt-4o-mini")
    assert caught.value.custom_id in str(caught.value)
    assert openai.stats().failed == 2


async def test_a_call_answered_before_its_deadline_returns_its_result(clock: VirtualClock) -> None:
    """A deadline longer than the batch takes changes nothing."""
    async with (
        fake(clock) as (_, client),
        BatchedOpenAI(client, config=run_config(), sdk_types=False, deadline=3600.0) as openai,
    ):
        result = await within(clock, 600, chat(openai, "quick"))
    assert text_of(result).endswith("to: quick")
