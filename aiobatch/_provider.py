"""Providers (dialects): where to send requests and how to authenticate. Pure data.

A provider turns an API path (``/batches``) into a URL and says which headers every
request carries. It does no IO and holds no connection. The API key lives in a
:class:`Secret`, which never shows its value in a repr or str, so neither a provider
nor anything that holds one can leak it into a log or a traceback.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from typing import Any, overload

import attrs

__all__ = ["DEFAULT_BASE_URL", "OpenAIProvider", "Secret"]

#: OpenAI's API root.
DEFAULT_BASE_URL = "https://api.openai.com/v1"


class Secret:
    """A string that is never shown: repr and str are masked.

    Args:
        value: the secret, such as an API key.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"a Secret holds a str, not {type(value).__name__}")
        self._value = value

    def reveal(self) -> str:
        """The secret value itself (put it in a header, never in a message)."""
        return self._value

    @overload
    def redact(self, text: str) -> str: ...

    @overload
    def redact(self, text: bytes) -> bytes: ...

    def redact(self, text: str | bytes) -> str | bytes:
        """``text`` with every occurrence of the secret replaced by ``***``.

        For text built from what a server sent (an error body, a body that failed to
        decode), which may echo the key back. A value shorter than 4 characters is not a
        real secret and is left alone: masking it would garble ordinary text.
        """
        value = self._value
        if len(value) < _MIN_REDACTED:
            return text
        if isinstance(text, bytes):
            needle = value.encode()
            return text.replace(needle, b"***") if needle in text else text
        return text.replace(value, "***") if value in text else text

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __reduce__(self) -> Any:
        raise TypeError("a Secret cannot be pickled")

    def __bool__(self) -> bool:
        return bool(self._value)


#: Secrets shorter than this are not masked by :meth:`Secret.redact`.
_MIN_REDACTED = 4


def _to_secret(value: str | Secret | None) -> Secret | None:
    """Wrap an API key, dropping whitespace around it (a key read from a file often
    ends with a newline) and refusing control characters, which no header may carry."""
    if value is None:
        return None
    text = value.reveal() if isinstance(value, Secret) else value
    stripped = text.strip()
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in stripped):
        raise ValueError("the API key contains a control character (the key is not shown)")
    if isinstance(value, Secret) and stripped == text:
        return value
    return Secret(stripped)


class _Headers(dict[str, str]):
    """Request headers whose repr shows names only: values may hold credentials."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{name!r}: '***'" for name in self) + "}"


def _strip_slash(value: str) -> str:
    return value.rstrip("/")


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
    """

    api_key: Secret | None = attrs.field(default=None, converter=_to_secret)
    base_url: str = attrs.field(default=DEFAULT_BASE_URL, converter=_strip_slash)
    organization: str | None = None
    project: str | None = None

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
            api_key=api_key if api_key is not None else env.get("OPENAI_API_KEY") or None,
            base_url=base_url or env.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
            organization=organization or env.get("OPENAI_ORG_ID") or None,
            project=project or env.get("OPENAI_PROJECT_ID") or None,
        )

    def url(self, path: str) -> str:
        """The absolute URL of an API path such as ``/batches/batch_1``."""
        if path.startswith("/"):
            return self.base_url + path
        return f"{self.base_url}/{path}"

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
