"""What a run gives back: its final results read from the journal in order, and the
output file written from them."""

from __future__ import annotations

import os

from .._convert import decode_result_line
from ._config import RunResult
from ._disk import write_in_pieces
from ._journal import Journal

__all__ = ["next_results", "write_output"]


async def next_results(
    reader: Journal, *, order: str, cursor: int, limit: int = 1000
) -> tuple[list[RunResult], int]:
    """The final results past ``cursor`` and the cursor after them: in input order only
    those with every earlier request's result before them (a ``seq`` cursor), in
    completion order all of them (an ``n`` cursor)."""
    results: list[RunResult] = []
    for row in await reader.result_rows(order=order, after=cursor, limit=limit):
        if order == "input" and row.seq != cursor + 1:
            break
        cursor = row.seq if order == "input" else row.n
        results.append(
            RunResult(
                custom_id=row.custom_id,
                index=row.seq,
                result=decode_result_line(row.data, what=f"the result of {row.custom_id!r}"),
                attempts=row.attempts,
                batch_id=row.batch_id,
            )
        )
    return results, cursor


async def write_output(journal: Journal, target: str, *, order: str) -> None:
    """Write every final result to ``target``, atomically, in ``order``.

    A chunk of lines at a time (at most a few MB), each read in the journal's worker
    thread, the loop running in between.
    """
    temp = f"{target}.{os.getpid()}.part"
    with open(temp, "wb") as fh:  # noqa: ASYNC230 - written a chunk at a time
        async for lines in journal.result_lines(order=order, background=True):
            write_in_pieces(fh, b"\n".join(lines))
            fh.write(b"\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temp, target)
    await journal.set_output(os.path.abspath(target))  # noqa: ASYNC240
