"""OpenAI's own dialect: :class:`OpenAIProvider`, its base URL and its limits."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import ClassVar

import attrs

from .._secret import Secret, _Headers, _to_secret
from ._base import _NO_QUERY, Limits, Quirks, _env_key, _join, _optional_text, _strip_slash

__all__ = ["DEFAULT_BASE_URL", "OPENAI_LIMITS", "OpenAIProvider"]

#: OpenAI's API root.
DEFAULT_BASE_URL = "https://api.openai.com/v1"

#: OpenAI's limits (reference/batch-api.md §1.10).
OPENAI_LIMITS = Limits(max_lines=50_000, max_bytes=200 * 1024 * 1024)


@attrs.frozen(kw_only=True)
class OpenAIProvider:
    """OpenAI's dialect: base URL, ``Authorization: Bearer`` and the optional
    ``OpenAI-Organization`` / ``OpenAI-Project`` headers.

    The constructor reads no environment; :meth:`from_env` does.

    Args:
        api_key: the API key (a str is wrapped in a :class:`Secret`; whitespace around
            it is dropped); None sends no ``Authorization`` header (for local servers
            that need none).
        base_url: the API root, e.g. ``https://api.openai.com/v1``.
        organization: sent as ``OpenAI-Organization`` when set.
        project: sent as ``OpenAI-Project`` when set.
        limits: how big one batch may be (default OpenAI's 50,000 lines, 200 MB).
    """

    name: ClassVar[str] = "openai"
    quirks: ClassVar[Quirks] = Quirks()

    api_key: Secret | None = attrs.field(default=None, converter=_to_secret)
    base_url: str = attrs.field(default=DEFAULT_BASE_URL, converter=_strip_slash)
    organization: str | None = attrs.field(default=None, converter=_optional_text)
    project: str | None = attrs.field(default=None, converter=_optional_text)
    limits: Limits = OPENAI_LIMITS

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
        organization: str | None = None,
        project: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> OpenAIProvider:
        """Build a provider, taking what is not given from the environment.

        ``OPENAI_API_KEY``, ``OPENAI_BASE_URL``, ``OPENAI_ORG_ID`` and
        ``OPENAI_PROJECT_ID``, as the official SDK reads them.

        Args:
            api_key: the key; default ``$OPENAI_API_KEY``.
            base_url: the API root; default ``$OPENAI_BASE_URL`` or OpenAI's.
            organization: default ``$OPENAI_ORG_ID``.
            project: default ``$OPENAI_PROJECT_ID``.
            environ: the environment to read (default ``os.environ``).
        """
        env = os.environ if environ is None else environ
        return cls(
            api_key=api_key if api_key is not None else _env_key(env, "OPENAI_API_KEY"),
            base_url=base_url or env.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
            organization=organization or env.get("OPENAI_ORG_ID") or None,
            project=project or env.get("OPENAI_PROJECT_ID") or None,
        )

    def url(self, path: str) -> str:
        """The absolute URL of an API path such as ``/batches/batch_1``."""
        return _join(self.base_url, path)

    def headers(self) -> Mapping[str, str]:
        """The headers every request carries (lower-case names), made afresh on each call.

        The provider keeps no revealed key (so ``attrs.asdict(provider)`` shows none);
        the mapping's repr masks every value.
        """
        headers = _Headers()
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key.reveal()}"
        if self.organization:
            headers["openai-organization"] = self.organization
        if self.project:
            headers["openai-project"] = self.project
        return headers
