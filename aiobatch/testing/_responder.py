"""What the fake batch service answers for each request line.

A :data:`Responder` turns one input line into ``(status_code, body)``; it may be a plain
function or a coroutine function. :class:`DefaultResponder` fakes the usual endpoints
with realistic shapes, deterministically: the same line always gets the same answer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any

from .._clock import Clock
from .._models import BatchRequest
from ._validate import LEGACY_ENDPOINTS
from ._wire import error_envelope, stable_hex

__all__ = [
    "DefaultResponder",
    "Responder",
    "ResponderResult",
    "current_line_time",
    "estimate_tokens",
]

#: What a responder returns: the HTTP status of the sub-request and its JSON body.
ResponderResult = tuple[int, Any]

#: Answers one line of a batch (sync or async). A status of 2xx puts the line in the
#: output file; anything else puts it in the error file.
Responder = Callable[[BatchRequest], ResponderResult | Awaitable[ResponderResult]]


_LINE_TIME: ContextVar[float | None] = ContextVar("aiobatch_fake_line_time", default=None)


def current_line_time() -> float | None:
    """The simulated time at which the line being answered finished processing.

    The fake service sets it while it calls a responder, so answers can carry
    timestamps that do not depend on when the batch happened to be observed.

    Returns:
        Unix seconds on the service clock, or None outside a responder call.
    """
    return _LINE_TIME.get()


def _text_chars(value: Any, *, in_list: bool = False) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        return sum(_text_chars(v) for k, v in value.items() if k != "model")
    if isinstance(value, list | tuple):
        return sum(_text_chars(v, in_list=True) for v in value)
    if in_list and isinstance(value, int) and not isinstance(value, bool):
        return 4  # a pre-tokenised input: one token per integer
    return 0


def estimate_tokens(body: Any) -> int:
    """Estimate the prompt tokens of a request body, the way the fake service counts them.

    The estimate is one token per four characters (rounded up, at least 1) of every
    string value in the body (keys do not count) except ``model``, plus one token per integer
    inside a list (pre-tokenised inputs). Numbers and booleans outside lists (such as
    ``max_tokens``) do not count. It is used for ``usage`` in the default responses and
    for the enqueued-token limit (``token_limit_exceeded``).

    Args:
        body: the ``body`` of an input line.

    Returns:
        The estimated number of tokens, at least 1.
    """
    return max(1, math.ceil(_text_chars(body) / 4))


def _text_of(value: Any) -> str:
    """The first text found in a message content, prompt or input."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        for key in ("text", "content", "input"):
            if key in value:
                found = _text_of(value[key])
                if found:
                    return found
        return ""
    if isinstance(value, list | tuple):
        for item in reversed(value):
            found = _text_of(item)
            if found:
                return found
    return ""


def _missing(param: str) -> tuple[int, Any]:
    return 400, error_envelope(
        f"Missing required parameter: '{param}'.",
        param=param,
        code="missing_required_parameter",
    )


