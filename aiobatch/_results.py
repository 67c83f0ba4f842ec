"""Reading a run's output back: ``results.jsonl`` as typed result lines, streamed."""

from __future__ import annotations

import os
from collections.abc import Iterator

from ._convert import decode_result_line
from ._models import ResultLine

__all__ = ["decode_result_line", "read_results"]


def read_results(path: str | os.PathLike[str]) -> Iterator[ResultLine]:
    """The result lines of a JSONL file, one at a time, typed.

    Reads a run's output (``aiobatch run ... -o results.jsonl``, ``BatchRun(output=...)``)
    or a batch's output or error file, line by line: memory stays constant however
    large the file. Each line is a :class:`~aiobatch.ResultSuccess` (``kind ==
    "success"``, ``.body`` the response body), a :class:`~aiobatch.ResultHTTPError`
    (``"http_error"``: the endpoint answered ``.status_code`` with an error body) or a
    :class:`~aiobatch.ResultError` (``"error"``: no response at all, ``.code`` such as
    ``batch_expired``). Blank lines are skipped. Anthropic's result lines are read too
    (a run's output has the OpenAI shape whatever the provider).

    The file is opened at the first ``next()`` and closed when the iterator ends or is
    closed.

    Args:
        path: the JSONL file.

    Yields:
        One result per non-blank line, in file order.

    Raises:
        DecodeError: a line is not a result line (the error names the file and line).
        OSError: the file cannot be read.
    """
    name = os.fspath(path)
    with open(name, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                yield decode_result_line(line, what=f"line {number} of {name}")
