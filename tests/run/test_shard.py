"""plan_shards and IngestPlanner: requests grouped by (url, model), cut within every limit."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiobatch._run._planning import IngestPlanner, ShardLimits, plan_shards
from aiobatch._run._records import PreparedRequest, RequestRow, ShardPlan


def shard_item(
    seq: int, url: str, model: str | None, size: int, tokens: int, inputs: int = 1
) -> PreparedRequest:
    """A prepared request as planning reads it back from the journal (no bytes)."""
    return PreparedRequest(seq=seq, url=url, model=model, size=size, tokens=tokens, inputs=inputs)


CHAT = "/v1/chat/completions"
EMBED = "/v1/embeddings"


def items(
    count: int, *, url: str = CHAT, model: str | None = "m", size: int = 10, tokens: int = 1
) -> list[PreparedRequest]:
    """``count`` alike items with seqs 0..count-1."""
    return [shard_item(seq, url, model, size, tokens) for seq in range(count)]


def seqs(plans: list[ShardPlan]) -> list[tuple[int, ...]]:
    """The seqs of each shard."""
    return [plan.seqs for plan in plans]


def plan(shard_items: list[PreparedRequest], **limits: Any) -> list[ShardPlan]:
    """All shards, with generous defaults for the limits not given."""
    options: dict[str, Any] = {"max_lines": 1000, "max_bytes": 10**9, **limits}
    return list(plan_shards(shard_items, **options))


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        pytest.param(1, [(0,)], id="one"),
        pytest.param(3, [(0, 1, 2)], id="exactly-the-limit"),
        pytest.param(4, [(0, 1, 2), (3,)], id="limit-plus-one"),
        pytest.param(7, [(0, 1, 2), (3, 4, 5), (6,)], id="several"),
    ],
)
def test_line_limit(count: int, expected: list[tuple[int, ...]]) -> None:
    """Exactly max_lines lines stay one shard; one more starts a second."""
    assert seqs(plan(items(count), max_lines=3)) == expected


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        pytest.param(4, [(0, 1, 2, 3)], id="exactly-the-limit"),
        pytest.param(5, [(0, 1, 2, 3), (4,)], id="limit-plus-one"),
    ],
)
def test_byte_limit(count: int, expected: list[tuple[int, ...]]) -> None:
    """Lines totalling exactly max_bytes stay one shard; one byte more splits."""
    plans = plan(items(count, size=25), max_bytes=100)
    assert seqs(plans) == expected
    assert plans[0].size == 100


def test_byte_limit_off_by_one_byte() -> None:
    """A shard one byte over max_bytes is split; one at max_bytes is not."""
    lines = [shard_item(0, CHAT, "m", 50, 1), shard_item(1, CHAT, "m", 51, 1)]
    assert seqs(plan(lines, max_bytes=101)) == [(0, 1)]
    assert seqs(plan(lines, max_bytes=100)) == [(0,), (1,)]


def test_token_limit() -> None:
    """With max_tokens, a shard holds at most that many estimated tokens; exactly the limit fits."""
    plans = plan(items(5, tokens=40), max_tokens=80)
    assert seqs(plans) == [(0, 1), (2, 3), (4,)]
    assert [p.tokens for p in plans] == [80, 80, 40]


def test_no_token_limit_by_default() -> None:
    """Without max_tokens, tokens do not split shards."""
    assert seqs(plan(items(3, tokens=10**9))) == [(0, 1, 2)]


def test_the_tightest_limit_wins() -> None:
    """Every limit applies at once: the first one reached closes the shard."""
    lines = [shard_item(seq, CHAT, "m", 10, 5) for seq in range(6)]
    assert seqs(plan(lines, max_lines=4, max_bytes=30, max_tokens=100)) == [(0, 1, 2), (3, 4, 5)]
    assert seqs(plan(lines, max_lines=2, max_bytes=30)) == [(0, 1), (2, 3), (4, 5)]
    assert seqs(plan(lines, max_lines=4, max_bytes=100, max_tokens=5)) == [(n,) for n in range(6)]


def test_oversize_item_gets_a_shard_of_its_own() -> None:
    """An item over max_bytes or max_tokens alone gets its own shard, between its neighbours'."""
    lines = [
        shard_item(0, CHAT, "m", 10, 1),
        shard_item(1, CHAT, "m", 500, 1),
        shard_item(2, CHAT, "m", 10, 1),
        shard_item(3, CHAT, "m", 10, 900),
        shard_item(4, CHAT, "m", 10, 1),
    ]
    plans = plan(lines, max_bytes=100, max_tokens=100)
    assert seqs(plans) == [(0,), (1,), (2,), (3,), (4,)]
    assert plans[1].size == 500
    assert plans[3].tokens == 900


