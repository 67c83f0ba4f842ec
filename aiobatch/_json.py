"""JSON reading, faster with the optional ``msgspec`` (``pip install aiobatch[fast]``).

:func:`loads` is :func:`json.loads`: with msgspec installed, msgspec reads the
document first (several times faster), and whatever it does not take (``NaN``, numbers
out of a float's range, lone surrogate escapes, very deep nesting, text that is not
UTF-8) is read by :func:`json.loads`, which decides and raises. msgspec gives the same
values as :func:`json.loads` for every document it takes (the last of duplicate keys
wins in both), so the result never depends on whether it is installed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

__all__ = ["FAST", "loader", "loads"]

_fast_decode: Callable[[bytes | str], Any] | None
try:  # the optional extra: aiobatch[fast]
    import msgspec
except ImportError:  # pragma: no cover - depends on the environment
    _fast_decode = None
else:
    _fast_decode = msgspec.json.Decoder().decode

#: Whether msgspec is installed (and used).
FAST = _fast_decode is not None


def loads(data: bytes | str, **kwargs: Any) -> Any:
    """:func:`json.loads` of ``data`` (``kwargs`` go to it), read by msgspec first when
    it is installed.

    Raises:
        ValueError: ``data`` is not JSON (what :func:`json.loads` raises).
        RecursionError: it nests too deep (what :func:`json.loads` raises).
    """
    if _fast_decode is not None:
        try:
            return _fast_decode(data)
        except (ValueError, RecursionError):
            pass  # json.loads decides: it takes more, or says what is wrong
    return json.loads(data, **kwargs)


def loader(**kwargs: Any) -> Callable[[str], Any]:
    """:func:`loads` of text with these ``kwargs`` for :func:`json.loads`, made once
    (json.loads with arguments builds a decoder per call)."""
    decoder = json.JSONDecoder(**kwargs)
    fast = _fast_decode

    def read(text: str) -> Any:
        if fast is not None:
            try:
                return fast(text)
            except (ValueError, RecursionError):
                pass
        if text.startswith("\ufeff"):
            return json.loads(text, **kwargs)  # its error, as json.loads says it
        return decoder.decode(text)

    return read
