"""Any other OpenAI-compatible server: :class:`CompatibleProvider`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import ClassVar

import attrs

from .._secret import Secret, _Headers, _to_secret
from ..errors import ConfigurationError
from ._base import _NO_QUERY, Limits, Quirks, _env, _env_key, _join, _limits, _strip_slash
from ._openai import OPENAI_LIMITS

__all__ = ["CompatibleProvider"]


@attrs.frozen(kw_only=True)
class CompatibleProvider:
    """Any other OpenAI-compatible server (a self-hosted gateway, a vLLM-style server):
    a base URL and, when the server wants one, a bearer key.

    The converter is tolerant of what such servers leave out (optional fields, the
    ``object`` tag, null counts) and of their timestamps and status spellings.

    Args:
        base_url: the API root, such as ``http://localhost:8000/v1`` (required).
        api_key: sent as ``Authorization: Bearer``; None sends none.
        limits: how big one batch may be (default OpenAI's).

    Raises:
        ConfigurationError: no base URL.
    """

    name: ClassVar[str] = "compatible"
    quirks: ClassVar[Quirks] = Quirks()

    base_url: str = attrs.field(converter=_strip_slash)
    api_key: Secret | None = attrs.field(default=None, converter=_to_secret)
    limits: Limits = OPENAI_LIMITS

    def __attrs_post_init__(self) -> None:
        if not re.match(r"https?://[^/]", self.base_url):
            raise ConfigurationError(
                "an OpenAI-compatible server needs its base URL, such as "
                f"http://localhost:8000/v1 (pass base_url, or set OPENAI_BASE_URL); got "
                f"{self.base_url!r}"
            )

    @classmethod
    def from_env(
        cls,
        *,
        base_url: str | None = None,
        api_key: str | Secret | None = None,
        limits: Limits | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> CompatibleProvider:
        """Build a provider from ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY`` (optional)
        for what is not given."""
        env = _env(environ)
        return cls(
            base_url=base_url or env.get("OPENAI_BASE_URL") or "",
            api_key=api_key if api_key is not None else _env_key(env, "OPENAI_API_KEY"),
            limits=_limits(limits, OPENAI_LIMITS),
        )

    @property
    def secrets(self) -> tuple[Secret, ...]:
        """The API key, when there is one."""
        return (self.api_key,) if self.api_key else ()

    def url(self, path: str) -> str:
        """The absolute URL of an API path such as ``/batches/batch_1``."""
        return _join(self.base_url, path)

    def params(self) -> Mapping[str, str]:
        """No query parameters."""
        return _NO_QUERY

    def headers(self) -> Mapping[str, str]:
        """``authorization: Bearer``, when there is a key."""
        headers = _Headers()
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key.reveal()}"
        return headers
