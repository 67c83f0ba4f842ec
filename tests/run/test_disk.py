"""Megabytes go to files in calls of a bounded size: every byte, in order, and no call
over the bound."""

from __future__ import annotations

import io

from hypothesis import given
from hypothesis import strategies as st

from aiobatch._run._disk import groups, write_in_pieces


class _Calls(io.BytesIO):
    """A file that keeps the size of each write call."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def write(self, data: bytes | memoryview) -> int:  # type: ignore[override]
        self.sizes.append(len(data))
        return super().write(data)


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=40), max_size=30),
    most=st.integers(min_value=1, max_value=16),
    buffers=st.integers(min_value=1, max_value=5),
)
def test_groups_hold_every_byte_in_order_within_both_bounds(
    sizes: list[int], most: int, buffers: int
) -> None:
    """The groups hold the lines' bytes in order, each group some bytes within both bounds."""
    lines = [bytes([n % 251]) * size for n, size in enumerate(sizes)]
    found = list(groups(lines, most=most, buffers=buffers))
    assert b"".join(bytes(part) for group in found for part in group) == b"".join(lines)
    assert all(sum(map(len, group)) > 0 for group in found)
    assert all(sum(map(len, group)) <= most and len(group) <= buffers for group in found)


def test_groups_fill_each_call_before_starting_the_next() -> None:
    """Lines that fit together share one call; a line over the bound is cut."""
    found = list(groups([b"ab", b"cd", b"e", b"fghijkl"], most=5, buffers=4))
    assert [[bytes(part) for part in group] for group in found] == [
        [b"ab", b"cd", b"e"],
        [b"fghij"],
        [b"kl"],
    ]


@given(size=st.integers(min_value=0, max_value=100), most=st.integers(min_value=1, max_value=30))
def test_write_in_pieces_writes_every_byte_in_calls_within_the_bound(size: int, most: int) -> None:
    """The file gets the data whole, in calls of at most the bound."""
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    fh = _Calls()
    write_in_pieces(fh, data, most=most)
    assert fh.getvalue() == data
    assert all(n <= most for n in fh.sizes)
