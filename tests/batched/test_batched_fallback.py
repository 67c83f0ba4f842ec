"""The coalescing client's realtime fallback: a call whose deadline passes (or whose
batches expired or were cancelled) is answered by the online endpoint, once; a result
its batch brings later is a counted duplicate, never returned; a rerun pays nothing twice.

Every test drives the in-memory fake service on an auto-advancing virtual clock.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import executed, within
from test_batched_calls import chat, fake, run_config, text_of

from aiobatch import BatchClient, BatchedOpenAI, BatchedResult, BatchedStats
from aiobatch.errors import BatchedTimeoutError, RequestFailedError
from aiobatch.testing import DefaultResponder, FakeBatchService, Fault, VirtualClock

#: a batch this slow is not done within any deadline below (one line per 100 s)
SLOW = {"lines_per_second": 0.01}


def online_posts(service: FakeBatchService) -> int:
    """How many requests the service's online chat endpoint answered."""
    return sum(1 for r in service.requests if (r.method, r.path) == ("POST", "/chat/completions"))


async def batch_status(service: FakeBatchService, batch_id: str) -> str:
    """A batch's status on the service now."""
    return str((await service.get_batch(batch_id)).status.value)


async def test_calls_past_their_deadline_are_answered_online_once(clock: VirtualClock) -> None:
    """Each call whose deadline passed gets its own online answer, once; the batch
    nobody waits for any more is cancelled."""
    async with (
        fake(clock, **SLOW) as (service, client),
        BatchedOpenAI(
            client,
            config=run_config(),
            max_wait=1.0,
            deadline=60.0,
            realtime_fallback=True,
            sdk_types=False,
        ) as openai,
    ):
        started = clock.monotonic()
        results = await within(
            clock, 3600, asyncio.gather(*(chat(openai, f"q{i}") for i in range(5)))
        )
        assert clock.monotonic() - started < 70.0
        await clock.sleep(120.0)
        (batch_id,) = service.batch_ids
        assert await batch_status(service, batch_id) == "cancelled"
        stats = openai.stats()
    for i, result in enumerate(results):
        assert isinstance(result, BatchedResult)
        assert text_of(result).endswith(f"to: q{i}")
        assert result.batch_id is None
    assert len({result.request_id for result in results}) == 5
    assert online_posts(service) == 5
    assert sum((await executed(service)).values()) == 0
    assert (stats.done, stats.failed, stats.fallbacks, stats.pending) == (5, 0, 5, 0)
    assert stats.duplicate_results == 0


