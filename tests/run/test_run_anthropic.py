"""The runner on Anthropic: the same input file as for OpenAI (lines for /v1/messages)
submitted with inline requests (planned -> creating -> open), shards cut at Anthropic's
limits, custom_ids checked by Anthropic's rule, a lost create found again without a
second batch, and results of the same shape as an OpenAI run's."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from aiobatch import (
    AnthropicProvider,
    BatchClient,
    BatchRun,
    Fleet,
    FleetConfig,
    RetryPolicy,
    RunConfig,
)
from aiobatch._models import BatchRequest
from aiobatch.errors import PreflightError
from aiobatch.testing import FakeBatchService, FakeConfig, Fault, VirtualClock

KEY = "sk-ant-run-0123456789"
TIMINGS = {"validation_seconds": 5.0, "lines_per_second": 1.0, "finalizing_seconds": 5.0}


def message_line(custom_id: str, text: str) -> dict[str, Any]:
    """One input line for Anthropic's Messages API, in the runner's usual shape."""
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/messages",
        "body": {
            "model": "claude-test",
            "max_tokens": 32,
            "messages": [{"role": "user", "content": text}],
        },
    }


def write(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


@asynccontextmanager
async def anthropic_env(
    clock: VirtualClock, **settings: Any
) -> AsyncIterator[tuple[FakeBatchService, BatchClient]]:
    """The fake in the anthropic dialect and an AnthropicProvider client on it, the clock
    auto-advancing."""
    config = FakeConfig(**{**TIMINGS, "request_log_size": None, **settings})
    service = FakeBatchService(clock=clock, config=config, dialect="anthropic", api_key=KEY)
    provider = AnthropicProvider(api_key=KEY, base_url="http://fake.anthropic")
    async with (
        BatchClient(
            provider=provider,
            transport=service.transport(),
            clock=clock,
            retry=RetryPolicy.for_testing(max_attempts=3),
        ) as client,
        clock.auto_advance(),
    ):
        yield service, client


async def test_run_submits_inline_and_gets_one_result_per_request(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """Three shards are created inline (no file is uploaded), each request ends once,
    successful, with Anthropic's message as the body."""
    source = write(tmp_path / "in.jsonl", [message_line(f"r-{i}", f"q {i}") for i in range(9)])
    async with anthropic_env(clock) as (service, client):
        run = BatchRun(
            client, source, journal=tmp_path / "run.journal", config=RunConfig(max_lines=3)
        )
        report = await run.run()
        got = [r async for r in run.results()]
    assert report.state == "done"
    assert len(service.batch_ids) == 3
    assert service.request_count("POST", "/files") == 0
    assert [r.custom_id for r in got] == [f"r-{i}" for i in range(9)]
    assert all(r.ok for r in got)
    assert all(r.result.body["type"] == "message" for r in got)  # type: ignore[union-attr]


