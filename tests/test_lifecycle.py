"""The batch lifecycle state machine: the table, the observer, and a stateful model."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from aiobatch._lifecycle import (
    ACTIVE,
    KNOWN,
    REACHABLE,
    TERMINAL,
    TRANSITIONS,
    BatchLifecycle,
    BatchStatus,
    mermaid_diagram,
)
from aiobatch.errors import (
    DecodeError,
    InvalidTransitionError,
    StateError,
    UnexpectedTransitionError,
    UnknownStatusError,
)

S = BatchStatus
ALL = [s for s in BatchStatus if s is not S.UNKNOWN]

# An oracle written by hand, independent of TRANSITIONS: every status a batch can be seen
# in after each status (the closure the table must produce). "Finished" statuses can
# follow any active one (a batch may expire, fail or be cancelled at any time; a
# cancel may lose the race with the end); nothing follows a finished one; and no active
# status follows one that comes later in validating -> in_progress -> finalizing,
# nor follows cancelling.
_PORTKEY = {S.FILE_UPLOAD_FAILED, S.BATCH_START_FAILED}
EXPECTED_REACHABLE: dict[BatchStatus, set[BatchStatus]] = {
    S.VALIDATING: {S.IN_PROGRESS, S.FINALIZING, S.CANCELLING, S.COMPLETED, S.FAILED,
                   S.EXPIRED, S.CANCELLED} | _PORTKEY,
    S.IN_PROGRESS: {S.FINALIZING, S.CANCELLING, S.COMPLETED, S.FAILED, S.EXPIRED,
                    S.CANCELLED} | _PORTKEY,
    S.FINALIZING: {S.CANCELLING, S.COMPLETED, S.FAILED, S.EXPIRED, S.CANCELLED},
    S.CANCELLING: {S.CANCELLED, S.COMPLETED, S.FAILED, S.EXPIRED},
    S.COMPLETED: set(),
    S.FAILED: set(),
    S.EXPIRED: set(),
    S.CANCELLED: set(),
    S.FILE_UPLOAD_FAILED: set(),
    S.BATCH_START_FAILED: set(),
}  # fmt: skip

# The documented graph (reference/batch-api.md §1.8): every edge must be in the table.
DOCUMENTED_EDGES = {
    (S.VALIDATING, S.FAILED),
    (S.VALIDATING, S.IN_PROGRESS),
    (S.IN_PROGRESS, S.FINALIZING),
    (S.FINALIZING, S.COMPLETED),
    (S.IN_PROGRESS, S.EXPIRED),
    (S.VALIDATING, S.CANCELLING),
    (S.IN_PROGRESS, S.CANCELLING),
    (S.CANCELLING, S.CANCELLED),
    (S.VALIDATING, S.FILE_UPLOAD_FAILED),
    (S.VALIDATING, S.BATCH_START_FAILED),
}


def test_status_values_are_the_wire_strings() -> None:
    """Every status of the OpenAI enum and Portkey's two extra ones exist, by wire value."""
    assert {s.value for s in KNOWN} == {
        "validating",
        "failed",
        "in_progress",
        "finalizing",
        "completed",
        "expired",
        "cancelling",
        "cancelled",
        "file_upload_failed",
        "batch_start_failed",
    }


def test_terminal_set() -> None:
    """Exactly the finished statuses are terminal, and terminal statuses have no way out."""
    assert {s.value for s in TERMINAL} == {
        "completed",
        "failed",
        "expired",
        "cancelled",
        "file_upload_failed",
        "batch_start_failed",
    }
    assert ACTIVE | TERMINAL == KNOWN == set(ALL)
    assert not ACTIVE & TERMINAL
    assert S.UNKNOWN not in KNOWN
    for status in TERMINAL:
        assert TRANSITIONS[status] == frozenset()
        assert REACHABLE[status] == frozenset()


def test_table_covers_every_status_and_the_documented_graph() -> None:
    """The table has a row for every status and contains every documented edge."""
    assert set(TRANSITIONS) == KNOWN
    edges = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert edges >= DOCUMENTED_EDGES


