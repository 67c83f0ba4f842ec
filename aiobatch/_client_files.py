"""The Files API calls of :class:`~aiobatch.BatchClient`: upload (and wait until the
file is processed), look up, list, delete, and read a file's content whole, streamed
line by line, decoded as result lines, or downloaded to a path atomically.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import AsyncGenerator

from ._client_core import ClientCore, quote_id, response_lines
from ._convert import decode_result_line, upload_form_fields
from ._models import File, FileDeleted, FilePage, ResultLine
from ._retry import RetryState, poll_intervals
from .errors import FileProcessingError, FileWaitTimeoutError
from .transport._base import FilePart, Multipart, Response

__all__ = ["DEFAULT_FILE_WAIT", "FileCalls"]

logger = logging.getLogger("aiobatch")

#: Default seconds :meth:`BatchClient.wait_for_file` waits for an upload to be processed.
DEFAULT_FILE_WAIT = 600.0


class FileCalls(ClientCore):
    """The Files API (``/files``), on top of the client's plumbing."""

    async def upload_file(
        self,
        file: str | os.PathLike[str] | bytes,
        *,
        purpose: str = "batch",
        filename: str | None = None,
        expires_after_seconds: int | None = None,
        wait_processed: bool | None = None,
        processing_timeout: float = DEFAULT_FILE_WAIT,
    ) -> File:
        """Upload a file (``POST /files``). A path is streamed, never read whole.

        On a provider whose uploads are usable only once ``processed`` (Azure: see
        :attr:`Quirks.wait_for_processed_file <aiobatch.Quirks.wait_for_processed_file>`)
        the call then waits for that with :meth:`wait_for_file`, so the file it returns
        can go straight into :meth:`create_batch`.

        An upload is retried like any call. Uploads cannot be looked up reliably (file
        names need not be unique), so when an attempt's answer was lost and a retry
        then succeeded, the server may hold an extra copy: a WARNING names the file
        kept, and the extra copy (same name, same size) can be deleted by hand. It is
        never used by a batch, and costs only storage.

        Args:
            file: a path, or the content itself.
            purpose: the file's purpose (``batch`` for batch input).
            filename: the name the server records; default the path's base name, or
                ``input.jsonl`` for bytes.
            expires_after_seconds: delete the file this long after its creation.
            wait_processed: wait until the file is ``processed``; None (the default)
                waits when the provider needs it.
            processing_timeout: seconds that wait may take.

        Returns:
            The stored file.

        Raises:
            FileProcessingError: the server marked the file ``error``.
            FileWaitTimeoutError: it was still not ``processed`` after
                ``processing_timeout`` seconds.
        """
        if isinstance(file, bytes | bytearray | memoryview):
            part = FilePart(filename=filename or "input.jsonl", content=bytes(file))
        else:
            path = os.fspath(file)
            part = FilePart(filename=filename or os.path.basename(path), path=path)
        fields = upload_form_fields(purpose, expires_after_seconds)
        request = self._request(
            "POST", "/files", body=Multipart(fields=fields, files=(("file", part),))
        )
        state = RetryState(self._retry, self._clock, request.method, request.url)
        response = await self._send(request, state=state)
        uploaded = self._decode(await response.read(), File)
        if state.ambiguous:
            logger.warning(
                "upload of %r succeeded as %s after an attempt whose answer was lost; the "
                "server may also hold an extra copy of it (same name and size), which "
                "can be deleted",
                uploaded.filename,
                uploaded.id,
            )
        if wait_processed is None:
            wait_processed = self._provider.quirks.wait_for_processed_file
        if wait_processed:
            uploaded = await self.wait_for_file(uploaded, timeout=processing_timeout)
        return uploaded

    async def wait_for_file(
        self,
        file: str | File,
        *,
        timeout: float = DEFAULT_FILE_WAIT,
        poll_interval: float = 1.0,
        max_interval: float = 10.0,
    ) -> File:
        """Poll a file until it is ``processed`` (Azure answers an upload ``pending``).

        A file already ``processed`` (or with no status, as some compatible servers
        send) is returned at once, without a request. Polls go through the client's
        clock; intervals grow from ``poll_interval`` to ``max_interval``.

        Args:
            file: the file id, or the File the upload returned.
            timeout: seconds to wait in all.
            poll_interval: seconds before the first poll.
            max_interval: the longest pause between polls.

        Returns:
            The file, ``processed``.

        Raises:
            FileProcessingError: the server marked the file ``error`` (its
                ``status_details`` say why) or ``deleted``.
            FileWaitTimeoutError: still not ``processed`` at the deadline.
        """
        clock = self._clock
        deadline = clock.monotonic() + timeout
        intervals = poll_intervals(poll_interval, max_interval, jitter=0.0)
        current = file if isinstance(file, File) else await self.retrieve_file(file)
        while True:
            status = current.status
            if status is None or status == "processed":
                return current
            if status in ("error", "deleted"):
                details = f": {current.status_details}" if current.status_details else ""
                raise FileProcessingError(
                    f"file {current.id} ended {status!r} instead of 'processed'{details}; "
                    "upload it again",
                    file_id=current.id,
                    status=status,
                    status_details=current.status_details,
                )
            room = deadline - clock.monotonic()
            if room <= 0:
                raise FileWaitTimeoutError(
                    f"file {current.id} still {status!r} after {timeout:g}s",
                    file_id=current.id,
                    status=status,
                    status_details=current.status_details,
                )
            await clock.sleep(min(intervals(), room))
            current = await self._call(
                File, "GET", f"/files/{quote_id(current.id)}", deadline=deadline
            )

    async def retrieve_file(self, file_id: str) -> File:
        """Get one file's metadata (``GET /files/{id}``)."""
        return await self._call(File, "GET", f"/files/{quote_id(file_id)}")

    async def delete_file(self, file_id: str) -> FileDeleted:
        """Delete a file (``DELETE /files/{id}``).

        When an attempt's answer was lost and the retry finds the file gone (404), the
        first attempt did the work: the file is reported deleted.
        """
        request = self._request("DELETE", f"/files/{quote_id(file_id)}", timeout=self._timeout)
        self._check_open()
        state = RetryState(self._retry, self._clock, request.method, request.url)
        response = await self._retry.send(self._transport, request, clock=self._clock, state=state)
        if response.status == 404 and state.ambiguous:
            await response.aclose()
            logger.info(
                "file %s: 404 after a delete whose answer was lost; that delete did it",
                file_id,
            )
            return FileDeleted(id=file_id, deleted=True)
        if response.status >= 400:
            await self._raise_for_status(response, request)
        return self._decode(await response.read(), FileDeleted)

    async def list_files_page(
        self,
        *,
        purpose: str | None = None,
        order: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> FilePage:
        """One page of ``GET /files``.

        Args:
            purpose: only files with this purpose.
            order: ``asc`` or ``desc`` by creation time (server default ``desc``).
            after: the id of the last file of the previous page.
            limit: files per page (server default 10,000).
        """
        params: dict[str, str] = {}
        if purpose is not None:
            params["purpose"] = purpose
        if order is not None:
            params["order"] = order
        if after is not None:
            params["after"] = after
        if limit is not None:
            params["limit"] = str(limit)
        return await self._call(FilePage, "GET", "/files", params=params)

    async def list_files(
        self,
        *,
        purpose: str | None = None,
        order: str | None = None,
        page_size: int | None = None,
    ) -> AsyncGenerator[File, None]:
        """Every file, over all pages (next page ``after`` the last item's id)."""
        after: str | None = None
        while True:
            page = await self.list_files_page(
                purpose=purpose, order=order, after=after, limit=page_size
            )
            for item in page.data:
                yield item
            if not page.has_more or not page.data:
                return
            after = page.data[-1].id

    async def file_content(self, file_id: str) -> bytes:
        """A file's whole content (``GET /files/{id}/content``); for small files."""
        request = self._request("GET", f"/files/{quote_id(file_id)}/content", timeout=self._timeout)
        response = await self._send(request)
        return await response.read()

    async def _open_content(self, file_id: str) -> Response:
        request = self._request("GET", f"/files/{quote_id(file_id)}/content", timeout=self._timeout)
        return await self._send(request, stream=True)

    async def iter_file_lines(self, file_id: str) -> AsyncGenerator[bytes, None]:
        """A file's lines as they arrive, without their line ends, in constant memory.

        A last line without a newline is yielded too. Stopping early (closing the
        iterator, e.g. with :func:`contextlib.aclosing`) closes the response. Each byte
        is looked at a bounded number of times, however long a line is and however the
        chunks cut it.
        """
        response = await self._open_content(file_id)
        async with contextlib.aclosing(response_lines(response)) as lines:
            async for line in lines:
                yield line

    async def iter_results(self, file_id: str) -> AsyncGenerator[ResultLine, None]:
        """The decoded lines of a batch output or error file, streamed; blank lines skipped.

        Raises:
            DecodeError: a line does not decode; the message names the file and the
                1-based line number.
        """
        decoded = self._decoded_lines(
            self.iter_file_lines(file_id), decode_result_line, f"file {file_id}"
        )
        async with contextlib.aclosing(decoded) as results:
            async for result in results:
                yield result

    async def download_file(self, file_id: str, path: str | os.PathLike[str]) -> int:
        """Stream a file's content to ``path``, atomically.

        The bytes go to a temporary file beside ``path`` (created with mode 0600) that
        replaces ``path`` only once complete, so ``path`` never holds a partial file.

        Returns:
            The number of bytes written.
        """
        target = os.fspath(path)
        directory = os.path.dirname(target) or os.curdir
        fd, temp = tempfile.mkstemp(prefix=".aiobatch-", suffix=".part", dir=directory)
        written = 0
        try:
            with os.fdopen(fd, "wb") as fh:
                response = await self._open_content(file_id)
                try:
                    async for chunk in response.iter_chunks():
                        fh.write(chunk)
                        written += len(chunk)
                finally:
                    await response.aclose()
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return written