async def test_a_lost_create_answer_is_found_again_not_sent_twice(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A create whose answer is lost (the batch was made) is adopted by its request count
    and creation time: one batch, every request once."""
    source = write(tmp_path / "in.jsonl", [message_line(f"r-{i}", f"q {i}") for i in range(4)])
    async with anthropic_env(clock) as (service, client):
        service.faults.add(Fault.drop(after=True, method="POST", path="/messages/batches"))
        run = BatchRun(client, source, journal=tmp_path / "run.journal")
        report = await run.run()
        got = [r async for r in run.results()]
    assert report.state == "done"
    assert len(service.batch_ids) == 1
    assert sorted(r.custom_id for r in got) == [f"r-{i}" for i in range(4)]
    assert all(r.ok for r in got)


async def test_a_create_lost_before_the_server_is_sent_again(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A create dropped before the server saw it is proved never made and sent again:
    one batch."""
    source = write(tmp_path / "in.jsonl", [message_line(f"r-{i}", f"q {i}") for i in range(4)])
    async with anthropic_env(clock) as (service, client):
        service.faults.add(Fault.drop(after=False, method="POST", path="/messages/batches"))
        service.faults.add(Fault.http(529, method="POST", path="/messages/batches"))
        run = BatchRun(client, source, journal=tmp_path / "run.journal")
        report = await run.run()
    assert report.state == "done"
    assert len(service.batch_ids) == 1


async def test_shards_of_one_size_take_turns_so_a_lost_create_is_not_mistaken(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """Two shards of the same request count: the first create is made but its answer
    lost, the second is dropped before the server; each shard ends with its own batch
    and every request's own result (a request count cannot tell two such shards apart
    unless they take turns)."""
    source = write(tmp_path / "in.jsonl", [message_line(f"r-{i}", f"q {i}") for i in range(6)])
    out = tmp_path / "out.jsonl"
    async with anthropic_env(clock) as (service, client):
        service.faults.add(Fault.drop(after=True, method="POST", path="/messages/batches"))
        service.faults.add(Fault.drop(after=False, method="POST", path="/messages/batches"))
        run = BatchRun(
            client,
            source,
            journal=tmp_path / "run.journal",
            output=out,
            config=RunConfig(max_lines=3),
        )
        report = await run.run()
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert report.state == "done"
    assert len(service.batch_ids) == 2
    assert [r["custom_id"] for r in results] == [f"r-{i}" for i in range(6)]
    assert all(f"q {r['custom_id'][2:]}" in json.dumps(r["response"]["body"]) for r in results)
    assert (report.succeeded, report.retried) == (6, 0)


async def test_custom_ids_are_checked_by_anthropics_rule(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A custom_id Anthropic would refuse fails preflight naming the line; nothing is sent."""
    lines = [message_line("ok-1", "a"), message_line("not ok", "b")]
    source = write(tmp_path / "in.jsonl", lines)
    async with anthropic_env(clock) as (service, client):
        run = BatchRun(client, source, journal=tmp_path / "run.journal")
        with pytest.raises(PreflightError) as caught:
            await run.run()
    assert "in.jsonl:2" in str(caught.value)
    assert "custom_id" in str(caught.value)
    assert service.batch_ids == []


async def test_same_input_gives_results_of_the_same_shape_as_openai(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """The same file through the OpenAI fake (as /v1/chat/completions) and the Anthropic
    fake gives output lines with the same keys, custom_ids and statuses."""
    anthropic_lines = [message_line(f"r-{i}", f"q {i}") for i in range(3)]
    openai_lines = [{**line, "url": "/v1/chat/completions"} for line in anthropic_lines]
    out_a, out_o = tmp_path / "a.out.jsonl", tmp_path / "o.out.jsonl"
    async with anthropic_env(clock) as (_service, client):
        source = write(tmp_path / "a.jsonl", anthropic_lines)
        await BatchRun(client, source, journal=tmp_path / "a.journal", output=out_a).run()
    service = FakeBatchService(clock=clock, config=FakeConfig(**TIMINGS))
    async with (
        BatchClient(
            api_key="sk-test", base_url="http://fake/v1", transport=service.transport(), clock=clock
        ) as client,
        clock.auto_advance(),
    ):
        source = write(tmp_path / "o.jsonl", openai_lines)
        await BatchRun(client, source, journal=tmp_path / "o.journal", output=out_o).run()
    a = [json.loads(x) for x in out_a.read_text().splitlines()]
    o = [json.loads(x) for x in out_o.read_text().splitlines()]
    assert [sorted(x) for x in a] == [sorted(x) for x in o]
    assert [x["custom_id"] for x in a] == [x["custom_id"] for x in o]
    assert [x["response"]["status_code"] for x in a] == [x["response"]["status_code"] for x in o]


async def test_the_fleet_sweeps_anthropics_list_across_pages(clock: VirtualClock) -> None:
    """250 Anthropic batches are tracked by list pages (paged with after_id), no
    retrieves, each to its end."""
    async with anthropic_env(clock) as (service, client):
        made = [
            await client.create_inline_batch(
                [
                    BatchRequest(
                        custom_id="a", url="/v1/messages", body=message_line("a", "q")["body"]
                    )
                ]
            )
            for _ in range(250)
        ]
        config = FleetConfig(max_concurrency=4, jitter=0.0, seed=0)
        async with Fleet(client, config=config) as fleet:
            fleet.add_many(made)
            outcomes = await fleet.wait_all()
    assert all(done.finished for done in outcomes.values())
    assert fleet.stats.retrieves == 0
    assert fleet.stats.list_pages > 1
    paged = [r for r in service.requests if r.method == "GET" and "after_id" in r.params]
    assert paged