def _cap(body: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


class DefaultResponder:
    """A deterministic fake of the OpenAI endpoints a batch can call.

    Supports ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
    ``/v1/responses`` and ``/v1/moderations``. Bodies have the real shapes (ids,
    ``model``, ``choices``/``output``/``data``, ``usage``); the reply text and the ids
    are derived from a hash of the line, so the same line always gets the same answer.
    Prompt tokens come from :func:`estimate_tokens`; completion tokens are the estimate
    of the reply text, capped by ``max_tokens`` / ``max_completion_tokens`` /
    ``max_output_tokens`` (then the reply is cut and marked as stopped by length). A line
    missing its endpoint's required parameter (``messages``, ``prompt``, ``input``) gets
    a 400 like OpenAI's; other endpoints get a 400 saying the fake does not simulate them.

    ``created`` is the time the line finished processing (:func:`current_line_time`),
    or the clock's time when called outside the service (0 without a clock).

    Args:
        clock: supplies ``created`` timestamps outside the service.
        embedding_dimensions: length of fake embeddings when the line gives no
            ``dimensions``.
    """

    def __init__(self, *, clock: Clock | None = None, embedding_dimensions: int = 8) -> None:
        self._clock = clock
        self._dimensions = embedding_dimensions
        self._routes: dict[str, Callable[[BatchRequest, str], tuple[int, Any]]] = {
            "/v1/chat/completions": self._chat,
            "/v1/completions": self._completions,
            "/v1/embeddings": self._embeddings,
            "/v1/responses": self._responses,
            "/v1/moderations": self._moderations,
            "/v1/messages": self._messages,
        }

    def __call__(self, request: BatchRequest) -> ResponderResult:
        """Answer one request line.

        Args:
            request: the input line.

        Returns:
            ``(status_code, body)``.
        """
        # Azure's dated versions name the endpoint without /v1 (``/chat/completions``).
        route = self._routes.get(request.url) or self._routes.get(
            LEGACY_ENDPOINTS.get(request.url, "")
        )
        if route is None:
            return 400, error_envelope(
                f"The fake batch service does not simulate {request.url}; "
                "pass a responder= to FakeBatchService to answer it.",
                param="url",
                code="unsupported_endpoint",
            )
        digest = hashlib.sha256(
            json.dumps([request.custom_id, request.body], sort_keys=True, default=str).encode()
        ).hexdigest()
        return route(request, digest)

    def _created(self) -> int:
        when = _LINE_TIME.get()
        if when is None:
            when = self._clock.now() if self._clock is not None else 0.0
        return int(when)

    @staticmethod
    def _reply(digest: str, prompt: str, cap: int | None) -> tuple[str, int, bool]:
        snippet = " ".join(prompt.split())[:48]
        text = f"Fake reply {digest[:8]} to: {snippet}" if snippet else f"Fake reply {digest[:8]}."
        tokens = estimate_tokens(text)
        if cap is not None and tokens > cap:
            return text[: cap * 4], cap, True
        return text, tokens, False

    def _chat(self, request: BatchRequest, digest: str) -> tuple[int, Any]:
        body = request.body
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _missing("messages")
        prompt_tokens = estimate_tokens(messages)
        cap = _cap(body, "max_completion_tokens", "max_tokens")
        n = body.get("n", 1)
        n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
        choices = []
        completion_tokens = 0
        user = [m for m in messages if isinstance(m, Mapping) and m.get("role") == "user"]
        prompt = _text_of(user[-1].get("content")) if user else _text_of(messages)
        for index in range(n):
            text, tokens, cut = self._reply(stable_hex(digest, index), prompt, cap)
            completion_tokens += tokens
            choices.append(
                {
                    "index": index,
                    "message": {
                        "role": "assistant",
                        "content": text,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "length" if cut else "stop",
                }
            )
        return 200, {
            "id": f"chatcmpl-{digest[:24]}",
            "object": "chat.completion",
            "created": self._created(),
            "model": body.get("model"),
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
            },
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }

    def _messages(self, request: BatchRequest, digest: str) -> tuple[int, Any]:
        """Anthropic's Messages API: a Message with one text block (an Anthropic
        error envelope when ``messages`` or ``max_tokens`` is missing)."""
        body = request.body
        messages = body.get("messages")
        cap = body.get("max_tokens")
        if not isinstance(messages, list) or not messages or not isinstance(cap, int):
            missing = "messages" if not isinstance(messages, list) or not messages else "max_tokens"
            return 400, {
                "type": "error",
                "error": {"type": "invalid_request_error", "message": f"{missing}: Field required"},
            }
        user = [m for m in messages if isinstance(m, Mapping) and m.get("role") == "user"]
        prompt = _text_of(user[-1].get("content")) if user else _text_of(messages)
        text, tokens, cut = self._reply(digest, prompt, cap)
        return 200, {
            "id": f"msg_{digest[:24]}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model"),
            "content": [{"type": "text", "text": text}],
            "stop_reason": "max_tokens" if cut else "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": estimate_tokens(messages), "output_tokens": tokens},
        }

    def _completions(self, request: BatchRequest, digest: str) -> tuple[int, Any]:
        body = request.body
        if "prompt" not in body:
            return _missing("prompt")
        prompt_tokens = estimate_tokens(body.get("prompt"))
        text, tokens, cut = self._reply(
            digest, _text_of(body.get("prompt")), _cap(body, "max_tokens")
        )
        return 200, {
            "id": f"cmpl-{digest[:24]}",
            "object": "text_completion",
            "created": self._created(),
            "model": body.get("model"),
            "choices": [
                {
                    "text": text,
                    "index": 0,
                    "logprobs": None,
                    "finish_reason": "length" if cut else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": tokens,
                "total_tokens": prompt_tokens + tokens,
            },
        }

    def _embedding(self, item: Any, model: Any, dimensions: int, encoding: Any) -> Any:
        seed = json.dumps([model, item], sort_keys=True, default=str).encode()
        raw = hashlib.shake_256(seed).digest(4 * dimensions)
        values = [
            int.from_bytes(raw[i : i + 4], "big") / 2**31 - 1.0 for i in range(0, len(raw), 4)
        ]
        norm = math.sqrt(sum(v * v for v in values)) or 1.0
        vector = [round(v / norm, 6) for v in values]
        if encoding == "base64":
            return base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        return vector

    def _embeddings(self, request: BatchRequest, digest: str) -> tuple[int, Any]:
        body = request.body
        raw = body.get("input")
        if raw is None or raw == "" or raw == []:
            return _missing("input")
        if (
            isinstance(raw, list)
            and raw
            and all(isinstance(x, int) and not isinstance(x, bool) for x in raw)
        ):
            items: list[Any] = [raw]
        else:
            items = list(raw) if isinstance(raw, list) else [raw]
        dims = body.get("dimensions")
        dims = dims if isinstance(dims, int) and not isinstance(dims, bool) and dims > 0 else None
        dimensions = dims or self._dimensions
        tokens = estimate_tokens(items)
        data = [
            {
                "object": "embedding",
                "index": index,
                "embedding": self._embedding(
                    item, body.get("model"), dimensions, body.get("encoding_format")
                ),
            }
            for index, item in enumerate(items)
        ]
        return 200, {
            "object": "list",
            "data": data,
            "model": body.get("model"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def _responses(self, request: BatchRequest, digest: str) -> tuple[int, Any]:
        body = request.body
        prompt_source = [body.get("instructions"), body.get("input")]
        input_tokens = estimate_tokens(prompt_source)
        cap = _cap(body, "max_output_tokens")
        text, tokens, cut = self._reply(digest, _text_of(body.get("input")), cap)
        created = self._created()
        return 200, {
            "id": f"resp_{digest[:32]}",
            "object": "response",
            "created_at": created,
            "status": "incomplete" if cut else "completed",
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": body.get("model"),
            "output": [
                {
                    "type": "message",
                    "id": f"msg_{digest[32:64]}",
                    "status": "incomplete" if cut else "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ],
            "parallel_tool_calls": True,
            "temperature": body.get("temperature", 1.0),
            "tool_choice": "auto",
            "tools": [],
            "top_p": body.get("top_p", 1.0),
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input_tokens + tokens,
            },
            "metadata": body.get("metadata") or {},
        }

    def _moderations(self, request: BatchRequest, digest: str) -> tuple[int, Any]:
        body = request.body
        raw = body.get("input")
        if raw is None or raw == "" or raw == []:
            return _missing("input")
        items = raw if isinstance(raw, list) else [raw]
        categories = ("harassment", "hate", "self-harm", "sexual", "violence")
        results = []
        for index, _ in enumerate(items):
            h = stable_hex(digest, index, size=len(categories))
            scores = {
                name: round(int(h[2 * i : 2 * i + 2], 16) / 25_500, 6)
                for i, name in enumerate(categories)
            }
            results.append(
                {
                    "flagged": False,
                    "categories": dict.fromkeys(categories, False),
                    "category_scores": scores,
                }
            )
        return 200, {
            "id": f"modr-{digest[:24]}",
            "model": body.get("model") or "omni-moderation-latest",
            "results": results,
        }