def test_groups_by_url() -> None:
    """Requests for different urls never share a shard."""
    lines = [
        shard_item(0, CHAT, "m", 10, 1),
        shard_item(1, EMBED, "m", 10, 1),
        shard_item(2, CHAT, "m", 10, 1),
    ]
    plans = plan(lines)
    assert [(p.url, p.model, p.seqs) for p in plans] == [(CHAT, "m", (0, 2)), (EMBED, "m", (1,))]


def test_groups_by_model() -> None:
    """Requests for different models (None included) never share a shard."""
    lines = [
        shard_item(0, CHAT, "a", 10, 1),
        shard_item(1, CHAT, "b", 10, 1),
        shard_item(2, CHAT, None, 10, 1),
        shard_item(3, CHAT, "a", 10, 1),
        shard_item(4, CHAT, "b", 10, 1),
    ]
    plans = plan(lines)
    assert [(p.model, p.seqs) for p in plans] == [("a", (0, 3)), ("b", (1, 4)), (None, (2,))]


def test_order_is_preserved_within_a_group() -> None:
    """Within a group, shards take the requests in input order and come out in that order."""
    lines = [shard_item(seq, CHAT if seq % 3 else EMBED, "m", 10, 1) for seq in range(20)]
    plans = plan(lines, max_lines=4)
    chat = [seq for p in plans if p.url == CHAT for seq in p.seqs]
    embed = [seq for p in plans if p.url == EMBED for seq in p.seqs]
    assert chat == [seq for seq in range(20) if seq % 3]
    assert embed == [seq for seq in range(20) if not seq % 3]


def test_size_and_tokens_are_summed() -> None:
    """A shard's size, tokens and inputs are the sums over its requests."""
    lines = [shard_item(0, CHAT, "m", 7, 3), shard_item(1, CHAT, "m", 11, 5, inputs=4)]
    [shard] = plan(lines)
    assert shard == ShardPlan(CHAT, "m", (0, 1), 18, 8, 5)


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [((10, 20, 20), [(0, 1, 2)]), ((10, 20, 21), [(0, 1), (2,)]), ((60, 1), [(0,), (1,)])],
)
def test_max_inputs_cuts_embedding_shards(
    inputs: tuple[int, ...], expected: list[tuple[int, ...]]
) -> None:
    """Shards hold at most max_inputs inputs; a single larger request gets its own shard."""
    items = [shard_item(i, "/v1/embeddings", "e", 10, 1, inputs=n) for i, n in enumerate(inputs)]
    shards = list(plan_shards(items, max_lines=100, max_bytes=10_000, max_inputs=50))
    assert [s.seqs for s in shards] == expected


def test_full_shards_are_yielded_as_soon_as_they_fill() -> None:
    """A full shard comes out before the rest of the input is read (streaming)."""
    read: list[int] = []

    def source() -> Iterator[PreparedRequest]:
        for item in items(10):
            read.append(item.seq)
            yield item

    shards = plan_shards(source(), max_lines=3, max_bytes=10**9)
    assert next(shards).seqs == (0, 1, 2)
    assert read == [0, 1, 2]
    assert next(shards).seqs == (3, 4, 5)
    assert read == [0, 1, 2, 3, 4, 5]


def test_a_shard_is_yielded_when_the_next_item_does_not_fit() -> None:
    """A shard below its limits comes out as soon as its group's next request does not fit."""
    read: list[int] = []

    def source() -> Iterator[PreparedRequest]:
        for item in items(10, size=40):
            read.append(item.seq)
            yield item

    shards = plan_shards(source(), max_lines=100, max_bytes=100)
    assert next(shards).seqs == (0, 1)
    assert read == [0, 1, 2]


def test_open_shards_come_out_at_the_end_by_first_seq() -> None:
    """Shards still open at the end come out ordered by the seq of their first request."""
    lines = [
        shard_item(0, CHAT, "b", 10, 1),
        shard_item(1, CHAT, "a", 10, 1),
        shard_item(2, CHAT, "a", 10, 1),
        shard_item(3, CHAT, "a", 10, 1),
        shard_item(4, CHAT, "c", 10, 1),
    ]
    plans = plan(lines, max_lines=2)
    assert [(p.model, p.seqs) for p in plans] == [
        ("a", (1, 2)),
        ("b", (0,)),
        ("a", (3,)),
        ("c", (4,)),
    ]


