"""The shard lifecycle as data: states, the moves between them, and why each is made.

A *shard* is one batch-to-be of a run: a set of requests recorded in the journal before
anything is sent. Its state says how far its submission and collection have come, and
every change of state goes through the journal's ``move``, which refuses a move this
table does not allow (:class:`~aiobatch.errors.ShardMoveError`, naming the shard, where
it was and where it was sent). Everything that decides a shard's next state lives in
the run's steps; this module only says which moves exist. No IO, no clock.

The forward path::

    planned -> uploading -> uploaded -> creating -> open -> collecting -> collected

(with requests inline in the create, as on Anthropic: ``planned -> creating -> open``),

and the moves back, each with its cause:

- ``creating -> planned``: the batch's input file is gone (the create answered 404):
  the shard is uploaded again; or, with inline requests, the create was proved not
  made: it is created again;
- ``creating -> uploaded``: the create was proved not made (refused as a whole, or a
  lost create looked up and proved absent): it is created again;
- ``open -> uploaded``: the batch failed with ``token_limit_exceeded``: it is created
  again from the same file, later;
- ``creating -> collected``: the server refused the create (400/422): every request
  ends with ``batch_create_rejected``;
- ``open -> collected``: the batch ended without files to read (it is gone, or its
  re-creates are spent), so its requests are settled at once.

:func:`mermaid_diagram` draws the table; README.md carries the diagram, and a test keeps
the two equal.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

__all__ = [
    "SHARD_MOVES",
    "ShardState",
    "allowed",
    "mermaid_diagram",
]


class ShardState(str, enum.Enum):
    """Where a shard is (the journal stores the value)."""

    #: its requests are recorded (the intent); nothing is sent yet
    PLANNED = "planned"
    #: its input file may have been sent (an upload was started)
    UPLOADING = "uploading"
    #: its input file is on the server (its id is recorded)
    UPLOADED = "uploaded"
    #: its create key is recorded, and a create may have been sent
    CREATING = "creating"
    #: its batch id is recorded, and the batch is tracked
    OPEN = "open"
    #: its batch ended, and its result files are being read
    COLLECTING = "collecting"
    #: every one of its requests has its final result, or waits for a retry round
    COLLECTED = "collected"

    def __str__(self) -> str:
        return self.value


_S = ShardState

#: Every allowed move, ``(from, to) -> why``. A state not listed as a source has no move
#: out of it (``collected`` is final).
SHARD_MOVES: Mapping[tuple[ShardState, ShardState], str] = MappingProxyType(
    {
        (_S.PLANNED, _S.UPLOADING): "upload started",
        (_S.PLANNED, _S.CREATING): "create key recorded (inline requests)",
        (_S.UPLOADING, _S.UPLOADED): "file id recorded",
        (_S.UPLOADED, _S.CREATING): "create key recorded",
        (_S.CREATING, _S.OPEN): "batch id recorded",
        (_S.CREATING, _S.UPLOADED): "create proved not made",
        (_S.CREATING, _S.PLANNED): "input file gone",
        (_S.CREATING, _S.COLLECTED): "create refused",
        (_S.OPEN, _S.COLLECTING): "batch ended",
        (_S.OPEN, _S.UPLOADED): "token limit: create again",
        (_S.OPEN, _S.COLLECTED): "batch gone or re-creates spent",
        (_S.COLLECTING, _S.COLLECTED): "results read",
    }
)

#: Where a shard sits when nothing has happened to it yet.
INITIAL = ShardState.PLANNED
#: The states a shard's submission step works on (before its batch is open).
SUBMITTING = frozenset({_S.PLANNED, _S.UPLOADING, _S.UPLOADED, _S.CREATING})
#: The states in which a shard's requests are settled (nothing more happens to it).
FINAL = frozenset({_S.COLLECTED})


def allowed(source: ShardState, target: ShardState) -> bool:
    """Whether the table has the move ``source -> target``."""
    return (source, target) in SHARD_MOVES


def mermaid_diagram() -> str:
    """The table as a Mermaid state diagram (README.md carries it)."""
    lines = ["stateDiagram-v2", f"    [*] --> {INITIAL.value}"]
    for (source, target), why in SHARD_MOVES.items():
        lines.append(f"    {source.value} --> {target.value}: {why}")
    lines.extend(f"    {state.value} --> [*]" for state in ShardState if state in FINAL)
    return "\n".join(lines)
