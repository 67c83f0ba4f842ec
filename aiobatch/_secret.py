"""How a credential is held: a :class:`Secret` that is never shown, and request headers
whose repr masks every value.

Every API key and token a provider sends lives in a :class:`Secret` (repr, str and
format show ``***``; it cannot be pickled; :meth:`Secret.redact` masks it in text a
server echoed back). ``_to_secret`` is the attrs converter the providers use for their
key fields: it strips blanks around a key and refuses an empty one or one with a
control character. ``_Headers`` is the mapping a provider's ``headers()`` returns.
"""

from __future__ import annotations

import hmac
from typing import Any, overload

from .errors import ConfigurationError

__all__ = ["Secret"]


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
    if not stripped:
        # A blank key would silently send no credentials at all (and get a 401 later).
        raise ConfigurationError(
            "the API key is empty or only whitespace; pass None (or leave the variable "
            "unset) to send no key"
        )
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
