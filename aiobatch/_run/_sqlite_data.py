"""The file of a journal's result lines: ``<journal>-data``, beside the SQLite file.

A result line is written once. The transaction that records a chunk of results appends
their lines to this file (vectored writes of at most 1 MiB each, see :mod:`._disk`, then
``fdatasync``) before it commits (before it inserts their rows, or, for lines named by
``custom_id``, once every row is in); each row of ``results`` keeps where its line is
(``data_at``, ``data_size``), and ``meta.data_end`` the end of the bytes that committed
rows use. Bytes past ``data_end`` (a transaction rolled back, a process killed before
its commit) are written over by the next append, so they are never read. In the SQLite
file itself the line would be written twice (the log, then the file) and read back page
by page: collecting 200 MB of output spent most of its time there
(benchmarks/bench_run_collect.py).

The file starts with a line of its own, ``aiobatch result lines <id>``, where ``<id>`` is
the journal's ``meta.data_id`` (made with the file's first write): a ``-data`` file put
back beside the wrong journal is a JournalError, not other requests' lines in the output.
(A file made before ids has no such line, and its journal no ``data_id``.)

Rows of a journal from before schema 7 hold their line in ``results.data``
(``data_at`` is NULL); they are read from there.

Only the run holding the journal's lock appends: ``aiobatch status`` and ``aiobatch
cancel`` never write results.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from itertools import accumulate
from operator import attrgetter
from typing import Protocol, TypeVar

from ..errors import JournalError
from ._disk import groups

__all__ = ["DATA_SUFFIX", "Located", "ResultData", "header", "placed"]

#: A row of ``results`` as its line is found: ``(data, data_at, data_size, seq)``.
Located = tuple[bytes, "int | None", "int | None", int]

#: The suffix of the result file's name after the journal's.
DATA_SUFFIX = "-data"

_sync = getattr(os, "fdatasync", os.fsync)

#: The start of a ``-data`` file's first line; the journal's ``data_id`` follows.
_HEADER = b"aiobatch result lines "


def header(data_id: str) -> bytes:
    """The first line of the ``-data`` file of the journal whose ``meta.data_id`` is
    ``data_id``."""
    return _HEADER + data_id.encode() + b"\n"


class _WithData(Protocol):
    @property
    def data(self) -> bytes: ...


_Item = TypeVar("_Item", bound=_WithData)
_data = attrgetter("data")


def placed(items: Sequence[_Item], start: int) -> Iterator[tuple[_Item, int]]:
    """Each of ``items`` with where its ``data`` starts when they are written one after
    another from ``start``."""
    return zip(items, accumulate(map(len, map(_data, items)), initial=start), strict=False)


def _sync_directory(path: str) -> None:
    """Make a new file's name durable (its directory synced), where the system can."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # a directory that cannot be synced (some systems): its name stays as it is
    finally:
        os.close(fd)


def _write_at(fd: int, lines: Sequence[bytes | memoryview], at: int) -> int:
    """Write ``lines`` (one of :func:`groups`) from offset ``at`` (from the lines
    themselves where the system has ``pwritev``: they are not copied into one first);
    the offset after them."""
    total = sum(map(len, lines))
    written = os.pwritev(fd, lines, at) if hasattr(os, "pwritev") else 0
    if written < total:  # no pwritev, or a short write: the rest in one piece
        rest = memoryview(b"".join(lines))[written:]
        while rest:
            done = os.pwrite(fd, rest, at + written)
            rest = rest[done:]
            written += done
    return at + total


