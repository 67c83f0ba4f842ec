"""Request files for tests and demos: valid batch input JSONL, built in one call."""

from __future__ import annotations

from .._convert import encode_request_line
from .._models import BatchRequest

__all__ = ["chat_requests"]


def chat_requests(
    count: int,
    *,
    prefix: str = "req",
    model: str = "gpt-4o-mini",
    endpoint: str = "/v1/chat/completions",
) -> bytes:
    """A batch input file of ``count`` chat-completion requests, as JSONL bytes.

    Line ``i`` has ``custom_id`` ``f"{prefix}-{i}"`` and asks ``model`` a short question
    that differs per line, so the fake's deterministic answers differ too.

    Args:
        count: how many lines.
        prefix: the start of every ``custom_id``.
        model: the ``body.model`` of every line.
        endpoint: the ``url`` of every line (the batch's endpoint).

    Returns:
        The file's bytes, one request per line, each line ending in a newline.
    """
    lines = [
        encode_request_line(
            BatchRequest(
                custom_id=f"{prefix}-{i}",
                url=endpoint,
                body={"model": model, "messages": [{"role": "user", "content": f"q{i}"}]},
            )
        )
        + b"\n"
        for i in range(count)
    ]
    return b"".join(lines)
