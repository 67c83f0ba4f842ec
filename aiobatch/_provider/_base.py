"""What a provider is, and the small pieces every built-in dialect is made of.

The :class:`Provider` protocol (what :class:`~aiobatch.BatchClient` needs), the data a
provider describes its service with (:class:`Limits`, :class:`Quirks`), and the helpers
the dialect modules share: base-URL and header-value cleaning, joining a path to a base
URL, and reading a credential from the environment. No IO, no provider of its own.
"""

from __future__ import annotations

import os
import types
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import attrs

from .._secret import Secret
from ..errors import ConfigurationError

__all__ = ["Limits", "Provider", "Quirks"]

_NO_QUERY: Mapping[str, str] = types.MappingProxyType({})


def _strip_slash(value: str) -> str:
    """A base URL without blanks around it (a value read from a file or the environment
    often ends in a newline) or a trailing slash."""
    return value.strip().rstrip("/")


def _optional_text(value: str | None) -> str | None:
    """A header value without blanks around it (a newline would be refused by the
    transport); None for an empty one."""
    if value is None:
        return None
    return value.strip() or None


@attrs.frozen
class Limits:
    """How big one batch may be, per input file (both must hold).

    Attributes:
        max_lines: requests per batch (OpenAI 50,000; Azure 100,000).
        max_bytes: bytes of the input file (200 MB for both).
        max_embedding_inputs: embedding inputs per ``/v1/embeddings`` batch, summed over
            its lines (a line's ``input`` list counts each element; 50,000 on OpenAI).
        custom_id_pattern: a regular expression every ``custom_id`` must match in full
            (Anthropic: ``^[a-zA-Z0-9_-]{1,64}$``); None takes any string.
    """

    max_lines: int = 50_000
    max_bytes: int = 200 * 1024 * 1024
    max_embedding_inputs: int = 50_000
    custom_id_pattern: str | None = None

    def __attrs_post_init__(self) -> None:
        for name in ("max_lines", "max_bytes", "max_embedding_inputs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigurationError(f"Limits.{name} must be a positive int, got {value!r}")


@attrs.frozen
class Quirks:
    """What a provider does differently, as data the client acts on.

    Attributes:
        wait_for_processed_file: an upload answers before the file is usable (Azure:
            ``pending``, then ``processed``); :meth:`BatchClient.upload_file
            <aiobatch.BatchClient.upload_file>` then polls the file until it is
            ``processed``, so that a create never meets a file still pending.
        batches_expire: unfinished batches expire when the completion window ends
            (Azure's keep running past 24 h until done or cancelled).
        empty_error_file: a batch with no failed request still gets an
            ``error_file_id``, for an empty file (Azure); reading it yields no lines.
        submission: how a run submits a shard: ``"file"`` (upload its input file,
            then create the batch from it) or ``"inline"`` (the requests go in the
            create call itself: Anthropic).
        batch_output_endpoint: ``GET /batches/{id}/output`` streams a finished batch's
            output in one call (Portkey; see :meth:`BatchClient.iter_batch_output
            <aiobatch.BatchClient.iter_batch_output>`).
        list_cursor_param: the query parameter that pages the batch list on from the
            last batch seen (OpenAI ``after``; Anthropic ``after_id``).
        keeps_metadata: batches carry the metadata they were created with, so a
            create's key can be looked up (Anthropic's batches have no metadata: a
            create whose answer is lost is never re-sent, see the run layer's inline
            submission).
    """

    wait_for_processed_file: bool = False
    batches_expire: bool = True
    empty_error_file: bool = False
    batch_output_endpoint: bool = False
    submission: str = "file"
    list_cursor_param: str = "after"
    keeps_metadata: bool = True


@runtime_checkable
class Provider(Protocol):
    """What :class:`~aiobatch.BatchClient` needs from a provider.

    Write your own for a server none of the built-in ones fits; it must be pure data
    (no IO) and keep every credential in a :class:`Secret`.
    """

    @property
    def name(self) -> str:
        """The dialect's name (``openai``, ``portkey``, ``azure``, ``compatible``)."""
        ...

    @property
    def base_url(self) -> str:
        """The API root every path is joined to (no trailing slash)."""
        ...

    @property
    def limits(self) -> Limits:
        """How big one batch may be."""
        ...

    @property
    def quirks(self) -> Quirks:
        """What the provider does differently."""
        ...

    @property
    def secrets(self) -> tuple[Secret, ...]:
        """Every credential sent, so that none is ever shown in an error (masked with
        :meth:`Secret.redact`)."""
        ...

    def url(self, path: str) -> str:
        """The absolute URL of an API path such as ``/batches/batch_1`` (no query)."""
        ...

    def params(self) -> Mapping[str, str]:
        """The query parameters every request carries (Azure's ``api-version``)."""
        ...

    def headers(self) -> Mapping[str, str]:
        """The headers every request carries (lower-case names)."""
        ...


def _join(base_url: str, path: str) -> str:
    if path.startswith("/"):
        return base_url + path
    return f"{base_url}/{path}"


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _env_key(env: Mapping[str, str], name: str) -> str | None:
    """A credential from the environment: None when unset or empty; a value of only
    whitespace is a mistake (it would send no credentials), named in the error."""
    value = env.get(name)
    if not value:
        return None
    if not value.strip():
        raise ConfigurationError(
            f"${name} is set but holds only whitespace; set the key, or unset it to send none"
        )
    return value


def _limits(value: Limits | None, default: Limits) -> Limits:
    return default if value is None else value
