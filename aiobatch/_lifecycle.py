"""The batch lifecycle as data, and a pure object that checks observations against it.

Theory of operation
-------------------
The server owns a batch's status; we only *observe* it, by polling. Between two polls a
batch may pass through several statuses (``validating`` and then ``completed``), so an
observation is legal when the observed status is *reachable* from the current one
through the transition table, not only when it is one step away. Seeing the same status
again is a no-op. Anything else (a move backwards, a move out of a terminal status) is
the server's fault and raises :class:`~aiobatch.errors.UnexpectedTransitionError`,
leaving the machine as it was.

A cancel is a *local* request: it does not change the status (the server does that when
it answers ``cancelling``), it only records that we asked. A batch may still finish as
``completed``, ``failed`` or ``expired`` after we asked: the request can race the end of
processing. Asking to cancel a batch that has already finished is the caller's fault and
raises :class:`~aiobatch.errors.InvalidTransitionError`.

This module owns every transition rule. It does no IO, knows no clock and imports no
asyncio: :data:`TRANSITIONS` is plain data, and the diagram in the README is generated
from it (``aiobatch diagram`` prints it).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import attrs

from .errors import InvalidTransitionError, UnexpectedTransitionError, UnknownStatusError

__all__ = [
    "ACTIVE",
    "KNOWN",
    "MEANINGS",
    "REACHABLE",
    "TERMINAL",
    "TRANSITIONS",
    "BatchLifecycle",
    "BatchStatus",
    "Transition",
    "mermaid_diagram",
    "parse_status_aliases",
]


class BatchStatus(str, enum.Enum):
    """Every status a batch can have; the values are the wire strings."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    #: Portkey-managed batching: uploading the input file to the provider failed.
    FILE_UPLOAD_FAILED = "file_upload_failed"
    #: Portkey-managed batching: the provider refused to start the batch job.
    BATCH_START_FAILED = "batch_start_failed"
    #: A status string this version of aiobatch does not know. It is never a state of
    #: the machine: a :class:`~aiobatch.Batch` decoded with it keeps the server's string
    #: in ``raw_status``, and :meth:`BatchLifecycle.observe` raises
    #: :class:`~aiobatch.errors.UnknownStatusError` for it, so one odd batch in a list
    #: never breaks the list, yet tracking that batch is never silently wrong.
    UNKNOWN = "unknown"

    @property
    def is_terminal(self) -> bool:
        """Whether the batch can never change again."""
        return self in TERMINAL

    @property
    def meaning(self) -> str:
        """What the status means for the batch and its requests (see :data:`MEANINGS`)."""
        return MEANINGS[self]

    @classmethod
    def parse(cls, value: object) -> BatchStatus:
        """Return the status for a wire string.

        Raises:
            UnknownStatusError: the value is not a status we know.
        """
        if isinstance(value, cls) and value is not BatchStatus.UNKNOWN:
            return value
        if isinstance(value, str) and not isinstance(value, cls):
            try:
                return _BY_VALUE[value]
            except KeyError:
                pass
        raise UnknownStatusError(value.value if isinstance(value, cls) else value)

    def __str__(self) -> str:
        return self.value


_BY_VALUE: Mapping[str, BatchStatus] = {s.value: s for s in BatchStatus if s.value != "unknown"}

_S = BatchStatus

#: The statuses a batch never leaves.
TERMINAL: frozenset[BatchStatus] = frozenset(
    {
        _S.COMPLETED,
        _S.FAILED,
        _S.EXPIRED,
        _S.CANCELLED,
        _S.FILE_UPLOAD_FAILED,
        _S.BATCH_START_FAILED,
    }
)

