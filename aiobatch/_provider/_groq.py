"""Groq's OpenAI-compatible Batch API: :class:`GroqProvider`.

Groq serves OpenAI's ``/files`` and ``/batches`` under ``https://api.groq.com/openai/v1``
with a bearer key (``GROQ_API_KEY``). Its differences, from its official SDK
(``groq-python``: ``types/batch_create_params.py``): a ``completion_window`` of any
duration from ``24h`` to ``7d`` (``RunConfig(completion_window="7d")``), an input file of
up to 100 MB, ``/v1/chat/completions`` lines.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import attrs

from .._secret import Secret
from ._base import Limits, _env, _env_key, _limits, _strip_slash
from ._compatible import CompatibleProvider

__all__ = ["GROQ_BASE_URL", "GROQ_LIMITS", "GROQ_MAX_COMPLETION_WINDOW", "GroqProvider"]

#: Groq's OpenAI-compatible API root.
GROQ_BASE_URL = "https://api.groq.com/openai/v1"

#: Groq's limits: an input file of up to 100 MB (lines as OpenAI's).
GROQ_LIMITS = Limits(max_lines=50_000, max_bytes=100 * 1024 * 1024)

#: The longest completion window Groq takes (durations from 24h to 7d).
GROQ_MAX_COMPLETION_WINDOW = "7d"


@attrs.frozen(kw_only=True)
class GroqProvider(CompatibleProvider):
    """Groq: ``Authorization: Bearer``, ``{base_url}/batches``, windows up to ``7d``.

    Args:
        base_url: the API root (default ``https://api.groq.com/openai/v1``).
        api_key: the Groq key.
        limits: how big one batch may be (default 50,000 lines, 100 MB).
    """

    name: ClassVar[str] = "groq"

    base_url: str = attrs.field(default=GROQ_BASE_URL, converter=_strip_slash)
    limits: Limits = GROQ_LIMITS

    @classmethod
    def from_env(
        cls,
        *,
        base_url: str | None = None,
        api_key: str | Secret | None = None,
        limits: Limits | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> GroqProvider:
        """Build a provider from ``GROQ_API_KEY`` (and ``GROQ_BASE_URL``) for what is
        not given."""
        env = _env(environ)
        return cls(
            base_url=base_url or env.get("GROQ_BASE_URL") or GROQ_BASE_URL,
            api_key=api_key if api_key is not None else _env_key(env, "GROQ_API_KEY"),
            limits=_limits(limits, GROQ_LIMITS),
        )
