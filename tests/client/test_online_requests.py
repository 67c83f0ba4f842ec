"""BatchClient.send_online: one request to an ordinary endpoint, answered by the fake
service's online endpoints with the same responder its batches use."""

from __future__ import annotations

from typing import Any

import pytest

from aiobatch.errors import BadRequestError
from aiobatch.testing import VirtualClock, fake_client


@pytest.mark.parametrize(
    ("url", "body", "kind"),
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}]},
            "chat.completion",
        ),
        ("/v1/completions", {"prompt": "hi"}, "text_completion"),
        ("/v1/responses", {"input": "hi"}, "response"),
        ("/v1/embeddings", {"input": "hi"}, "list"),
        ("/v1/moderations", {"input": "hi"}, None),
    ],
)
async def test_an_online_request_is_answered_by_the_responder(
    clock: VirtualClock, url: str, body: dict[str, Any], kind: str | None
) -> None:
    """Each batchable endpoint answers one online POST with the responder's body."""
    async with fake_client(clock=clock) as fake:
        answer = await fake.client.send_online(url, {"model": "gpt-4o-mini", **body})
    assert answer.status_code == 200
    assert answer.request_id
    if kind is not None:
        assert answer.body["object"] == kind
    else:
        assert answer.body["results"]
    assert [(r.method, r.path) for r in fake.service.requests][-1] == ("POST", url[3:])


async def test_an_online_request_the_responder_refuses_raises_its_status(
    clock: VirtualClock,
) -> None:
    """A body the responder answers with a 400 raises BadRequestError naming the param."""
    async with fake_client(clock=clock) as fake:
        with pytest.raises(BadRequestError) as caught:
            await fake.client.send_online("/v1/chat/completions", {"model": "gpt-4o-mini"})
    assert caught.value.error_param == "messages"