#: What each status means, in one sentence: the table behind :attr:`BatchStatus.meaning`
#: and :attr:`Batch.outcome <aiobatch.Batch.outcome>`.
#:
#: ``file_upload_failed`` and ``batch_start_failed`` come from Portkey-managed batching
#: only (Portkey holds the file and submits the job to the provider itself,
#: reference/batch-api.md §3.3). Both are terminal and end the batch before any request
#: ran: there is no output and nothing was billed, and the same input can be submitted
#: again in a new batch.
MEANINGS: Mapping[BatchStatus, str] = {
    _S.VALIDATING: "the input file is being validated; no request has run yet",
    _S.FAILED: "the input failed validation (see errors); no request ran",
    _S.IN_PROGRESS: "the requests are running",
    _S.FINALIZING: "every request is done; the result files are being written",
    _S.COMPLETED: ("finished: successes are in the output file, failed requests in the error file"),
    _S.EXPIRED: (
        "the completion window ended first: finished requests are in the output file, "
        "the rest in the error file as batch_expired"
    ),
    _S.CANCELLING: "a cancel was accepted; requests in flight are draining",
    _S.CANCELLED: ("cancelled: requests that finished are in the output file, the rest never ran"),
    _S.FILE_UPLOAD_FAILED: (
        "Portkey validated the input but could not upload it to the provider; no request "
        "ran and nothing was billed: submit the input again"
    ),
    _S.BATCH_START_FAILED: (
        "Portkey uploaded the input but the provider refused to start the batch job; no "
        "request ran and nothing was billed: submit the input again"
    ),
    _S.UNKNOWN: "a status this version of aiobatch does not know (see Batch.raw_status)",
}

#: Every status of the machine (all but UNKNOWN).
KNOWN: frozenset[BatchStatus] = frozenset(_BY_VALUE.values())

#: The statuses in which a batch still changes.
ACTIVE: frozenset[BatchStatus] = KNOWN - TERMINAL

#: Direct moves the server may make, status -> statuses one step away.
#:
#: The documented graph (reference/batch-api.md §1.8) plus the moves a tolerant client
#: must accept because the documentation is silent and real servers make them:
#: a batch may expire or be cancelled in any active status, ``in_progress`` and
#: ``finalizing`` may fail, a ``cancelling`` batch may still end as completed, failed or
#: expired (the cancel raced the end), and Portkey's two failure statuses end a
#: batch that Portkey was still validating or starting.
TRANSITIONS: Mapping[BatchStatus, frozenset[BatchStatus]] = {
    _S.VALIDATING: frozenset(
        {
            _S.IN_PROGRESS,
            _S.FAILED,
            _S.CANCELLING,
            _S.EXPIRED,
            _S.FILE_UPLOAD_FAILED,
            _S.BATCH_START_FAILED,
        }
    ),
    _S.IN_PROGRESS: frozenset(
        {
            _S.FINALIZING,
            _S.EXPIRED,
            _S.CANCELLING,
            _S.FAILED,
            _S.FILE_UPLOAD_FAILED,
            _S.BATCH_START_FAILED,
        }
    ),
    _S.FINALIZING: frozenset({_S.COMPLETED, _S.EXPIRED, _S.FAILED, _S.CANCELLING}),
    _S.CANCELLING: frozenset({_S.CANCELLED, _S.COMPLETED, _S.FAILED, _S.EXPIRED}),
    _S.COMPLETED: frozenset(),
    _S.FAILED: frozenset(),
    _S.EXPIRED: frozenset(),
    _S.CANCELLED: frozenset(),
    _S.FILE_UPLOAD_FAILED: frozenset(),
    _S.BATCH_START_FAILED: frozenset(),
}


def _closure(
    table: Mapping[BatchStatus, frozenset[BatchStatus]],
) -> dict[BatchStatus, frozenset[BatchStatus]]:
    reachable: dict[BatchStatus, frozenset[BatchStatus]] = {}
    for start in table:
        seen: set[BatchStatus] = set()
        todo = list(table[start])
        while todo:
            nxt = todo.pop()
            if nxt not in seen:
                seen.add(nxt)
                todo.extend(table[nxt])
        reachable[start] = frozenset(seen)
    return reachable


#: Statuses reachable in one or more moves, status -> statuses. Computed from TRANSITIONS.
REACHABLE: Mapping[BatchStatus, frozenset[BatchStatus]] = _closure(TRANSITIONS)