class ResultData:
    """The result file of the journal at ``journal_path``, opened on first use.

    Args:
        journal_path: the journal's SQLite file.
        readonly: only read it (never create it).
    """

    __slots__ = ("_expected", "_fd", "_readonly", "path")

    def __init__(self, journal_path: str, *, readonly: bool) -> None:
        self.path = journal_path + DATA_SUFFIX
        self._readonly = readonly
        self._fd: int | None = None
        self._expected: bytes | None = None  # the first line the file must have

    def expect(self, data_id: str | None) -> None:
        """The journal's ``meta.data_id`` (None: a journal from before ids, or one
        without results yet): the file, when opened, must start with its line."""
        self._expected = header(data_id) if data_id else None

    def check(self, end: int) -> None:
        """Raise unless the file holds the ``end`` bytes that the journal's results use
        (before a run resumes: a missing or shorter file would otherwise be written
        over from ``end``, and the earlier lines read back as zeros).

        Raises:
            JournalError: the file is missing or shorter than ``end``.
        """
        if end <= 0:
            return
        try:
            size = os.stat(self.path).st_size
        except OSError as exc:
            raise self._unopenable(exc) from exc
        if size < end:
            raise JournalError(
                f"{self.path}: the journal's result lines are cut short ({size:,} of "
                f"{end:,} bytes): the file was truncated or replaced; put the original "
                "back beside the journal, or move the journal away and run again"
            )
        self._open()  # and it is this journal's

    def _unopenable(self, exc: OSError) -> JournalError:
        return JournalError(
            f"{self.path}: the journal's result lines cannot be opened "
            f"({exc.strerror or exc}); it must stay beside the journal file (put it "
            "back, or move the journal away and run again)"
        )

    def _open(self, *, create: bool = False) -> int:
        """The file, opened on first use (created only by the first write of all: a
        journal with results never makes a new, empty one)."""
        if self._fd is None:
            flags = os.O_RDONLY if self._readonly else os.O_RDWR
            if create and not self._readonly:
                flags |= os.O_CREAT
            try:
                fd = os.open(self.path, flags | getattr(os, "O_CLOEXEC", 0), 0o666)
            except OSError as exc:
                raise self._unopenable(exc) from exc
            if create:
                _sync_directory(self.path)
            elif self._expected is not None:
                self._check_header(fd, self._expected)
            self._fd = fd
        return self._fd

    def _check_header(self, fd: int, expected: bytes) -> None:
        """Close ``fd`` and raise unless the file starts with ``expected``.

        Raises:
            JournalError: it does not (another journal's file), or cannot be read.
        """
        try:
            try:
                found = os.pread(fd, len(expected), 0)
            except OSError as exc:
                raise self._unopenable(exc) from exc
            if len(found) < len(expected) and expected.startswith(found):
                raise JournalError(
                    f"{self.path}: the journal's result lines are cut short ({len(found)} "
                    f"bytes, less than its first line): the file was truncated; put the "
                    "original back beside the journal, or move the journal away and run again"
                )
            if found != expected:
                raise JournalError(
                    f"{self.path}: these result lines belong to another journal (the file "
                    "does not start with this journal's id): put back the file that was "
                    "beside this journal, or move the journal away and run again"
                )
        except JournalError:
            os.close(fd)
            raise

    def write(self, at: int, lines: Sequence[bytes], *, data_id: str | None = None) -> None:
        """Write ``lines`` one after another from offset ``at``, and sync them to disk.
        ``data_id`` (the first write of all, ``at`` 0): the file is made (or written
        over) and belongs to the journal of that ``meta.data_id`` from now on; ``lines``
        start with its :func:`header`.

        Raises:
            JournalError: the file cannot be written (a full disk...).
        """
        if data_id is not None:
            self.expect(data_id)
        fd = self._open(create=at == 0)
        try:
            for group in groups(lines):
                at = _write_at(fd, group, at)
            _sync(fd)
        except OSError as exc:
            raise JournalError(
                f"{self.path}: the journal's result lines cannot be written "
                f"({exc.strerror or exc}); nothing of this chunk was recorded"
            ) from exc

    def read(self, at: int, size: int, seq: int) -> bytes:
        """The ``size`` bytes at ``at`` (the line of request ``seq``).

        Raises:
            JournalError: the file is missing or shorter than the journal says.
        """
        try:
            data = os.pread(self._open(), size, at)
        except OSError as exc:
            raise JournalError(
                f"{self.path}: the result of request {seq} cannot be read ({exc.strerror or exc})"
            ) from exc
        if len(data) != size:
            raise JournalError(
                f"{self.path}: the result of request {seq} is cut short ({len(data)} of "
                f"{size} bytes at offset {at}): the file was truncated or replaced"
            )
        return data

    def lines(self, rows: Sequence[Located]) -> list[bytes]:
        """The result lines of ``rows``, in their order. A row written before schema 7
        (no place in the file) has its line in its ``data``; lines that follow each
        other in the file (results read in completion order) are read together.

        Raises:
            JournalError: the file is missing or shorter than the journal says.
        """
        lines: list[bytes] = []
        start = 0
        while start < len(rows):
            data, at, size, seq = rows[start]
            if at is None or size is None:
                lines.append(bytes(data))
                start += 1
                continue
            end = start + 1
            stop = at + size
            while end < len(rows) and rows[end][1] == stop:
                stop += rows[end][2] or 0
                end += 1
            if end == start + 1:
                lines.append(self.read(at, size, seq))
            else:
                run = memoryview(self.read(at, stop - at, seq))
                offset = 0
                for _data, _at, length, _seq in rows[start:end]:
                    length = length or 0
                    lines.append(bytes(run[offset : offset + length]))
                    offset += length
            start = end
        return lines

    def close(self) -> None:
        """Close the file (safe to call twice)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