def test_reachability_matches_the_hand_written_oracle() -> None:
    """The closure of the table is exactly the reachability written out by hand."""
    assert {k: set(v) for k, v in REACHABLE.items()} == EXPECTED_REACHABLE


def test_every_active_status_can_finish() -> None:
    """From every active status some terminal status is reachable, and none reaches itself."""
    for status in ACTIVE:
        assert REACHABLE[status] & TERMINAL
        assert status not in REACHABLE[status]


@pytest.mark.parametrize(("start", "observed"), list(itertools.product(ALL, ALL)))
def test_observe_every_pair(start: BatchStatus, observed: BatchStatus) -> None:
    """Each (current, observed) pair is a no-op, an accepted move, or a server-fault error."""
    machine = BatchLifecycle(start, batch_id="batch_x")
    if observed is start:
        assert machine.observe(observed.value) is None
        assert machine.status is start
    elif observed in EXPECTED_REACHABLE[start]:
        transition = machine.observe(observed.value)
        assert transition is not None
        assert (transition.previous, transition.current) == (start, observed)
        assert transition.skipped == (observed not in TRANSITIONS[start])
        assert machine.status is observed
    else:
        with pytest.raises(UnexpectedTransitionError) as info:
            machine.observe(observed)
        assert machine.status is start
        assert info.value.current == start.value
        assert info.value.observed == observed.value
        assert info.value.batch_id == "batch_x"
        assert "server" in str(info.value)


def test_skipping_states_between_polls_is_accepted() -> None:
    """A batch seen validating and then completed passed through states we never saw."""
    machine = BatchLifecycle()
    transition = machine.observe("completed")
    assert transition is not None
    assert transition.skipped
    assert machine.is_terminal


def test_backwards_move_is_rejected() -> None:
    """in_progress after finalizing is a move backwards: rejected, state unchanged."""
    machine = BatchLifecycle(S.FINALIZING)
    with pytest.raises(UnexpectedTransitionError, match="backwards"):
        machine.observe("in_progress")
    assert machine.status is S.FINALIZING


def test_move_out_of_terminal_is_rejected() -> None:
    """A completed batch reported as cancelled is the server's fault."""
    machine = BatchLifecycle(S.COMPLETED)
    with pytest.raises(UnexpectedTransitionError, match="already finished"):
        machine.observe(S.CANCELLED)
    assert machine.status is S.COMPLETED


@pytest.mark.parametrize(
    "value", ["Validating", "done", "", "submitted", "unknown", S.UNKNOWN, 3, None, ["completed"]]
)
def test_unknown_status_is_a_typed_error(value: object) -> None:
    """An unknown status raises UnknownStatusError (a StateError and a DecodeError)."""
    machine = BatchLifecycle(S.IN_PROGRESS)
    with pytest.raises(UnknownStatusError) as info:
        machine.observe(value)  # type: ignore[arg-type]
    assert isinstance(info.value, StateError)
    assert isinstance(info.value, DecodeError)
    assert info.value.value == (value.value if isinstance(value, S) else value)
    assert machine.status is S.IN_PROGRESS


def test_machine_is_built_from_wire_strings_and_refuses_unknown() -> None:
    """BatchLifecycle parses a wire string as its start status and rejects unknown ones."""
    assert BatchLifecycle("in_progress").status is S.IN_PROGRESS  # type: ignore[arg-type]
    with pytest.raises(UnknownStatusError):
        BatchLifecycle("scheduled")  # type: ignore[arg-type]
    with pytest.raises(UnknownStatusError):
        BatchLifecycle(S.UNKNOWN)


def test_cancel_request_is_local_and_the_batch_may_still_finish() -> None:
    """Asking to cancel keeps the status; the batch may still complete or fail afterwards."""
    for final in (S.COMPLETED, S.FAILED, S.CANCELLED, S.EXPIRED):
        machine = BatchLifecycle(S.IN_PROGRESS)
        machine.request_cancel()
        assert machine.cancel_requested
        assert machine.status is S.IN_PROGRESS
        machine.observe(final)
        assert machine.status is final