async def test_a_late_batch_result_is_a_counted_duplicate_not_returned(
    clock: VirtualClock,
) -> None:
    """A batch result for a call already answered online is not returned: it is counted
    in duplicate_results with its usage tokens; the batch ran on for the call that waits."""
    async with (
        fake(clock, lines_per_second=0.02) as (service, client),
        BatchedOpenAI(
            client, config=run_config(), max_wait=1.0, realtime_fallback=True, sdk_types=False
        ) as openai,
    ):
        hurried = asyncio.ensure_future(chat(openai, "hurried", deadline=30.0))
        patient = asyncio.ensure_future(chat(openai, "patient"))
        first = await within(clock, 3600, hurried)
        assert openai.stats().duplicate_results == 0
        second = await within(clock, 3600, patient)
        stats = openai.stats()
    assert text_of(first).endswith("to: hurried")
    assert first.batch_id is None
    assert text_of(second).endswith("to: patient")
    assert second.batch_id == service.batch_ids[0]
    (batch_id,) = service.batch_ids
    batch = await service.get_batch(batch_id)
    assert batch.output_file_id is not None
    lines = [json.loads(line) for line in service.file_content(batch.output_file_id).splitlines()]
    (late,) = [line for line in lines if line["custom_id"] == first.custom_id]
    usage = late["response"]["body"]["usage"]
    assert stats.duplicate_results == 1
    assert (stats.duplicate_input_tokens, stats.duplicate_output_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert (stats.done, stats.fallbacks, stats.pending) == (2, 1, 0)
    assert online_posts(service) == 1


async def harness(
    client: BatchClient, folder: Path, patient: int
) -> tuple[list[BatchedResult], BatchedStats]:
    """Three calls that fall back after 30 s and ``patient`` calls that wait for the
    batch, with a journal folder; their answers and the client's counts."""
    async with BatchedOpenAI(
        client,
        journal=folder,
        config=run_config(),
        max_wait=1.0,
        realtime_fallback=True,
        sdk_types=False,
    ) as openai:
        calls = [chat(openai, f"hurried {i}", deadline=30.0) for i in range(3)]
        calls += [chat(openai, f"patient {i}") for i in range(patient)]
        results = await asyncio.gather(*calls)
        stats = openai.stats()
    return results, stats


@pytest.mark.parametrize("patient", [0, 2])
async def test_a_rerun_after_a_fallback_pays_for_nothing_twice(
    clock: VirtualClock, tmp_path: Path, patient: int
) -> None:
    """Run again with the same journal folder, the harness gets the online answers (and
    the batch's) from the journal: no new batch, no new online request."""
    async with fake(clock, lines_per_second=0.02) as (service, client):
        first, stats = await within(clock, 3600, harness(client, tmp_path, patient))
        assert stats.fallbacks == 3
        batches, online = len(service.batch_ids), online_posts(service)
        assert online == 3
        ran = await executed(service)
        second, again = await within(clock, 3600, harness(client, tmp_path, patient))
        assert len(service.batch_ids) == batches
        assert online_posts(service) == online
        assert await executed(service) == ran
    assert [(r.body, r.request_id) for r in second] == [(r.body, r.request_id) for r in first]
    assert (again.reused, again.fallbacks, again.flushes) == (3 + patient, 0, 0)


async def test_an_online_http_error_raises_like_a_failed_line(clock: VirtualClock) -> None:
    """An online answer with an HTTP error raises RequestFailedError with its status,
    code and request id, as a failed batch line does."""
    default = DefaultResponder(clock=clock)

    def responder(request: Any) -> Any:
        if "refuse me" in str(request.body):
            return 400, {"error": {"message": "no thanks", "type": "invalid", "code": "nope"}}
        return default(request)

    async with (
        fake(clock, responder=responder, **SLOW) as (_, client),
        BatchedOpenAI(
            client, config=run_config(), max_wait=1.0, deadline=30.0, realtime_fallback=True
        ) as openai,
    ):
        with pytest.raises(RequestFailedError) as caught:
            await within(clock, 600, chat(openai, "refuse me"))
        assert openai.stats().failed == 1
    assert (caught.value.status_code, caught.value.error_code) == (400, "nope")
    assert caught.value.message == "no thanks"
    assert caught.value.request_id
    assert caught.value.batch_id is None


async def test_an_online_server_error_is_retried_as_the_client_retries(
    clock: VirtualClock,
) -> None:
    """A 500 from the online endpoint is retried by the client's retry policy; the
    call gets the answer of the retry."""
    async with (
        fake(clock, **SLOW) as (service, client),
        BatchedOpenAI(
            client,
            config=run_config(),
            max_wait=1.0,
            deadline=30.0,
            realtime_fallback=True,
            sdk_types=False,
        ) as openai,
    ):
        service.faults.add(Fault.http(500, method="POST", path="/chat/completions"))
        result = await within(clock, 600, chat(openai, "again"))
    assert text_of(result).endswith("to: again")
    assert len(service.faults.fired) == 1
    assert online_posts(service) == 2


async def test_a_queued_call_past_its_deadline_goes_online_without_a_batch(
    clock: VirtualClock,
) -> None:
    """A call still queued when its deadline passes is taken out of its group and
    answered online: it never goes into a batch."""
    async with (
        fake(clock) as (service, client),
        BatchedOpenAI(
            client, config=run_config(), max_wait=3600.0, realtime_fallback=True, sdk_types=False
        ) as openai,
    ):
        result = await within(clock, 600, chat(openai, "now", deadline=10.0))
        assert openai.stats().queued == 0
    assert text_of(result).endswith("to: now")
    assert service.batch_ids == []


async def test_a_request_whose_batch_expired_is_answered_online(clock: VirtualClock) -> None:
    """With realtime_fallback, a request whose batches expired in every round is sent
    online rather than raising BatchEndedError."""
    async with (
        fake(clock, lines_per_second=0.001, completion_window_seconds=60.0) as (service, client),
        BatchedOpenAI(
            client, config=run_config(max_rounds=1), realtime_fallback=True, sdk_types=False
        ) as openai,
    ):
        result = await within(clock, 3600, chat(openai, "too slow"))
        stats = openai.stats()
    assert text_of(result).endswith("to: too slow")
    assert result.batch_id is None
    assert all([await batch_status(service, b) == "expired" for b in service.batch_ids])
    assert (stats.done, stats.fallbacks, stats.duplicate_results) == (1, 1, 0)


async def test_a_request_whose_batch_was_cancelled_is_answered_online(
    clock: VirtualClock,
) -> None:
    """A batch cancelled on the server (by someone else) ends its requests with
    batch_cancelled (no retry round left); with realtime_fallback each is answered
    online, once."""
    async with (
        fake(clock, **SLOW) as (service, client),
        BatchedOpenAI(
            client, config=run_config(max_rounds=0), realtime_fallback=True, sdk_types=False
        ) as openai,
    ):
        tasks = [asyncio.ensure_future(chat(openai, f"q{i}")) for i in range(3)]
        await asyncio.sleep(0)
        await openai.flush()
        while not service.batch_ids:
            await clock.sleep(1.0)
        await clock.sleep(30.0)
        await client.cancel_batch(service.batch_ids[0])
        results = await within(clock, 3600, asyncio.gather(*tasks))
        stats = openai.stats()
    for i, result in enumerate(results):
        assert text_of(result).endswith(f"to: q{i}")
        assert result.batch_id is None
    assert await batch_status(service, service.batch_ids[0]) == "cancelled"
    assert (stats.done, stats.fallbacks) == (3, 3)
    assert online_posts(service) == 3


async def test_without_fallback_an_expired_deadline_still_raises(clock: VirtualClock) -> None:
    """realtime_fallback=False on the call overrides the client's: the deadline raises
    BatchedTimeoutError and nothing is sent online."""
    async with (
        fake(clock, **SLOW) as (service, client),
        BatchedOpenAI(
            client, config=run_config(), max_wait=1.0, deadline=30.0, realtime_fallback=True
        ) as openai,
    ):
        with pytest.raises(BatchedTimeoutError):
            await within(clock, 600, chat(openai, "strict", realtime_fallback=False))
        await openai.aclose(cancel=True)
    assert online_posts(service) == 0


async def test_a_fallback_answer_is_the_sdk_type(clock: VirtualClock) -> None:
    """With the openai package, an online answer is the SDK's own type too."""
    from openai.types.chat import ChatCompletion

    async with (
        fake(clock, **SLOW) as (_, client),
        BatchedOpenAI(
            client, config=run_config(), max_wait=1.0, deadline=30.0, realtime_fallback=True
        ) as openai,
    ):
        completion = await within(clock, 600, chat(openai, "typed"))
    assert isinstance(completion, ChatCompletion)
    assert completion.choices[0].message.content.endswith("to: typed")  # type: ignore[union-attr]


async def test_a_caller_cancelled_during_its_online_request_leaves_nothing(
    clock: VirtualClock,
) -> None:
    """A caller cancelled while its online request is on its way holds nothing
    afterwards, and closing the client does not hang."""
    async with (
        fake(clock, **SLOW) as (service, client),
        BatchedOpenAI(
            client, config=run_config(), max_wait=1.0, deadline=10.0, realtime_fallback=True
        ) as openai,
    ):
        service.faults.add(Fault.slow(20.0, method="POST", path="/chat/completions"))
        task = asyncio.ensure_future(chat(openai, "gone"))
        await clock.sleep(15.0)
        assert openai.stats().online == 1
        task.cancel()
        await asyncio.sleep(0)
        stats = openai.stats()
        assert (stats.online, stats.pending, stats.cancelled) == (0, 0, 1)
        await within(clock, 600, openai.aclose())
    assert task.cancelled()