def test_empty_input_gives_no_shards() -> None:
    """No requests, no shards."""
    assert plan([]) == []


@pytest.mark.parametrize(
    "limits",
    [
        pytest.param({"max_lines": 0, "max_bytes": 10}, id="lines-zero"),
        pytest.param({"max_lines": 1, "max_bytes": 0}, id="bytes-zero"),
        pytest.param({"max_lines": 1, "max_bytes": 10, "max_tokens": 0}, id="tokens-zero"),
        pytest.param({"max_lines": 1.5, "max_bytes": 10}, id="lines-float"),
        pytest.param({"max_lines": True, "max_bytes": 10}, id="lines-bool"),
    ],
)
def test_bad_limits_are_rejected_at_once(limits: dict[str, Any]) -> None:
    """A limit that is not a positive int raises ValueError at the call, before any item is read."""

    class Unreadable:
        def __iter__(self) -> Iterator[PreparedRequest]:
            raise AssertionError("items read")

    with pytest.raises(ValueError, match="must be an int >= 1"):
        plan_shards(Unreadable(), **limits)


@pytest.mark.parametrize(
    "item",
    [
        pytest.param(shard_item(0, CHAT, "m", 0, 1), id="size-zero"),
        pytest.param(shard_item(0, CHAT, "m", 1, -1), id="negative-tokens"),
    ],
)
def test_impossible_items_are_rejected(item: PreparedRequest) -> None:
    """An item of size 0 (no newline) or negative tokens is a caller's bug: ValueError."""
    with pytest.raises(ValueError, match="item 0"):
        plan([item])


GROUPS = [(CHAT, "a"), (CHAT, "b"), (CHAT, None), (EMBED, "a")]

shard_items = st.lists(
    st.tuples(st.sampled_from(GROUPS), st.integers(1, 12), st.integers(0, 10)),
    max_size=60,
).map(
    lambda rows: [
        shard_item(seq, url, model, size, tokens)
        for seq, ((url, model), size, tokens) in enumerate(rows)
    ]
)


@settings(max_examples=300)
@given(
    shard_items,
    st.integers(1, 6),
    st.integers(1, 40),
    st.none() | st.integers(1, 30),
)
def test_plan_shards_properties(
    lines: list[PreparedRequest], max_lines: int, max_bytes: int, max_tokens: int | None
) -> None:
    """Every seq lands in exactly one shard, of its own group, within every limit (unless alone
    and oversize); groups keep input order; each shard is as full as the next request allows."""
    plans = list(
        plan_shards(lines, max_lines=max_lines, max_bytes=max_bytes, max_tokens=max_tokens)
    )
    by_seq = {item.seq: item for item in lines}
    placed = [seq for p in plans for seq in p.seqs]
    assert sorted(placed) == sorted(by_seq)

    for p in plans:
        members = [by_seq[seq] for seq in p.seqs]
        assert members
        assert all((m.url, m.model) == (p.url, p.model) for m in members)
        assert p.size == sum(m.size for m in members)
        assert p.tokens == sum(m.tokens for m in members)
        assert len(members) <= max_lines
        over_bytes = p.size > max_bytes
        over_tokens = max_tokens is not None and p.tokens > max_tokens
        if over_bytes or over_tokens:
            assert len(members) == 1

    for group in GROUPS:
        group_plans = [p for p in plans if (p.url, p.model) == group]
        in_order = [item.seq for item in lines if (item.url, item.model) == group]
        assert [seq for p in group_plans for seq in p.seqs] == in_order
        # Greedy: each shard but the group's last could not take the group's next request.
        for current, following in itertools.pairwise(group_plans):
            nxt = by_seq[following.seqs[0]]
            assert (
                len(current.seqs) + 1 > max_lines
                or current.size + nxt.size > max_bytes
                or (max_tokens is not None and current.tokens + nxt.tokens > max_tokens)
            )


def _prepared(rows: list[tuple[tuple[str, str | None], int, int, int]]) -> list[PreparedRequest]:
    """Requests of these ``((url, model), size, tokens, inputs)``, numbered from 0."""
    return [
        PreparedRequest(
            seq=seq, url=url, model=model, size=size, tokens=tokens, inputs=inputs, line=seq + 1
        )
        for seq, ((url, model), size, tokens, inputs) in enumerate(rows)
    ]


