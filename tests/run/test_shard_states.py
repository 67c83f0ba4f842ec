"""The shard lifecycle as data: the table of moves, and the journal refusing the rest."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from aiobatch._run._records import ShardPlan
from aiobatch._run._sqlite import JournalFile
from aiobatch._run._states import SHARD_MOVES, ShardState, allowed, mermaid_diagram
from aiobatch.errors import ShardMoveError, StateError

_S = ShardState

#: The moves a run makes, written out by hand from the lifecycle's description.
EXPECTED = {
    (_S.PLANNED, _S.UPLOADING),
    (_S.PLANNED, _S.CREATING),  # inline requests (Anthropic)
    (_S.UPLOADING, _S.UPLOADED),
    (_S.UPLOADED, _S.CREATING),
    (_S.CREATING, _S.OPEN),
    (_S.CREATING, _S.UPLOADED),
    (_S.CREATING, _S.PLANNED),
    (_S.CREATING, _S.COLLECTED),
    (_S.OPEN, _S.COLLECTING),
    (_S.OPEN, _S.UPLOADED),
    (_S.OPEN, _S.COLLECTED),
    (_S.COLLECTING, _S.COLLECTED),
}


def test_the_table_has_exactly_the_lifecycles_moves() -> None:
    """Every move of the shard lifecycle is in the table, and nothing else."""
    assert set(SHARD_MOVES) == EXPECTED
    assert all(why for why in SHARD_MOVES.values())


@pytest.mark.parametrize(("source", "target"), list(itertools.product(ShardState, ShardState)))
def test_allowed_answers_from_the_table(source: ShardState, target: ShardState) -> None:
    """allowed() is true exactly for the table's moves (a repeat is no move)."""
    assert allowed(source, target) == ((source, target) in EXPECTED)


def test_collected_is_final_and_every_state_is_reachable() -> None:
    """No move leaves ``collected``; every state is reached from ``planned``."""
    assert not [move for move in SHARD_MOVES if move[0] is _S.COLLECTED]
    seen, frontier = {_S.PLANNED}, [_S.PLANNED]
    while frontier:
        state = frontier.pop()
        for source, target in SHARD_MOVES:
            if source is state and target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen == set(ShardState)


def test_diagram_draws_each_move_with_its_cause() -> None:
    """The Mermaid diagram has one labelled arrow per move, a start and an end."""
    lines = mermaid_diagram().splitlines()
    for (source, target), why in SHARD_MOVES.items():
        assert f"    {source.value} --> {target.value}: {why}" in lines
    assert "    [*] --> planned" in lines
    assert "    collected --> [*]" in lines


def _journal_with_shard(tmp_path: Path) -> JournalFile:
    journal = JournalFile(tmp_path / "run.journal", create=True)
    journal.set_meta(run_id="r1", started_at="0", updated_at="0", state="running")
    with journal.transaction() as db:
        db.execute(
            "INSERT INTO requests (seq, custom_id, line, url, model, tokens, inputs, data) "
            "VALUES (0, 'a', 1, '/v1/chat/completions', 'm', 1, 1, x'7b7d')"
        )
    journal.add_shard("s000000", ShardPlan("/v1/chat/completions", "m", (0,), 3, 1), planned_at=0)
    return journal


@pytest.mark.parametrize(
    "path",
    [
        [_S.UPLOADED],
        [_S.UPLOADING, _S.CREATING],
        [_S.UPLOADING, _S.UPLOADED, _S.OPEN],
        [_S.UPLOADING, _S.UPLOADED, _S.CREATING, _S.OPEN, _S.PLANNED],
        [_S.UPLOADING, _S.UPLOADED, _S.CREATING, _S.COLLECTED, _S.PLANNED],
    ],
)
def test_journal_refuses_a_move_the_table_lacks(tmp_path: Path, path: list[ShardState]) -> None:
    """A move not in the table raises ShardMoveError naming shard, from and to, and
    writes nothing."""
    journal = _journal_with_shard(tmp_path)
    *allowed_moves, bad = path
    for state in allowed_moves:
        journal.move("s000000", state)
    before = journal.shard("s000000")
    with pytest.raises(ShardMoveError) as caught:
        journal.move("s000000", bad, batch_id="batch_x")
    error = caught.value
    assert isinstance(error, StateError)
    assert (error.shard, error.source, error.target) == ("s000000", before.state.value, bad.value)
    assert "s000000" in str(error)
    assert before.state.value in str(error)
    assert bad.value in str(error)
    assert journal.shard("s000000") == before
    journal.close()


def test_journal_refuses_a_state_change_outside_move(tmp_path: Path) -> None:
    """update() sets fields but never the state: that goes through move()."""
    journal = _journal_with_shard(tmp_path)
    with pytest.raises(ValueError, match="move"):
        journal.update("s000000", state="open")
    assert journal.shard("s000000").state is _S.PLANNED
    journal.close()
