"""``aiobatch failures JOURNAL``: a run's failed requests by error, and a file to retry them.

The journal keeps every final result with the request line it answers; this command
groups the failed ones by error code and HTTP status, with a few examples each, and
writes the failed request lines (all, or those of some codes) as a new input file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

import attrs

from .._run import JournalFile
from ..errors import JournalError
from ._args import count, out
from ._command import command
from ._exit import ERROR, OK, USAGE

__all__ = ["FailureGroup", "describe_failure", "group_failures"]


@attrs.define
class FailureGroup:
    """The failed requests of one error code and HTTP status.

    Attributes:
        code: the error code (``"-"`` when the result has none).
        status: the HTTP status the endpoint answered (None for an error that is no
            HTTP answer, such as ``batch_expired``).
        count: how many requests.
        examples: up to a few ``(custom_id, message)``.
    """

    code: str
    status: int | None
    count: int = 0
    examples: list[tuple[str, str]] = attrs.Factory(list)


def describe_failure(result: bytes, code: str | None) -> tuple[str, int | None, str]:
    """``(code, status, message)`` of one error result line (``code``: the journal's)."""
    try:
        data = json.loads(result)
    except ValueError:
        return code or "-", None, ""
    status: int | None = None
    error: Any = data.get("error") if isinstance(data, dict) else None
    response = data.get("response") if isinstance(data, dict) else None
    if isinstance(response, dict):
        raw = response.get("status_code")
        status = raw if isinstance(raw, int) else None
        body = response.get("body")
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            error = body["error"]
    message = ""
    if isinstance(error, dict):
        message = str(error.get("message") or "")
        code = code or (str(error["code"]) if error.get("code") else None)
    return code or (str(status) if status is not None else "-"), status, message


def group_failures(
    rows: Iterable[tuple[str, bytes, str | None]], *, examples: int = 3
) -> list[FailureGroup]:
    """Failures ``(custom_id, result line, code)`` grouped by code and status, the
    largest group first."""
    groups: dict[tuple[str, int | None], FailureGroup] = {}
    for custom_id, result, journal_code in rows:
        code, status, message = describe_failure(result, journal_code)
        group = groups.setdefault((code, status), FailureGroup(code, status))
        group.count += 1
        if len(group.examples) < examples:
            group.examples.append((custom_id, message))
    return sorted(groups.values(), key=lambda g: (-g.count, g.code, g.status or 0))


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("journal", help="the run's journal file (OUTPUT.journal by default)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--examples",
        type=count,
        default=3,
        metavar="N",
        help="example requests shown per error",
    )
    parser.add_argument(
        "--retry-file",
        metavar="PATH",
        default=None,
        help="write the failed requests (their request lines, as sent) to PATH, a new "
        "input file for 'aiobatch run'",
    )
    parser.add_argument(
        "--code",
        action="append",
        default=None,
        metavar="CODE",
        help="with --retry-file: only the requests that failed with this error code or "
        "HTTP status (repeatable; default: every failed request)",
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite the --retry-file if it exists"
    )


_EXAMPLES = """\
examples:
  aiobatch failures results.jsonl.journal
  aiobatch failures results.jsonl.journal --json
  aiobatch failures results.jsonl.journal --retry-file retry.jsonl --code 500 --code 429
  aiobatch run retry.jsonl -o retry-results.jsonl

exit status: 0 printed (and written), 2 usage error (an existing --retry-file without
--force), 4 the journal or the file could not be used"""


@command(
    "failures",
    "summarise a run's failed requests by error, and write them out to run again",
    _arguments,
    description=(
        "Group the requests of a run whose final result is an error by error code and "
        "HTTP status, with a few examples each (custom_id and message). With "
        "--retry-file, write their request lines as a new input file, ready for "
        "'aiobatch run'. Works on a finished run and on one still running (what has "
        "failed so far)."
    ),
    epilog=_EXAMPLES,
)
def _failures(args: argparse.Namespace) -> int:
    if args.code and not args.retry_file:
        print("aiobatch failures: --code selects what --retry-file writes", file=sys.stderr)
        return USAGE
    if args.retry_file and os.path.exists(args.retry_file) and not args.force:
        print(
            f"aiobatch failures: {args.retry_file} exists (--force to overwrite it)",
            file=sys.stderr,
        )
        return USAGE
    wanted = set(args.code or ())
    try:
        with JournalFile(args.journal, readonly=True) as journal:
            meta = journal.meta()
            total = journal.request_count()
            rows: list[tuple[str, bytes, str | None]] = []
            retry: list[bytes] = []
            for failed in journal.failed_requests():
                rows.append((failed.custom_id, failed.result, failed.code))
                if args.retry_file:
                    code, status, _ = describe_failure(failed.result, failed.code)
                    if not wanted or code in wanted or str(status) in wanted:
                        retry.append(failed.request)
    except JournalError as exc:
        print(f"aiobatch failures: {exc}", file=sys.stderr)
        return ERROR
    groups = group_failures(rows, examples=args.examples)
    run_id = meta.run_id if meta is not None else "?"
    if args.retry_file:
        try:
            with open(args.retry_file, "wb") as fh:
                fh.writelines(line + b"\n" for line in retry)
        except OSError as exc:
            print(f"aiobatch failures: cannot write {args.retry_file}: {exc}", file=sys.stderr)
            return ERROR
    if args.json:
        data: dict[str, Any] = {
            "run_id": run_id,
            "requests": total,
            "failed": len(rows),
            "errors": [
                {
                    "code": g.code,
                    "status": g.status,
                    "count": g.count,
                    "examples": [{"custom_id": c, "message": m} for c, m in g.examples],
                }
                for g in groups
            ],
        }
        if args.retry_file:
            data["retry_file"] = {"path": args.retry_file, "requests": len(retry)}
        out(json.dumps(data, indent=2))
    else:
        out(_table(run_id, total, len(rows), groups))
        if args.retry_file:
            out(f"wrote {len(retry):,} request(s) to {args.retry_file}")
    return OK


def _table(run_id: str, total: int, failed: int, groups: list[FailureGroup]) -> str:
    lines = [f"run {run_id}: {failed:,} of {total:,} requests failed"]
    if not groups:
        return lines[0]
    width = max(len("CODE"), *(len(g.code) for g in groups))
    lines.append(f"{'CODE':<{width}}  STATUS  {'COUNT':>7}  EXAMPLES")
    for g in groups:
        status = str(g.status) if g.status is not None else "-"
        examples = "; ".join(
            f"{cid}: {_short(message)}" if message else cid for cid, message in g.examples
        )
        lines.append(f"{g.code:<{width}}  {status:<6}  {g.count:>7,}  {examples}")
    return "\n".join(lines)


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