ingest_items = st.lists(
    st.tuples(st.sampled_from(GROUPS), st.integers(1, 12), st.integers(0, 10), st.integers(1, 4)),
    max_size=60,
).map(_prepared)


def _row(item: PreparedRequest, seq: int) -> RequestRow:
    """An item as an ingest's row numbered ``seq`` (``data`` of ``size - 1`` bytes)."""
    data = b"x" * (item.size - 1)
    return RequestRow(
        seq, f"r{item.line}", item.line, item.url, item.model, item.tokens, item.inputs, data
    )


@settings(max_examples=300)
@given(
    ingest_items,
    st.integers(1, 6),
    st.integers(1, 40),
    st.none() | st.integers(1, 30),
    st.none() | st.integers(1, 8),
    st.lists(st.tuples(st.integers(1, 8), st.lists(st.integers(0, 59), max_size=4)), max_size=10),
)
def test_an_ingest_planner_cuts_as_planning_would_whatever_was_taken_back(
    lines: list[PreparedRequest],
    max_lines: int,
    max_bytes: int,
    max_tokens: int | None,
    max_inputs: int | None,
    batches: list[tuple[int, list[int]]],
) -> None:
    """Batches placed (some first with more rows, taken back) land as plan_shards cuts."""
    _assert_placed_as_planned(lines, max_lines, max_bytes, max_tokens, max_inputs, batches)


@pytest.mark.parametrize("batch", [1, 2, 3, 100])
def test_an_ingest_planner_cuts_each_group_as_planning_would_when_rows_alternate(
    batch: int,
) -> None:
    """Rows of two groups in turn, near their input and token limits, land as plan_shards
    cuts each group, in batches of any size."""
    pattern = [((EMBED, "a"), 3, 1, 3), ((CHAT, "a"), 2, 6, 1), ((EMBED, "a"), 2, 0, 2)]
    lines = _prepared(pattern * 7)
    _assert_placed_as_planned(lines, 5, 12, 10, 8, [(batch, [])] * (len(lines) // batch))


def _assert_placed_as_planned(
    lines: list[PreparedRequest],
    max_lines: int,
    max_bytes: int,
    max_tokens: int | None,
    max_inputs: int | None,
    batches: list[tuple[int, list[int]]],
) -> None:
    """``lines`` placed by an IngestPlanner in ``batches`` (a size, and the lines to try
    with it first and take back) land in the shards plan_shards cuts for each group."""
    tokens = {"a": max_tokens} if max_tokens else {}
    planner = IngestPlanner(ShardLimits(max_lines, max_bytes, max_inputs, tokens))
    placed: list[RequestRow] = []
    start = 0
    for size, extra in [*batches, (len(lines), [])]:
        batch = lines[start : start + size]
        if extra and batch:  # refused with more lines in it, then placed as accepted
            tried = batch + [lines[n % len(lines)] for n in extra]
            mark = planner.mark()
            planner.place([_row(item, start + n) for n, item in enumerate(tried)])
            planner.undo(mark)
        placed += planner.place([_row(item, start + n) for n, item in enumerate(batch)])
        start += len(batch)
    shards = planner.finish()

    expected = [
        plan
        for url, model in GROUPS
        for plan in plan_shards(
            [i for i in lines if (i.url, i.model) == (url, model)],
            max_lines=max_lines,
            max_bytes=max_bytes,
            max_tokens=max_tokens if model == "a" else None,
            max_inputs=max_inputs if url == EMBED else None,
        )
    ]
    by_key = {s.key: [row for row in placed if row.shard == s.key] for s in shards}
    got = [
        (s.url, s.model, tuple(r.seq for r in by_key[s.key]), s.size, s.tokens, s.lines)
        for s in shards
    ]
    by_seqs = {p.seqs: (p.url, p.model, p.seqs, p.size, p.tokens, len(p.seqs)) for p in expected}
    assert sorted(got, key=lambda shard: shard[2]) == [by_seqs[k] for k in sorted(by_seqs)]
    assert all([r.pos for r in by_key[s.key]] == list(range(1, s.lines + 1)) for s in shards)
    assert [s.key for s in shards] == [f"s{n:06d}" for n in range(len(shards))]
    assert [rows[0].seq for rows in by_key.values()] == sorted(r[0].seq for r in by_key.values())
    assert [(r.seq, r.custom_id, r.data) for r in placed] == [
        (r.seq, r.custom_id, r.data) for r in (_row(item, item.seq) for item in lines)
    ]
