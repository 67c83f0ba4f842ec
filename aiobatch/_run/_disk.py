"""Writing megabytes to a file in calls of at most :data:`WRITE_BYTES` each.

On Linux 6.18 with ext4 (the kernel of this project's machines), one write call of 2 MiB
or more into the page cache takes about ten times the CPU of the same bytes in calls of
less than 2 MiB: 200 MB written in 8 MB calls took 0.42-0.50 s of CPU, in 1 MiB calls
0.04-0.05 s. (A call of 2 MiB lets the page cache take a huge page at a time; making one
costs more than copying into small ones.) The journal's result lines (a chunk of up to
``RunConfig.collect_chunk_bytes``) and the output file (a page of up to 4 MiB) are
written in chunks of megabytes, so they are written through here. On other systems
calls of 1 MiB cost the same as larger ones: a few more system calls per chunk.
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
    ``buffers`` buffers and ``most`` bytes, a longer line cut in pieces. The groups,
    one after another, hold the bytes of ``lines`` in order."""
    group: list[bytes | memoryview] = []
    size = 0
    for line in lines:
        n = len(line)
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
