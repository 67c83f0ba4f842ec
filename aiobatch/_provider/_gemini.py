"""Google Gemini's OpenAI-compatible Batch API: :class:`GeminiProvider`.

The Gemini API serves the OpenAI SDK (its *OpenAI compatibility* layer) at
``https://generativelanguage.googleapis.com/v1beta/openai`` with a bearer key
(``GEMINI_API_KEY``), and since September 2025 its Batch API through the same layer:
``files.create(purpose="batch")``, then ``batches.create`` (Google's developer blog,
"Gemini Batch API now supports Embeddings and OpenAI Compatibility"). No limit or quirk
beyond OpenAI's is claimed here: lines name Gemini models.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import attrs

from .._secret import Secret
from ._base import Limits, _env, _env_key, _limits, _strip_slash
from ._compatible import CompatibleProvider
from ._openai import OPENAI_LIMITS

__all__ = ["GEMINI_BASE_URL", "GeminiProvider"]

#: The Gemini API's OpenAI-compatible root.
GEMINI_BASE_URL = "https://generativelanguage.googleapis.com/v1beta/openai"


@attrs.frozen(kw_only=True)
class GeminiProvider(CompatibleProvider):
    """Gemini through its OpenAI compatibility layer: ``Authorization: Bearer``,
    ``{base_url}/files`` and ``{base_url}/batches``.

    Args:
        base_url: the API root (default
            ``https://generativelanguage.googleapis.com/v1beta/openai``).
        api_key: the Gemini API key.
        limits: how big one batch may be (default OpenAI's).
    """

    name: ClassVar[str] = "gemini"

    base_url: str = attrs.field(default=GEMINI_BASE_URL, converter=_strip_slash)
    limits: Limits = OPENAI_LIMITS

    @classmethod
    def from_env(
        cls,
        *,
        base_url: str | None = None,
        api_key: str | Secret | None = None,
        limits: Limits | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> GeminiProvider:
        """Build a provider from ``GEMINI_API_KEY`` (and ``GEMINI_BASE_URL``) for what
        is not given."""
        env = _env(environ)
        return cls(
            base_url=base_url or env.get("GEMINI_BASE_URL") or GEMINI_BASE_URL,
            api_key=api_key if api_key is not None else _env_key(env, "GEMINI_API_KEY"),
            limits=_limits(limits, OPENAI_LIMITS),
        )
