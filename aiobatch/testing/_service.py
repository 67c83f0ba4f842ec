"""The fake batch service: an in-memory, OpenAI-compatible Batch and Files API.

:class:`FakeBatchService` answers :class:`~aiobatch.transport.Request` objects the way
OpenAI's ``/v1/files`` and ``/v1/batches`` endpoints do (shapes, status codes, error
bodies, the lifecycle and its timestamps), on an injected clock, with fault
injection. Hand it to a client with :meth:`FakeBatchService.transport` (no sockets)
or serve it over HTTP with the testing app.

Example::

    clock = VirtualClock()
    service = FakeBatchService(clock=clock, config=FakeConfig(validation_seconds=5))
    transport = service.transport()
    ...  # drive your code with `transport`, move `clock`, inspect `service`

Layout: this module holds the service object (its test controls and introspection) and
the front door every request passes (request ids, the rate limit, injected faults, the
request log, the ``date`` header, streaming); :mod:`._routes` the endpoints,
:mod:`._checks` how they check what a request sent, :mod:`._engine` the simulated files
and batches, :mod:`._dialects` how each provider is played.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import AsyncIterator, Mapping
from email.utils import formatdate
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import attrs

from .._clock import Clock, SystemClock
from .._lifecycle import BatchStatus
from .._models import Batch, BatchError
from ..errors import TransportError
from ..transport import InMemoryTransport, Request, Response
from ._anthropic_routes import AnthropicRoutes
from ._checks import _Reply
from ._config import FakeConfig
from ._dialects import FakeDialect
from ._engine import Engine
from ._faults import Fault, FaultKind, FaultPlan
from ._ratelimit import RateLimiter
from ._responder import DefaultResponder, Responder
from ._routes import OpenAIRoutes
from ._wire import http_error_body, json_bytes

__all__ = ["FakeBatchService", "RecordedRequest"]

#: The statuses :meth:`FakeBatchService.fail_next_batches` can end a batch in, and the
#: default message of each Portkey-only one.
_FORCED_STATUSES: dict[BatchStatus, str | None] = {
    BatchStatus.FAILED: None,
    BatchStatus.FILE_UPLOAD_FAILED: (
        "The input file was validated, but uploading it to the provider failed."
    ),
    BatchStatus.BATCH_START_FAILED: (
        "The input file was uploaded to the provider, but starting the batch job failed."
    ),
}


@attrs.frozen
class RecordedRequest:
    """One request the service received, as kept in :attr:`FakeBatchService.requests`.

    Attributes:
        method: the HTTP method.
        path: the path after ``/v1`` (``/batches/batch_abc/cancel``).
        params: the query parameters.
        status: the status answered, or None when the connection was dropped.
        request_id: the ``x-request-id`` of the answer (also set for dropped ones).
        fault: the kind of injected fault that hit the request, if any.
        at: the service clock's time when the request arrived.
    """

    method: str
    path: str
    params: Mapping[str, str]
    status: int | None
    request_id: str
    fault: FaultKind | None
    at: float


@attrs.define(slots=True)
class _Answer:
    """A response before it is dated and sent: status, headers and the whole body."""

    status: int
    headers: dict[str, str]
    body: bytes
    #: send the body in ``config.chunk_size`` chunks (file content).
    stream: bool = False


def _json_headers(request_id: str) -> dict[str, str]:
    return {"content-type": "application/json", "x-request-id": request_id}


def _route(url: str) -> tuple[str, dict[str, str]]:
    """The path after the last ``/v1`` segment (or after ``/openai``, Azure's paths
    without ``/v1``), and the query of ``url``."""
    parts = urlsplit(url)
    segments = [unquote(s) for s in parts.path.split("/") if s]
    if "v1" in segments:
        cut = len(segments) - 1 - segments[::-1].index("v1")
        segments = segments[cut + 1 :]
    elif segments and segments[0] == "openai":
        segments = segments[1:]
    return "/" + "/".join(segments), dict(parse_qsl(parts.query))


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), size):
        yield bytes(view[start : start + size])


class FakeBatchService:
    """An in-memory OpenAI-compatible Batch and Files API for tests.

    Args:
        clock: the time source; batches advance as it moves (a
            :class:`~aiobatch.testing.VirtualClock` in tests). Defaults to real time.
        config: timings, limits and per-line errors (see :class:`FakeConfig`).
        responder: answers each request line (see :data:`Responder`); defaults to
            :class:`DefaultResponder` on this service's clock.
        api_key: when set, only this key is accepted (in the header the dialect
            requires); when None, any key is. (The ``openai`` dialect also takes it in
            an ``api-key`` or ``x-portkey-api-key`` header.)
        seed: seeds ids, fault probabilities and the ``ratio`` of line-error rules.
        dialect: which provider the service plays: ``"openai"`` (the default),
            ``"portkey"``, ``"azure"``, or a :class:`FakeDialect` with its switches
            (ms or ISO timestamps, capitalised statuses...): the headers required,
            the paths, the error shapes and the provider's quirks.

    Attributes:
        clock: the service's clock.
        config: the service's configuration.
        responder: the line responder in use.
        faults: the fault-injection rules; add :class:`Fault` rules at any time.
    """

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        config: FakeConfig | None = None,
        responder: Responder | None = None,
        api_key: str | None = None,
        seed: int = 0,
        dialect: str | FakeDialect = "openai",
    ) -> None:
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.config: FakeConfig = config if config is not None else FakeConfig()
        self.responder: Responder = (
            responder if responder is not None else DefaultResponder(clock=self.clock)
        )
        self._api_key = api_key
        self.dialect: FakeDialect = FakeDialect.of(dialect)
        self.faults: FaultPlan = FaultPlan(seed=seed)
        self._engine = Engine(
            clock=self.clock,
            config=self.config,
            responder=self.responder,
            seed=seed,
            expire_batches=self.dialect.batches_expire,
            empty_error_file=self.dialect.empty_error_file,
        )
        routes = AnthropicRoutes if self.dialect.name == "anthropic" else OpenAIRoutes
        self._routes: OpenAIRoutes | AnthropicRoutes = routes(
            self._engine, self.config, self.dialect
        )
        self._request_ids = random.Random(f"{seed}/request-ids")
        self._log: deque[RecordedRequest] = deque(maxlen=self.config.request_log_size)
        self.rate_limiter = RateLimiter(
            self.config.rate_limit, organization=self.config.organization
        )

    def __repr__(self) -> str:
        engine = self._engine
        return (
            f"FakeBatchService(batches={len(engine.batch_order)}, "
            f"files={len(engine.file_order)}, clock={self.clock!r})"
        )

    def transport(self, *, timeout: float | None = None) -> InMemoryTransport:
        """An in-memory transport that hands requests to this service.

        Args:
            timeout: default seconds per request, on this service's clock.

        Returns:
            The transport.
        """
        return InMemoryTransport(self.handle, clock=self.clock, timeout=timeout)

    # -- introspection -----------------------------------------------------------------------

    @property
    def batch_ids(self) -> list[str]:
        """Every batch id created, oldest first."""
        return list(self._engine.batch_order)

    @property
    def file_ids(self) -> list[str]:
        """Ids of the files not deleted (uploads and result files), oldest first."""
        files = self._engine.files
        return [fid for fid in self._engine.file_order if not files[fid].deleted]

    @property
    def requests(self) -> tuple[RecordedRequest, ...]:
        """The requests received, oldest first (at most ``config.request_log_size``)."""
        return tuple(self._log)

    def request_count(self, method: str | None = None, path: str = "*") -> int:
        """How many logged requests match a method and a path pattern.

        Args:
            method: the method, or None for any.
            path: a shell-style pattern for the path after ``/v1`` (``"/batches"``).

        Returns:
            The number of matching requests (dropped and faulted ones included).
        """
        wanted = method.upper() if method is not None else None
        pattern = path[3:] if path.startswith("/v1/") else path
        return sum(
            1
            for r in self._log
            if (wanted is None or r.method == wanted) and fnmatchcase(r.path, pattern)
        )

    async def get_batch(self, batch_id: str) -> Batch:
        """The batch as a client would see it now (moves the simulation to ``clock.now()``).

        Args:
            batch_id: the batch.

        Returns:
            The batch.

        Raises:
            KeyError: no such batch.
        """
        engine = self._engine
        async with engine.lock:
            now = engine.now()
            await engine.advance(now)
            return await engine.snapshot(engine.batches[batch_id], now)

    def file_content(self, file_id: str) -> bytes:
        """The content of a stored file.

        Args:
            file_id: the file.

        Returns:
            The bytes.

        Raises:
            KeyError: no such file, or it was deleted or has expired.
        """
        record = self._engine.get_file(file_id, self._engine.now())
        if record is None:
            raise KeyError(file_id)
        return record.content

    def fail_next_batches(
        self,
        code: str,
        *,
        count: int = 1,
        message: str | None = None,
        param: str | None = None,
        line: int | None = None,
        status: str = "failed",
    ) -> None:
        """Make the next ``count`` created batches fail validation with ``code``.

        The create call still succeeds; the batch goes ``failed`` (or ``status``) at
        the end of ``validating`` with ``errors.data == [{code, message, param, line}]``
        and ``failed_at`` set.

        Args:
            code: the error code (``token_limit_exceeded``, ``invalid_json_line``...).
            count: how many batches.
            message: the message; a default for the code (or the status) when None.
            param: the ``param`` of the error.
            line: the ``line`` of the error (1-based, as OpenAI numbers them); any int
                is reported as given, so a line the file does not have (0, or past its
                end) plays a server that numbers lines differently.
            status: the terminal status: ``failed``, or in the ``portkey`` dialect
                Portkey's own ``file_upload_failed`` / ``batch_start_failed`` (the
                gateway could not upload the input to the provider / start the job).

        Raises:
            ValueError: a status other than these, or a Portkey status in another
                dialect.
        """
        try:
            forced = BatchStatus(status)
        except ValueError:
            forced = BatchStatus.UNKNOWN
        if forced not in _FORCED_STATUSES:
            allowed = ", ".join(repr(s.value) for s in _FORCED_STATUSES)
            raise ValueError(f"status must be one of {allowed}, got {status!r}")
        if forced is not BatchStatus.FAILED and self.dialect.name != "portkey":
            raise ValueError(
                f"{status!r} is a Portkey status: use FakeBatchService(dialect='portkey') "
                f"(this one plays {self.dialect.name!r})"
            )
        engine = self._engine
        text = message
        if text is None:
            text = _FORCED_STATUSES[forced] or engine.default_forced_message(code)
        for _ in range(count):
            error = BatchError(code=code, message=text, param=param, line=line)
            engine.forced.append((error, forced))

    def override_status(self, batch_id: str, status: str | None) -> None:
        """Make a batch report ``status`` in every answer, whatever its real state.

        For testing how a client copes with a status it does not know (a provider's
        own, such as ``"scheduled"``): retrieve, list, create and cancel answers carry
        the string as the batch's ``status``, while the simulation goes on underneath
        (counts, timestamps and result files move as usual, and :meth:`get_batch`
        still returns the real state). ``None`` removes the override.

        Args:
            batch_id: the batch.
            status: the status string to report (any non-empty string, known or not),
                or None to report the real status again.

        Raises:
            KeyError: no such batch.
            ValueError: ``status`` is an empty string.
        """
        if batch_id not in self._engine.batches:
            raise KeyError(batch_id)
        overrides = self._engine.status_overrides
        if status is None:
            overrides.pop(batch_id, None)
            return
        if not isinstance(status, str) or not status:
            raise ValueError(f"a status override must be a non-empty string, got {status!r}")
        overrides[batch_id] = status

    async def enqueued_tokens(self, model: str) -> int:
        """Estimated tokens of the validated, unfinished batches of ``model`` now.

        Args:
            model: the model.

        Returns:
            The tokens counted against ``config.enqueued_token_limits`` (moves the
            simulation to ``clock.now()`` first).
        """
        engine = self._engine
        async with engine.lock:
            await engine.advance(engine.now())
            return engine.enqueued_tokens(model)

    # -- the HTTP surface -----------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        """Answer one request, as OpenAI's ``/v1/files`` and ``/v1/batches`` would.

        Every response carries a ``date`` header (RFC 7231) from the service's clock,
        taken when the answer leaves, so a client can read the server's time from it.

        A request is processed on arrival, unless a :class:`Fault` with
        ``act_after_delay`` holds it back first; :attr:`requests` records each request
        once it has been processed (with its arrival time).

        With ``config.rate_limit`` set, :attr:`rate_limiter` checks each request first,
        before fault injection: one beyond the limit is answered ``429`` at once, with no
        effect (recorded with ``fault=FaultKind.RATE_LIMITED``); every answer the limit
        covers carries the ``x-ratelimit-*`` headers.

        Args:
            request: the request; its URL path is routed on what follows the last
                ``/v1`` segment.

        Returns:
            The response (``GET /files/{id}/content`` is streamed in chunks).

        Raises:
            TransportError: an injected fault dropped the connection.
        """
        method = request.method.upper()
        path, query = _route(request.url)
        params = {**query, **request.params}
        request_id = f"req_{self._request_ids.getrandbits(128):032x}"
        at = self.clock.now()
        admission = self.rate_limiter.admit(method, path, at)
        if admission is not None and not admission.allowed:
            limited = FaultKind.RATE_LIMITED
            self._log.append(RecordedRequest(method, path, params, 429, request_id, limited, at))
            headers = {**_json_headers(request_id), **admission.headers}
            return self._respond(_Answer(429, headers, json_bytes(admission.body)))
        fault = self.faults.take(method, path)
        kind = fault.kind if fault is not None else None
        delay = fault.delay if fault is not None else 0.0
        # By default the request takes effect when it arrives and a fault's delay holds
        # back the answer; with act_after_delay the delay comes first (a late commit).
        late = fault is not None and fault.act_after_delay and delay > 0
        if late:
            await self.clock.sleep(delay)
        answer: _Answer | None = None
        if fault is not None and kind is FaultKind.HTTP:
            answer = self._fault_answer(fault, request_id)
        elif kind is not FaultKind.DROP_BEFORE:
            answer = await self._dispatch(method, path, params, request, request_id)
        if answer is not None and kind is FaultKind.MALFORMED:
            body = answer.body
            answer = _Answer(200, _json_headers(request_id), body[: len(body) // 2] or b"{")
        dropped = kind is FaultKind.DROP_BEFORE or kind is FaultKind.DROP_AFTER
        status = None if dropped or answer is None else answer.status
        self._log.append(RecordedRequest(method, path, params, status, request_id, kind, at))
        if delay > 0 and not late:
            await self.clock.sleep(delay)
        if answer is None or dropped:
            when = "after" if kind is FaultKind.DROP_AFTER else "before"
            effect = (
                "the request took effect, its answer is lost"
                if kind is FaultKind.DROP_AFTER
                else "the request had no effect"
            )
            raise TransportError(
                f"the fake service dropped the connection {when} processing the request "
                f"(injected fault: {effect})",
                method=method,
                url=request.url,
            )
        if admission is not None:
            answer.headers.update(admission.headers)
        return self._respond(answer)

    def _respond(self, answer: _Answer) -> Response:
        """The Response for ``answer``, dated now on the service clock (RFC 7231 ``date``)."""
        headers = answer.headers
        headers["date"] = formatdate(self.clock.now(), usegmt=True)
        if answer.stream:
            return Response(
                answer.status, headers, chunks=_chunks(answer.body, self.config.chunk_size)
            )
        return Response(answer.status, headers, answer.body)

    def _json(self, status: int, data: Any, request_id: str) -> _Answer:
        return _Answer(status, _json_headers(request_id), json_bytes(data))

    def _fault_answer(self, fault: Fault, request_id: str) -> _Answer:
        headers = _json_headers(request_id)
        if fault.retry_after is not None:
            headers["retry-after"] = f"{fault.retry_after:g}"
        if fault.retry_after_ms is not None:
            headers["retry-after-ms"] = f"{fault.retry_after_ms:g}"
        if fault.should_retry is not None:
            headers["x-should-retry"] = "true" if fault.should_retry else "false"
        body = self.dialect.fault_body(http_error_body(fault.status, message=fault.message))
        return _Answer(fault.status, headers, json_bytes(body))

    async def _dispatch(
        self, method: str, path: str, params: Mapping[str, str], request: Request, request_id: str
    ) -> _Answer:
        parts = path.strip("/").split("/")
        engine = self._engine
        dialect = self.dialect
        # Credentials and the URL's shape first, in the dialect's own error shapes.
        refused = dialect.check(request.url, params, request.headers, self._api_key)
        if refused is not None:
            return self._json(refused[0], refused[1], request_id)
        try:
            async with engine.lock:
                now = engine.now()
                await engine.advance(now)
                result = await self._routes.route(method, parts, params, request, now)
        except _Reply as reply:
            return self._json(reply.status, dialect.wrap_error(reply.body), request_id)
        if isinstance(result, bytes):
            headers = {"content-type": "application/octet-stream", "x-request-id": request_id}
            return _Answer(200, headers, result, stream=True)
        return self._json(200, result, request_id)
