"""Every error aiobatch raises, as one tree.

Each error says who is at fault: the caller (bad input, an illegal request), the
server (an impossible transition, a malformed body) or the network. No message or
repr ever contains an API key.

::

    AiobatchError
    ├── TransportError                 the network: the request may or may not have arrived
    │   ├── ConnectError               could not connect; the request was never sent
    │   └── TransportTimeoutError      no answer in time (also a builtin TimeoutError)
    ├── APIStatusError                 the server answered with an HTTP error status
    │   ├── BadRequestError            400
    │   ├── AuthenticationError        401
    │   ├── PermissionDeniedError      403
    │   ├── NotFoundError              404
    │   ├── ConflictError              409
    │   ├── UnprocessableEntityError   422
    │   ├── RateLimitError             429, with ``retry_after``
    │   ├── ServerError                5xx
    │   └── RequestFailedError         a batched call's request came back with an HTTP error
    ├── DecodeError                    the server sent a body we cannot read (server's fault)
    │   └── UnknownStatusError         a batch status string we do not know (also a StateError)
    ├── StateError                     the batch lifecycle was violated
    │   ├── InvalidTransitionError     the caller asked for an illegal move (cancel when finished)
    │   ├── UnexpectedTransitionError  the server reported an impossible move (the server's fault)
    │   └── UnknownStatusError
    ├── WaitTimeoutError               a wait passed its deadline (also a builtin TimeoutError)
    ├── BatchedTimeoutError            a batched call's ``deadline`` passed before its result
    │                                  (also a builtin TimeoutError)
    ├── AmbiguousCreateError           a create may or may not have made a batch: look its
    │                                  ``create_key`` up later (never re-sent blindly)
    ├── LookupIncompleteError          a create-key lookup could not prove the batch absent
    ├── FileProcessingError            an uploaded file ended in ``error`` instead of ``processed``
    │   └── FileWaitTimeoutError       ... or was still not ``processed`` at the deadline
    │                                  (also a builtin TimeoutError)
    ├── NoOutputError                  the batch has no output to stream (Portkey's ``/output``
    │                                  answered with the batch's errors instead)
    ├── UnsupportedError               the provider has no such endpoint (the caller's fault)
    ├── ConfigurationError             bad provider settings: unknown name, missing endpoint or
    │                                  key (the caller's fault; also a builtin ValueError)
    ├── ClosedError                    the client was used after it was closed (the caller's fault)
    ├── RequestNotRunError             a batched call's request ended without a response
    │   └── BatchEndedError            ... its batches expired or were cancelled in every round
    ├── InputError                     the caller's input is bad (also a builtin ValueError)
    │   └── PreflightError             input lines failed the checks run before any upload;
    │                                  nothing was uploaded
    ├── WebhookError                   a webhook delivery was refused and not acted on
    │   ├── WebhookHeaderError         a Standard Webhooks header is missing or unreadable
    │   ├── WebhookTimestampError      the delivery's timestamp is too old or in the future
    │   ├── WebhookSignatureError      no signature matches any secret (forged, tampered)
    │   └── WebhookPayloadError        a correctly signed body is not an event (bad JSON)
    ├── JournalError                   a run's journal cannot be used (missing, in use, made
    │   │                              for another input, damaged, unreachable)
    │   └── LeaseLostError             a worker's lease on a shard ran out or was taken
    └── RunError                       a run cannot go on (a step kept failing, credentials
        │                              refused); the journal is intact: run again to continue
        ├── LeaseExpiredError          a worker of a shared run could not renew its leases
        │                              in time: it sends nothing more and stops
        ├── TooManyBatchesError        a request would go into more batches than
        │                              ``RunConfig.max_batches_per_request`` allows
        └── StepFailedError            a step kept failing until the run gave up
            └── UnreachableError       the server could not be reached at all (its name does
                                       not resolve, the connection is refused)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "APIStatusError",
    "AiobatchError",
    "AmbiguousCreateError",
    "AuthenticationError",
    "BadRequestError",
    "BatchEndedError",
    "BatchedTimeoutError",
    "ClosedError",
    "ConfigurationError",
    "ConflictError",
    "ConnectError",
    "DecodeError",
    "FileProcessingError",
    "FileWaitTimeoutError",
    "InputError",
    "InvalidTransitionError",
    "JournalError",
    "LeaseExpiredError",
    "LeaseLostError",
    "LookupIncompleteError",
    "NoOutputError",
    "NotFoundError",
    "PermissionDeniedError",
    "PreflightError",
    "RateLimitError",
    "RequestFailedError",
    "RequestNotRunError",
    "RunError",
    "ServerError",
    "ShardMoveError",
    "StateError",
    "StepFailedError",
    "TooManyBatchesError",
    "TransportError",
    "TransportTimeoutError",
    "UnexpectedTransitionError",
    "UnknownStatusError",
    "UnprocessableEntityError",
    "UnreachableError",
    "UnsupportedError",
    "WaitTimeoutError",
    "WebhookError",
    "WebhookHeaderError",
    "WebhookPayloadError",
    "WebhookSignatureError",
    "WebhookTimestampError",
    "status_error_class",
]


class AiobatchError(Exception):
    """The root of every error aiobatch raises."""


class TransportError(AiobatchError):
    """The request failed in the network; it may have reached the server.

    Attributes:
        method: the HTTP method of the failed request.
        url: the URL of the failed request (it never carries credentials).
    """

    def __init__(self, message: str, *, method: str = "", url: str = "") -> None:
        super().__init__(message)
        self.method = method
        self.url = url


class ConnectError(TransportError):
    """No connection could be made, so the request was never sent.

    Attributes:
        reason: why, in plain words, when the transport knows: ``"name does not
            resolve"``, ``"connection refused"``, ``"connect timeout"``...; else None.
    """

    def __init__(
        self, message: str, *, method: str = "", url: str = "", reason: str | None = None
    ) -> None:
        super().__init__(message, method=method, url=url)
        self.reason = reason


class TransportTimeoutError(TransportError, TimeoutError):
    """No complete answer arrived in time; the server may have acted on the request."""


class APIStatusError(AiobatchError):
    """The server answered with an HTTP error status.

    Attributes:
        status_code: the HTTP status.
        request_id: the server's ``x-request-id``, when it sent one.
        body: the decoded JSON body, or the raw text when it was not JSON.
        error_type, error_code, error_param: fields of OpenAI's ``{"error": {...}}``
            envelope, when the body had one.
        retry_after: seconds the server asked us to wait (``retry-after-ms`` /
            ``retry-after``), when it said so; any status may carry it (a 503 often does).
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        request_id: str | None = None,
        body: Any = None,
        error_type: str | None = None,
        error_code: str | None = None,
        error_param: str | None = None,
        method: str = "",
        url: str = "",
        retry_after: float | None = None,
    ) -> None:
        self.message = message
        self.retry_after = retry_after
        self.status_code = status_code
        self.request_id = request_id
        self.body = body
        self.error_type = error_type
        self.error_code = error_code
        self.error_param = error_param
        self.method = method
        self.url = url
        where = f" ({method} {url})" if method else ""
        rid = f" [request id {request_id}]" if request_id else ""
        super().__init__(f"HTTP {status_code}{where}: {message}{rid}")


