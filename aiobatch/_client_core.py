"""The plumbing under every call of :class:`~aiobatch.BatchClient`.

:class:`ClientCore` builds a request (the provider says where and with which headers),
sends it through the retry policy and the transport, turns an error status into the
:mod:`aiobatch.errors` tree, and decodes answers (whole bodies, or streamed bodies line
by line) with :mod:`aiobatch._convert`. No error or message it makes shows an API key.
The calls themselves are in :mod:`aiobatch._client_files` (the Files API) and
:mod:`aiobatch._client` (the Batch API).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any, NoReturn, TypeVar
from urllib.parse import quote

from ._clock import Clock
from ._convert import decode, decode_json, parse_error_body
from ._provider import Provider, Secret, _Headers
from ._retry import RetryPolicy, RetryState, parse_retry_after
from .errors import (
    APIStatusError,
    ClosedError,
    DecodeError,
    UnknownStatusError,
    status_error_class,
)
from .transport._base import Multipart, Request, Response, Transport

__all__ = ["ClientCore", "quote_id", "response_lines"]

T = TypeVar("T")

_NO_PARAMS: Mapping[str, str] = types.MappingProxyType({})


def quote_id(object_id: str) -> str:
    """An object id as a URL path segment."""
    if not object_id:
        raise ValueError("an object id must be a non-empty string")
    return quote(object_id, safe="%:@")


def _redact_error(error: DecodeError, secrets: tuple[Secret, ...]) -> DecodeError:
    """A copy of a decode error with the secret masked in every text, and nothing chained.

    A new exception object, never the caught one: re-raising the caught one would bring
    back the frames (and their locals, the raw body among them) it was caught with.
    """
    cls = type(error)
    copy = cls.__new__(cls)
    copy.__dict__.update(error.__dict__)
    copy.what = _redact(secrets, error.what)
    copy.detail = _redact(secrets, error.detail)
    if error.path is not None:
        copy.path = _redact(secrets, error.path)
    if isinstance(copy, UnknownStatusError) and isinstance(copy.value, str):
        copy.value = _redact(secrets, copy.value)
    copy.args = tuple(_redact(secrets, a) if isinstance(a, str) else a for a in error.args)
    copy.__suppress_context__ = True
    return copy


def _redact(secrets: tuple[Secret, ...], text: str) -> str:
    for secret in secrets:
        text = secret.redact(text)
    return text


async def response_lines(response: Response) -> AsyncGenerator[bytes, None]:
    """A streamed body's lines, without their line ends; closes the response at the end.

    A last line without a newline is yielded too. Each byte is looked at a bounded
    number of times, however long a line is and however the chunks cut it.
    """
    try:
        pending: list[bytes] = []  # the start of a line cut by chunk boundaries
        async for chunk in response.iter_chunks():
            lines = chunk.split(b"\n")
            if len(lines) == 1:
                pending.append(chunk)
                continue
            if pending:
                pending.append(lines[0])
                lines[0] = b"".join(pending)
                pending.clear()
            tail = lines.pop()
            if tail:
                pending.append(tail)
            for line in lines:
                yield line[:-1] if line.endswith(b"\r") else line
        if pending:
            last = b"".join(pending)
            pending.clear()
            if last:
                yield last[:-1] if last.endswith(b"\r") else last
    finally:
        await response.aclose()


class ClientCore:
    """Requests, sends, error mapping and decoding for one provider (see the module notes).

    Args:
        provider: where requests go.
        transport: how they travel.
        retry: the retry policy of every call.
        clock: the time source for retries and deadlines.
        timeout: seconds per control request; None leaves it to the transport.
    """

    def __init__(
        self,
        provider: Provider,
        transport: Transport,
        retry: RetryPolicy,
        clock: Clock,
        timeout: float | None,
    ) -> None:
        self._provider: Provider = provider
        self._secrets = tuple(provider.secrets)
        query = provider.params()
        self._query: Mapping[str, str] | None = dict(query) if query else None
        self._transport: Transport = transport
        self._retry = retry
        self._clock: Clock = clock
        self._timeout = timeout
        self._closed = False
        self._parent: ClientCore | None = None
        headers = _Headers(provider.headers())
        self._headers: Mapping[str, str] = headers
        self._json_headers: Mapping[str, str] = _Headers(
            {**headers, "content-type": "application/json"}
        )

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called (on this client, or on the one it was made
        from with :meth:`with_options`); every call then raises ClosedError."""
        return self._closed or (self._parent is not None and self._parent.closed)

    def _check_open(self) -> None:
        if self._closed or (self._parent is not None and self._parent.closed):
            raise ClosedError("the client is closed; make a new BatchClient")

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] = _NO_PARAMS,
        body: bytes | Multipart | None = None,
        timeout: float | None = None,
    ) -> Request:
        headers = self._json_headers if isinstance(body, bytes) else self._headers
        if self._query is not None:
            params = {**self._query, **params}
        return Request(method, self._provider.url(path), params, headers, body, timeout)

    async def _send(
        self,
        request: Request,
        *,
        stream: bool = False,
        deadline: float | None = None,
        state: RetryState | None = None,
    ) -> Response:
        self._check_open()
        response = await self._retry.send(
            self._transport,
            request,
            clock=self._clock,
            stream=stream,
            deadline=deadline,
            state=state,
        )
        if response.status >= 400:
            await self._raise_for_status(response, request)
        return response

    async def _fetch(
        self,
        cls: type[T],
        method: str,
        path: str,
        *,
        params: Mapping[str, str] = _NO_PARAMS,
        deadline: float | None = None,
    ) -> tuple[T, Response]:
        request = self._request(method, path, params=params, timeout=self._timeout)
        response = await self._send(request, deadline=deadline)
        return self._decode(await response.read(), cls), response

    async def _call(
        self,
        cls: type[T],
        method: str,
        path: str,
        *,
        params: Mapping[str, str] = _NO_PARAMS,
        deadline: float | None = None,
    ) -> T:
        value, _ = await self._fetch(cls, method, path, params=params, deadline=deadline)
        return value

    def _decode(self, raw: bytes, cls: type[T], *, what: str | None = None) -> T:
        """Decode a success body; a decode error never shows an echoed API key."""
        try:
            return decode(raw, cls, what=what)
        except DecodeError as exc:
            error = self._scrubbed(exc, raw)
            if error is exc:
                raise
        del raw
        raise error

    def _scrubbed(self, error: DecodeError, raw: bytes | str) -> DecodeError:
        """``error`` itself, or (when the body held an API key) a redacted copy of it."""
        if not any(secret.redact(raw) is not raw for secret in self._secrets):
            return error
        return _redact_error(error, self._secrets)

    async def _status_error(self, response: Response, request: Request) -> APIStatusError:
        """The :class:`APIStatusError` for an error response (the API key masked)."""
        raw = await response.read()
        for secret in self._secrets:
            raw = secret.redact(raw)
        status = response.status
        body: Any
        try:
            body = decode_json(raw, what="error body") if raw else None
        except DecodeError:
            body = raw[:2000].decode("utf-8", "replace")
        envelope = parse_error_body(body)
        if envelope is not None:
            message = envelope.message
        elif isinstance(body, str) and body.strip():
            message = body.strip()[:200]
        else:
            message = f"HTTP {status} with no error message"
        fields: dict[str, Any] = {
            "status_code": status,
            "request_id": response.headers.get("x-request-id"),
            "body": body,
            "error_type": envelope.type if envelope else None,
            "error_code": envelope.code if envelope else None,
            "error_param": envelope.param if envelope else None,
            "method": request.method,
            "url": request.url,
            "retry_after": parse_retry_after(response.headers, now=self._clock.now()),
        }
        return status_error_class(status)(message, **fields)

    async def _raise_for_status(self, response: Response, request: Request) -> NoReturn:
        """Turn an error response into the matching :class:`APIStatusError`."""
        raise await self._status_error(response, request)

    async def _decoded_lines(
        self,
        lines: AsyncGenerator[bytes, None],
        decode_line: Callable[..., T],
        where: str,
    ) -> AsyncGenerator[T, None]:
        """Decode each non-blank line; a decode error names the 1-based line number and
        never shows an echoed API key. Closes ``lines`` when done or stopped early."""
        number = 0
        async with contextlib.aclosing(lines):
            async for line in lines:
                number += 1
                if not line.strip():
                    continue
                scrubbed: DecodeError | None = None
                try:
                    result = decode_line(line, what=f"line {number} of {where}")
                except DecodeError as exc:
                    scrubbed = self._scrubbed(exc, line)
                    if scrubbed is exc:
                        raise
                if scrubbed is not None:  # raised out here: nothing holding the line chained
                    del line
                    raise scrubbed
                yield result
