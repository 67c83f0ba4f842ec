"""Writing megabytes to a file in calls of at most :data:`WRITE_BYTES` each.

On this project's machines (Linux 6.18, ext4), a write call of 2 MiB or more into pages
new to the file took about ten times the CPU of the same bytes in smaller calls: 200 MB
in calls of 2 MiB to 8 MB took 0.42-0.56 s of CPU, in calls of 64 KiB to 1 MiB
0.04-0.06 s (once 0.15 s), and 2,097,151 bytes a call was as fast as 1 MiB. (Written
over pages the file already had, 8 MB calls took 0.03 s.) The journal's result lines (a
chunk of about ``RunConfig.collect_chunk_bytes``, shared by the collections under way)
and the output file (a page of about 4 MiB, or one longer line) are written in chunks of
megabytes, so they are written through here: collecting a 200 MB output file, the
journal's thread spent 0.38-0.44 s of the collection's 0.70-0.77 s writing before,
0.11-0.14 s after (benchmarks/bench_run_collect.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import BinaryIO

__all__ = ["IOV_MAX", "WRITE_BYTES", "groups", "write_in_pieces"]

#: The most bytes one write call takes.
WRITE_BYTES = 1024 * 1024

#: The most buffers one vectored write takes (Linux's limit).
IOV_MAX = 1024


def groups(
    lines: Sequence[bytes], *, most: int = WRITE_BYTES, buffers: int = IOV_MAX
) -> Iterator[list[bytes | memoryview]]:
    """``lines`` as the buffers of successive vectored writes: each group at most
    ``buffers`` buffers and ``most`` bytes, a longer line cut in pieces (an empty line
    is no buffer). The groups, one after another, hold the bytes of ``lines`` in order."""
    group: list[bytes | memoryview] = []
    size = 0
    for line in lines:
        n = len(line)
        if not n:
            continue
        if group and (size + n > most or len(group) == buffers):
            yield group
            group, size = [], 0
        if n <= most:
            group.append(line)
            size += n
            continue
        view = memoryview(line)
        for start in range(0, n, most):
            yield [view[start : start + most]]
    if group:
        yield group


def write_in_pieces(fh: BinaryIO, data: bytes, *, most: int = WRITE_BYTES) -> None:
    """Write ``data`` to ``fh`` in calls of at most ``most`` bytes."""
    if len(data) <= most:
        fh.write(data)
        return
    view = memoryview(data)
    for start in range(0, len(view), most):
        fh.write(view[start : start + most])
