"""Helpers that aiobatch.testing gives users for their own tests."""

from __future__ import annotations

import json

from aiobatch import BatchClient
from aiobatch.testing import FakeBatchService, VirtualClock, chat_requests


def test_chat_requests_builds_valid_unique_lines() -> None:
    """chat_requests(n) gives n newline-terminated requests with distinct ids and bodies."""
    data = chat_requests(3, prefix="x", model="m", endpoint="/v1/chat/completions")
    lines = data.split(b"\n")
    assert lines[-1] == b""
    rows = [json.loads(line) for line in lines[:-1]]
    assert [r["custom_id"] for r in rows] == ["x-0", "x-1", "x-2"]
    assert {r["url"] for r in rows} == {"/v1/chat/completions"}
    assert {r["body"]["model"] for r in rows} == {"m"}
    assert len({json.dumps(r["body"]) for r in rows}) == 3
    assert chat_requests(0) == b""


async def test_chat_requests_pass_the_fakes_validation() -> None:
    """A file from chat_requests is a batch the fake service completes without errors."""
    clock = VirtualClock()
    service = FakeBatchService(clock=clock)
    async with BatchClient(
        api_key="sk-t", base_url="http://fake/v1", transport=service.transport(), clock=clock
    ) as client:
        uploaded = await client.upload_file(chat_requests(5))
        batch = await client.create_batch(uploaded.id, "/v1/chat/completions")
        async with clock.auto_advance():
            done = await client.wait(batch, poll_interval=1.0)
    assert done.status.value == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (5, 0)