class BadRequestError(APIStatusError):
    """400: the server rejected the request as malformed (the caller's fault)."""


class AuthenticationError(APIStatusError):
    """401: missing or wrong credentials."""


class PermissionDeniedError(APIStatusError):
    """403: the credentials may not do this."""


class NotFoundError(APIStatusError):
    """404: no such batch or file (or it is not visible to this key)."""


class ConflictError(APIStatusError):
    """409: the server could not apply the request now (lock timeout, conflicting state)."""


class UnprocessableEntityError(APIStatusError):
    """422: the request was well formed but could not be processed."""


class RateLimitError(APIStatusError):
    """429: slow down; ``retry_after`` says for how long, when the server said so."""


class ServerError(APIStatusError):
    """5xx: the server failed; the request may or may not have been applied."""


_STATUS_CLASSES: Mapping[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def status_error_class(status_code: int) -> type[APIStatusError]:
    """Return the error class for an HTTP error status."""
    if status_code >= 500:
        return ServerError
    return _STATUS_CLASSES.get(status_code, APIStatusError)


class DecodeError(AiobatchError):
    """The server sent a body that does not match the wire schema (the server's fault).

    Attributes:
        what: what was being decoded (``"Batch"``, ``"output line 17"``...).
        path: where in the body the problem is (``"$.request_counts.total"``), if known.
        detail: what was wrong there.
    """

    def __init__(self, what: str, detail: str, *, path: str | None = None) -> None:
        self.what = what
        self.path = path
        self.detail = detail
        where = f" at {path}" if path else ""
        super().__init__(f"cannot decode {what}{where}: {detail}")


class StateError(AiobatchError):
    """The batch lifecycle was violated."""


class ShardMoveError(StateError):
    """The run tried to move a shard in a way the shard lifecycle forbids (aiobatch's
    fault, or a journal edited by hand); nothing was written.

    Attributes:
        shard: the shard's key.
        source: the state it was in.
        target: the state it was sent to.
    """

    def __init__(self, message: str, *, shard: str, source: str, target: str) -> None:
        super().__init__(message)
        self.shard = shard
        self.source = source
        self.target = target


class InvalidTransitionError(StateError):
    """The caller asked for a move the lifecycle forbids, such as cancelling a finished batch."""


class UnexpectedTransitionError(StateError):
    """The server reported a status the batch cannot reach from where it was (server's fault).

    Attributes:
        batch_id: the batch, when known.
        current: the status the batch was in.
        observed: the status the server reported.
    """

    def __init__(self, message: str, *, batch_id: str | None, current: str, observed: str) -> None:
        super().__init__(message)
        self.batch_id = batch_id
        self.current = current
        self.observed = observed


class UnknownStatusError(DecodeError, StateError):
    """The server sent a batch status string that aiobatch does not know.

    When the batch is known, the message names it and says how to map the status
    (``status_aliases`` of :class:`~aiobatch.Fleet`, :class:`~aiobatch.RunConfig` and
    :meth:`~aiobatch.BatchClient.wait`).

    Attributes:
        value: the status string as the server sent it.
        batch_id: the batch that reported it, when known.
    """

    def __init__(
        self,
        value: object,
        *,
        what: str = "batch status",
        path: str | None = None,
        batch_id: str | None = None,
    ):
        self.value = value
        self.batch_id = batch_id
        if batch_id is not None:
            what = f"status of batch {batch_id}"
        super().__init__(what, f"unknown batch status {value!r}", path=path)
        if batch_id is not None:
            self.args = (
                f"batch {batch_id} reports status {value!r}, which aiobatch does not know; "
                f"if you know what it means, map it with status_aliases={{{value!r}: STATUS}}"
                ", STATUS being the aiobatch status it stands for (such as 'completed')",
            )


class WaitTimeoutError(AiobatchError, TimeoutError):
    """A wait for a batch passed its deadline before the batch reached a terminal status.

    Attributes:
        batch_id: the batch waited for.
        last_status: the last status seen.
    """

    def __init__(self, message: str, *, batch_id: str, last_status: str) -> None:
        super().__init__(message)
        self.batch_id = batch_id
        self.last_status = last_status


class BatchedTimeoutError(AiobatchError, TimeoutError):
    """A :class:`~aiobatch.BatchedOpenAI` call's ``deadline`` passed before its result
    came. A request already in a batch stays there: its result is kept in the journal
    (a rerun with the same journal folder is answered from it).

    Attributes:
        custom_id: the request's key.
        url: its endpoint.
        model: its model.
        deadline: the seconds it was given.
    """

    def __init__(
        self, message: str, *, custom_id: str, url: str, model: str, deadline: float
    ) -> None:
        super().__init__(message)
        self.custom_id = custom_id
        self.url = url
        self.model = model
        self.deadline = deadline


class AmbiguousCreateError(AiobatchError):
    """A create may or may not have made a batch, and aiobatch could not tell which.

    The create's answer was lost (a timeout, a dropped connection, a 5xx, an unreadable
    200) and looking its key up did not settle it: the lookup failed, could not prove the
    batch absent, or attempts ran out. It was not sent again, so at most one batch
    exists. Look the key up later with
    :meth:`BatchClient.find_created_batch(create_key) <aiobatch.BatchClient.find_created_batch>`
    before creating again. The failure behind it is ``__cause__``.

    Attributes:
        create_key: the ``aiobatch_create_key`` the create carried in its metadata, or
            None when the metadata had no room for one.
    """

    def __init__(self, message: str, *, create_key: str | None) -> None:
        super().__init__(message)
        self.create_key = create_key


class LookupIncompleteError(AiobatchError):
    """A lookup of a create key could not prove that no batch carries it.

    The batch list was not walked far enough: the page limit was reached, the server
    does not list newest first, or there was no lower bound on the batch's creation
    time. A batch with the key may exist further down the list.

    Attributes:
        create_key: the key looked up.
        reason: why the walk was not conclusive.
    """

    def __init__(self, message: str, *, create_key: str, reason: str) -> None:
        super().__init__(message)
        self.create_key = create_key
        self.reason = reason


class FileProcessingError(AiobatchError):
    """An uploaded file did not become usable: the server marked it ``error`` (or it was
    deleted) instead of ``processed``, so no batch can be made from it.

    Attributes:
        file_id: the file.
        status: the file's last status (``error``, ``pending``...).
        status_details: the server's explanation, when it gave one.
    """

    def __init__(
        self, message: str, *, file_id: str, status: str | None, status_details: str | None = None
    ) -> None:
        super().__init__(message)
        self.file_id = file_id
        self.status = status
        self.status_details = status_details


class FileWaitTimeoutError(FileProcessingError, TimeoutError):
    """An uploaded file was still not ``processed`` when the wait for it ran out of time."""


class NoOutputError(AiobatchError):
    """A batch has no output to stream.

    Portkey's ``GET /batches/{id}/output`` answers a batch without an output file with
    the batch's ``errors`` object instead of JSONL: the batch failed validation.

    Attributes:
        batch_id: the batch.
        errors: the batch's :class:`~aiobatch.BatchErrors`, when the server sent them.
    """

    def __init__(self, message: str, *, batch_id: str, errors: Any = None) -> None:
        super().__init__(message)
        self.batch_id = batch_id
        self.errors = errors


class UnsupportedError(AiobatchError):
    """The provider has no such endpoint (e.g. Portkey's ``/batches/{id}/output`` asked of
    OpenAI); nothing was sent. The caller's fault."""


class ConfigurationError(AiobatchError, ValueError):
    """A provider cannot be built from what it was given: an unknown provider name, a
    missing Azure endpoint or key, a Portkey key without a provider or config... The
    message says what is missing and where it is read from. The caller's fault."""


class ClosedError(AiobatchError):
    """The client (or its transport) was used after it was closed; nothing was sent.

    The caller's fault, and never retried.
    """


def describe(exc: BaseException) -> str:
    """An exception's type and (cut) message, for an error message or a log line.

    Not part of the public surface (not in ``__all__``): aiobatch's own messages use it.
    """
    text = str(exc)
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class InputError(AiobatchError, ValueError):
    """The caller's input is bad (a request line, a request object); nothing was sent for it.

    The caller's fault, and never retried.
    """


class PreflightError(InputError):
    """Input lines failed the checks aiobatch runs before anything is uploaded.

    Every line of the source was checked, so ``problems`` lists all that is wrong, not
    just the first thing; no file was uploaded and no batch was created. The message
    (written by the checker) gives the count and the first few problems.

    Attributes:
        problems: the problems kept, in source order (each a ``LineProblem`` with
            ``source``, ``line``, ``custom_id``, ``field``, ``code`` and ``message``);
            at most the checker's ``max_kept_problems`` of them.
        count: how many problems there were in all (may exceed ``len(problems)``).
        source: the file path as given, or ``"<requests>"`` for an iterable source.
    """

    def __init__(self, message: str, *, problems: tuple[Any, ...], count: int, source: str) -> None:
        super().__init__(message)
        self.problems = problems
        self.count = count
        self.source = source


class JournalError(AiobatchError):
    """A run's journal cannot be used: it is missing, not a journal, of another schema
    version, held by another running process, made for another input, or damaged (its
    message then lists the batches that can still be read from it, and what to do). The
    message says which; the journal itself is left untouched."""


class LeaseLostError(JournalError):
    """A worker's lease on a shard of a shared run (PostgreSQL journal) ran out or was
    taken by another worker: this worker stops acting on the shard at once, and nothing
    was written. The worker holding the lease now carries the shard on.

    Attributes:
        shard: the shard's key.
    """

    def __init__(self, message: str, *, shard: str) -> None:
        super().__init__(message)
        self.shard = shard


class RunError(AiobatchError):
    """A run cannot go on: a step kept failing after its retries, or the server refused
    the credentials. Everything done so far is in the journal: fix the cause and start
    the run again with the same journal to continue it."""


class LeaseExpiredError(RunError):
    """A worker of a shared run (PostgreSQL journal) could not renew its leases for half
    the lease time (the database out of reach, or too slow to answer): it may no longer
    hold its shards, so it sends no further request to the provider and stops, and its
    leases lapse; another worker (or this one, started again) adopts its shards, looking
    up what it may have sent, so no batch is made twice."""


class TooManyBatchesError(RunError):
    """A run stopped before sending a request in more batches than
    ``RunConfig.max_batches_per_request`` allows: the server kept failing the batches
    in a way that spends no retry round (see the run's warnings for its errors). Nothing
    more was created; the journal is intact: look into the server's errors, then run
    again with a higher limit (or a fixed input and a new journal).

    Attributes:
        custom_id: the request that would have gone into one batch too many.
        batches: the batches it would have been in.
        limit: the limit in force.
    """

    def __init__(self, message: str, *, custom_id: str, batches: int, limit: int) -> None:
        super().__init__(message)
        self.custom_id = custom_id
        self.batches = batches
        self.limit = limit


class StepFailedError(RunError):
    """A step of a run (an upload, a create, a lookup, a collection) kept failing, and
    the run gave up: the step had failed for ``RunConfig.give_up_after`` seconds in a
    row (or ``max_step_failures`` times). The journal is intact: run again to continue.

    Attributes:
        step: what failed (``"shard s000001 (planned)"``, ``"collecting shard s000002"``).
        attempts: the failed attempts in a row (each one with the client's own retries).
        elapsed: seconds from the start of the first failed attempt to the give-up.
        cause: the last failure (also ``__cause__``).
    """

    def __init__(
        self, message: str, *, step: str, attempts: int, elapsed: float, cause: BaseException
    ) -> None:
        super().__init__(message)
        self.step = step
        self.attempts = attempts
        self.elapsed = elapsed
        self.cause = cause


class UnreachableError(StepFailedError):
    """The server could not be reached at all before it ever answered the run: its name
    does not resolve, the connection was refused or timed out. The run stopped after
    ``RunConfig.unreachable_after`` seconds. Check the base URL and the network.

    Attributes:
        host: the host (and port, when the URL names one) that could not be reached.
        reason: why, in plain words (``"name does not resolve"``, ``"connection
            refused"``...).
    """

    def __init__(
        self,
        message: str,
        *,
        host: str,
        reason: str,
        step: str,
        attempts: int,
        elapsed: float,
        cause: BaseException,
    ) -> None:
        super().__init__(message, step=step, attempts=attempts, elapsed=elapsed, cause=cause)
        self.host = host
        self.reason = reason


class WebhookError(AiobatchError):
    """A webhook delivery was refused: it is not acted on. The sender's fault (or an
    attacker's); the message never contains a secret.

    Attributes:
        webhook_id: the delivery's ``webhook-id`` header, when it had one.
    """

    def __init__(self, message: str, *, webhook_id: str | None = None) -> None:
        super().__init__(message)
        self.webhook_id = webhook_id


class WebhookHeaderError(WebhookError):
    """A Standard Webhooks header (``webhook-id``, ``webhook-timestamp``,
    ``webhook-signature``) is missing, empty or unreadable: the delivery is unsigned."""


class WebhookTimestampError(WebhookError):
    """The delivery's ``webhook-timestamp`` is further from now than the tolerance: an
    old delivery replayed, or one dated in the future.

    Attributes:
        timestamp: the delivery's timestamp (Unix seconds).
        now: the receiver's time (its clock's wall time).
        tolerance: the largest difference accepted, in seconds.
    """

    def __init__(
        self, message: str, *, webhook_id: str | None, timestamp: int, now: float, tolerance: float
    ) -> None:
        super().__init__(message, webhook_id=webhook_id)
        self.timestamp = timestamp
        self.now = now
        self.tolerance = tolerance


class WebhookSignatureError(WebhookError):
    """No signature of the delivery matches any of the secrets: it was forged, its body
    or headers were changed on the way, or it was signed with another secret."""


class WebhookPayloadError(WebhookError):
    """A correctly signed body is not an event: not JSON, or without a string ``id``
    and ``type``, an integer ``created_at`` or an object ``data``."""


class RequestFailedError(APIStatusError):
    """A request sent through a batch (:class:`aiobatch.BatchedOpenAI`) came back with
    an HTTP error line: the same facts the official SDK's ``APIStatusError`` carries
    (``status_code``, ``error_code``, ``error_type``, ``error_param``, ``message``,
    ``request_id``, ``body``), plus where it came from.

    Attributes:
        custom_id: the request's key in its batch.
        batch_id: the batch whose line this was.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        custom_id: str,
        batch_id: str | None,
        request_id: str | None = None,
        body: Any = None,
        error_type: str | None = None,
        error_code: str | None = None,
        error_param: str | None = None,
        url: str = "",
    ) -> None:
        super().__init__(
            message,
            status_code=status_code,
            request_id=request_id,
            body=body,
            error_type=error_type,
            error_code=error_code,
            error_param=error_param,
            method="POST" if url else "",
            url=url,
        )
        self.custom_id = custom_id
        self.batch_id = batch_id


class RequestNotRunError(AiobatchError):
    """A request sent through a batch ended without a response (the error file's line,
    or aiobatch's own final error, such as a line the server never returned).

    Attributes:
        code: the line's error code (``batch_expired``, ``batch_cancelled``...), or None.
        message: the line's error message.
        custom_id: the request's key in its batch.
        batch_id: the batch the error is about, when there was one.
    """

    def __init__(
        self, message: str, *, code: str | None, custom_id: str, batch_id: str | None
    ) -> None:
        self.code = code
        self.message = message
        self.custom_id = custom_id
        self.batch_id = batch_id
        where = f" in batch {batch_id}" if batch_id else ""
        super().__init__(f"request {custom_id}{where} did not run ({code}): {message}")


class BatchEndedError(RequestNotRunError):
    """A request's batches expired or were cancelled (``batch_expired`` /
    ``batch_cancelled``) in every retry round the run allowed (``RunConfig.max_rounds``)."""