def parse_status_aliases(aliases: Mapping[str, BatchStatus | str]) -> dict[str, BatchStatus]:
    """Check a user's ``status_aliases``: server status strings aiobatch does not know,
    each mapped to the status it stands for.

    Returns:
        The mapping with each target as a :class:`BatchStatus`.

    Raises:
        ValueError: a key is not a non-empty string, or a target is not a status of the
            machine (the error lists them).
    """
    parsed: dict[str, BatchStatus] = {}
    for raw, target in aliases.items():
        if not isinstance(raw, str) or not raw:
            raise ValueError(f"status_aliases: a key must be a non-empty string, got {raw!r}")
        try:
            parsed[raw] = BatchStatus.parse(target)
        except UnknownStatusError:
            names = ", ".join(s.value for s in BatchStatus if s in KNOWN)
            raise ValueError(
                f"status_aliases: {raw!r} maps to {target!r}, which is not a status of "
                f"aiobatch (one of: {names})"
            ) from None
    return parsed


@attrs.frozen
class Transition:
    """One accepted change of status."""

    previous: BatchStatus
    current: BatchStatus

    @property
    def skipped(self) -> bool:
        """Whether the batch passed through statuses we did not see."""
        return self.current not in TRANSITIONS[self.previous]


def _parse_status(value: BatchStatus | str) -> BatchStatus:
    return BatchStatus.parse(value)


@attrs.define
class BatchLifecycle:
    """The status of one batch as we have observed it.

    Args:
        status: the status first seen (``validating`` right after create).
        batch_id: used in error messages only.
    """

    status: BatchStatus = attrs.field(default=BatchStatus.VALIDATING, converter=_parse_status)
    batch_id: str | None = None
    cancel_requested: bool = False

    @property
    def is_terminal(self) -> bool:
        """Whether the batch has finished."""
        return self.status in TERMINAL

    def observe(self, observed: BatchStatus | str) -> Transition | None:
        """Accept a status reported by the server.

        Returns:
            The transition, or None when the status did not change.

        Raises:
            UnknownStatusError: the status string is not one we know (the error names
                ``batch_id`` and how to map the status).
            UnexpectedTransitionError: the batch cannot reach that status from its
                current one; the state is left unchanged.
        """
        try:
            new = BatchStatus.parse(observed)
        except UnknownStatusError as exc:
            if self.batch_id is None:
                raise
            raise UnknownStatusError(exc.value, batch_id=self.batch_id) from None
        old = self.status
        if new is old:
            return None
        if new not in REACHABLE[old]:
            who = f"batch {self.batch_id}" if self.batch_id else "a batch"
            why = "it has already finished" if old in TERMINAL else "that is a move backwards"
            raise UnexpectedTransitionError(
                f"the server reported {who} as {new.value!r} after {old.value!r}, "
                f"which is impossible ({why}); the server is at fault",
                batch_id=self.batch_id,
                current=old.value,
                observed=new.value,
            )
        self.status = new
        return Transition(old, new)

    def request_cancel(self) -> None:
        """Record that we asked the server to cancel this batch.

        Raises:
            InvalidTransitionError: the batch has already finished.
        """
        if self.status in TERMINAL:
            who = f"batch {self.batch_id}" if self.batch_id else "the batch"
            raise InvalidTransitionError(
                f"cannot cancel {who}: it has already finished as {self.status.value!r}"
            )
        self.cancel_requested = True


def mermaid_diagram() -> str:
    """Return the transition table as a Mermaid state diagram."""
    lines = ["stateDiagram-v2", "    [*] --> validating"]
    for source, targets in TRANSITIONS.items():
        for target in sorted(targets, key=list(BatchStatus).index):
            lines.append(f"    {source.value} --> {target.value}")
    for status in sorted(TERMINAL, key=list(BatchStatus).index):
        lines.append(f"    {status.value} --> [*]")
    return "\n".join(lines)
