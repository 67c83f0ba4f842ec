"""Anthropic's Message Batches dialect: :class:`AnthropicProvider`.

Anthropic's batches are not OpenAI-shaped (reference/batch-api.md §5): requests go
inline in the create call (no file upload), and every path lives under
``/v1/messages/batches``. The provider maps the client's OpenAI-style paths onto them
(its *path rules*); the bodies are the converter's business (``_convert_anthropic``).

==========================================  ==========================================
the client asks for                         sent to
==========================================  ==========================================
``/batches`` (create, list)                 ``/v1/messages/batches``
``/batches/{id}``, ``/batches/{id}/cancel``  ``/v1/messages/batches/{id}[/cancel]``
``/files/{id}/content`` (a result file)     ``/v1/messages/batches/{id}/results``
==========================================  ==========================================

A finished Anthropic batch's results (one JSONL file, successes and failures mixed)
are read as its ``output_file_id``, which the converter sets to the batch id once the
batch has a ``results_url``. Other ``/files`` paths do not exist on Anthropic.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import ClassVar

import attrs

from .._secret import Secret, _Headers, _to_secret
from ..errors import UnsupportedError
from ._base import _NO_QUERY, Limits, Quirks, _env_key, _join, _optional_text, _strip_slash

__all__ = [
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_CUSTOM_ID",
    "ANTHROPIC_LIMITS",
    "ANTHROPIC_VERSION",
    "AnthropicProvider",
]

#: Anthropic's API root (the paths carry ``/v1``, as the official SDK's do).
ANTHROPIC_BASE_URL = "https://api.anthropic.com"

#: The ``anthropic-version`` header the official SDK sends.
ANTHROPIC_VERSION = "2023-06-01"

#: What a ``custom_id`` may be on Anthropic.
ANTHROPIC_CUSTOM_ID = r"^[a-zA-Z0-9_-]{1,64}$"

#: Anthropic's limits: 100,000 requests or 256 MB per batch (reference/batch-api.md §5).
ANTHROPIC_LIMITS = Limits(
    max_lines=100_000,
    max_bytes=256 * 1024 * 1024,
    max_embedding_inputs=100_000,
    custom_id_pattern=ANTHROPIC_CUSTOM_ID,
)

_BATCHES = "/v1/messages/batches"


@attrs.frozen(kw_only=True)
class AnthropicProvider:
    """Anthropic's Message Batches: ``x-api-key`` and ``anthropic-version`` headers,
    ``{base_url}/v1/messages/batches``, requests inline in the create.

    The constructor reads no environment; :meth:`from_env` does.

    Args:
        api_key: the API key (a str is wrapped in a :class:`Secret`); None sends no
            ``x-api-key`` (for local servers that need none).
        base_url: the API root, without ``/v1`` (``https://api.anthropic.com``).
        version: the ``anthropic-version`` header.
        limits: how big one batch may be (default Anthropic's 100,000 requests, 256 MB).
    """

    name: ClassVar[str] = "anthropic"
    quirks: ClassVar[Quirks] = Quirks(
        submission="inline", list_cursor_param="after_id", keeps_metadata=False
    )

    api_key: Secret | None = attrs.field(default=None, converter=_to_secret)
    base_url: str = attrs.field(default=ANTHROPIC_BASE_URL, converter=_strip_slash)
    version: str = attrs.field(default=ANTHROPIC_VERSION, converter=_optional_text)
    limits: Limits = ANTHROPIC_LIMITS

    @property
    def secrets(self) -> tuple[Secret, ...]:
        """The API key, when there is one."""
        return (self.api_key,) if self.api_key else ()

    def params(self) -> Mapping[str, str]:
        """No query parameters."""
        return _NO_QUERY

    @classmethod
    def from_env(
        cls,
        *,
        api_key: str | Secret | None = None,
        base_url: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> AnthropicProvider:
        """Build a provider from ``ANTHROPIC_API_KEY`` and ``ANTHROPIC_BASE_URL`` (as
        the official SDK reads them) for what is not given."""
        env = os.environ if environ is None else environ
        return cls(
            api_key=api_key if api_key is not None else _env_key(env, "ANTHROPIC_API_KEY"),
            base_url=base_url or env.get("ANTHROPIC_BASE_URL") or ANTHROPIC_BASE_URL,
        )

    def url(self, path: str) -> str:
        """The absolute URL of a client path, by the path rules in the module notes.

        Raises:
            UnsupportedError: a path Anthropic has no counterpart for (file uploads).
        """
        parts = [p for p in path.split("/") if p]
        if parts and parts[0] == "batches":
            return _join(self.base_url, "/".join([_BATCHES, *parts[1:]]))
        if len(parts) == 3 and parts[0] == "files" and parts[2] == "content":
            return _join(self.base_url, f"{_BATCHES}/{parts[1]}/results")
        raise UnsupportedError(
            f"Anthropic's Message Batches have no {path} endpoint: requests go inline in "
            "the create (BatchClient.create_inline_batch), results are read with "
            "iter_results(batch.output_file_id)"
        )

    def headers(self) -> Mapping[str, str]:
        """``x-api-key`` and ``anthropic-version``, made afresh on each call (masked
        in the mapping's repr)."""
        headers = _Headers()
        if self.api_key:
            headers["x-api-key"] = self.api_key.reveal()
        if self.version:
            headers["anthropic-version"] = self.version
        return headers