@pytest.mark.parametrize("status", sorted(TERMINAL, key=ALL.index))
def test_cancel_of_a_finished_batch_is_the_callers_fault(status: BatchStatus) -> None:
    """request_cancel on a terminal batch raises InvalidTransitionError and changes nothing."""
    machine = BatchLifecycle(status, batch_id="batch_y")
    with pytest.raises(InvalidTransitionError, match="batch_y"):
        machine.request_cancel()
    assert not machine.cancel_requested
    assert machine.status is status


def test_diagram_is_generated_from_the_table() -> None:
    """The Mermaid diagram has one arrow per table edge plus start and end markers."""
    diagram = mermaid_diagram()
    for source, targets in TRANSITIONS.items():
        for target in targets:
            assert f"    {source.value} --> {target.value}" in diagram.splitlines()
    arrows = [line for line in diagram.splitlines() if "-->" in line]
    edge_count = sum(len(t) for t in TRANSITIONS.values())
    assert len(arrows) == edge_count + 1 + len(TERMINAL)


@given(st.lists(st.sampled_from(ALL), max_size=30))
def test_any_sequence_of_observations_only_moves_forward(seq: list[BatchStatus]) -> None:
    """Whatever the server reports, accepted statuses form a path in the table's closure."""
    machine = BatchLifecycle()
    accepted = [machine.status]
    for observed in seq:
        try:
            machine.observe(observed)
        except UnexpectedTransitionError:
            assert machine.status is accepted[-1]
            continue
        if machine.status is not accepted[-1]:
            assert machine.status in EXPECTED_REACHABLE[accepted[-1]]
            accepted.append(machine.status)
    assert len(accepted) == len(set(accepted))


class LifecycleModel(RuleBasedStateMachine):
    """A stateful model: the machine agrees with a set-based oracle on every step."""

    def __init__(self) -> None:
        super().__init__()
        self.machine = BatchLifecycle()
        self.history = [S.VALIDATING]
        self.cancel_asked = False

    @rule(observed=st.sampled_from(ALL))
    def observe(self, observed: BatchStatus) -> None:
        """Observe a status; the oracle predicts accept, no-op or reject."""
        before = self.machine.status
        if observed is before:
            assert self.machine.observe(observed) is None
        elif observed in EXPECTED_REACHABLE[before]:
            self.machine.observe(observed)
            self.history.append(observed)
        else:
            with pytest.raises(UnexpectedTransitionError):
                self.machine.observe(observed)

    @rule()
    def cancel(self) -> None:
        """Ask to cancel; allowed exactly while the batch is active."""
        if self.machine.status in TERMINAL:
            with pytest.raises(InvalidTransitionError):
                self.machine.request_cancel()
        else:
            self.machine.request_cancel()
            self.cancel_asked = True

    @invariant()
    def consistent(self) -> None:
        """The status is the last accepted one and the cancel flag is sticky."""
        assert self.machine.status is self.history[-1]
        assert self.machine.cancel_requested == self.cancel_asked
        assert self.machine.is_terminal == (self.machine.status in TERMINAL)


TestLifecycleModel = LifecycleModel.TestCase


def test_unknown_status_of_a_known_batch_names_it_and_how_to_map_it() -> None:
    """A machine with a batch id raises an UnknownStatusError naming that batch, the
    status and status_aliases; its state is left as it was."""
    machine = BatchLifecycle(S.IN_PROGRESS, batch_id="batch_7")
    with pytest.raises(UnknownStatusError) as info:
        machine.observe("succeeded")
    assert (info.value.value, info.value.batch_id) == ("succeeded", "batch_7")
    assert "batch batch_7 reports status 'succeeded'" in str(info.value)
    assert "status_aliases={'succeeded': STATUS}" in str(info.value)
    assert machine.status is S.IN_PROGRESS
