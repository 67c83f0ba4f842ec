"""``aiobatch batches ...`` and ``aiobatch files ...``: the batches and files already in an
account, from a shell.

``batches list|show|cancel|download`` and ``files list|upload|delete`` talk to any
configured provider with the same ``--provider``/``--base-url`` and key rules as
``aiobatch run``; every listing prints a table, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence

from .._client import BatchClient
from .._convert import to_wire
from .._lifecycle import BatchStatus
from .._models import Batch, File
from .._provider import require_key
from ..errors import AiobatchError, ConfigurationError
from ._args import count, out
from ._command import command
from ._exit import ERROR, OK, USAGE
from ._provider_args import provider as _provider
from ._provider_args import provider_arguments as _provider_arguments
from ._run import _pairs

__all__ = ["batch_row", "file_row", "table"]

#: Statuses a batch can still leave.
_OPEN = frozenset(
    {
        BatchStatus.VALIDATING,
        BatchStatus.IN_PROGRESS,
        BatchStatus.FINALIZING,
        BatchStatus.CANCELLING,
    }
)


def _when(seconds: int | None) -> str:
    if not seconds:
        return "-"
    moment = datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M")


def batch_row(batch: Batch) -> list[str]:
    """ID, STATUS, PROGRESS, CREATED, ENDPOINT, METADATA of a batch."""
    counts = batch.request_counts
    progress = "-"
    if counts is not None and counts.total:
        progress = f"{counts.completed + counts.failed}/{counts.total}"
        if counts.failed:
            progress += f" ({counts.failed} failed)"
    metadata = ",".join(f"{k}={v}" for k, v in sorted((batch.metadata or {}).items()))
    return [
        batch.id,
        batch.raw_status or batch.status.value,
        progress,
        _when(batch.created_at),
        batch.endpoint or "-",
        metadata or "-",
    ]


def file_row(file: File) -> list[str]:
    """ID, PURPOSE, BYTES, CREATED, STATUS, FILENAME of a file."""
    return [
        file.id,
        file.purpose,
        f"{file.bytes:,}",
        _when(file.created_at),
        file.status or "-",
        file.filename,
    ]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, the last one left as it is."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip()
        for r in [header, *rows]
    )


_BATCH_HEADER = ("ID", "STATUS", "PROGRESS", "CREATED", "ENDPOINT", "METADATA")
_FILE_HEADER = ("ID", "PURPOSE", "BYTES", "CREATED", "STATUS", "FILENAME")


def _connection(parser: argparse.ArgumentParser) -> None:
    _provider_arguments(parser.add_argument_group("where"), "the provider")


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _selectors(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--status",
        action="append",
        default=None,
        metavar="STATUS",
        help="only batches in this status (repeatable; 'open': any not yet ended)",
    )
    parser.add_argument(
        "--metadata",
        type=_pairs,
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="only batches whose metadata has KEY=VALUE (repeatable: all must match)",
    )


def _batches_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list batches (newest first)")
    _selectors(listing)
    listing.add_argument("--limit", type=count, default=100, help="list at most this many batches")
    _json_flag(listing)
    _connection(listing)
    show = actions.add_parser("show", help="print one batch")
    show.add_argument("batch_id", help="the batch")
    _json_flag(show)
    _connection(show)
    cancel = actions.add_parser("cancel", help="cancel batches, by id or by metadata")
    cancel.add_argument("batch_ids", nargs="*", metavar="BATCH_ID", help="the batches")
    _selectors(cancel)
    cancel.add_argument("-y", "--yes", action="store_true", help="do not ask to confirm")
    _json_flag(cancel)
    _connection(cancel)
    download = actions.add_parser("download", help="save a batch's output and error files")
    download.add_argument("batch_id", help="the batch")
    download.add_argument(
        "-d",
        "--dir",
        default=".",
        help="the folder to save BATCH_ID.output.jsonl and "
        "BATCH_ID.errors.jsonl in (default: the current folder)",
    )
    _connection(download)


_BATCHES_EXAMPLES = """\
examples:
  aiobatch batches list --status open
  aiobatch batches list --metadata aiobatch_run=0123abcd --json
  aiobatch batches show batch_abc123
  aiobatch batches cancel batch_abc123 batch_def456
  aiobatch batches cancel --metadata project=nightly --yes
  aiobatch batches download batch_abc123 -d results/

exit status: 0 done, 2 usage error (or a cancel not confirmed), 4 the provider
answered with an error"""


@command(
    "batches",
    "list, show, cancel and download the batches in an account",
    _batches_arguments,
    description=(
        "Operate the batches already in an account, whoever created them, on the "
        "provider that --provider, --base-url and the provider's key variables name "
        "(as for 'aiobatch run')."
    ),
    epilog=_BATCHES_EXAMPLES,
)
def _batches(args: argparse.Namespace) -> int:
    actions: dict[str, Callable[[BatchClient, argparse.Namespace], Awaitable[int]]] = {
        "list": _list_batches,
        "show": _show_batch,
        "cancel": _cancel_batches,
        "download": _download_batch,
    }
    return _with_client("batches", args, actions[args.action])


def _with_client(
    name: str,
    args: argparse.Namespace,
    action: Callable[[BatchClient, argparse.Namespace], Awaitable[int]],
) -> int:
    try:
        provider = _provider(args)
        require_key(provider)
    except ConfigurationError as exc:
        print(f"aiobatch {name}: {exc}", file=sys.stderr)
        return USAGE

    async def main() -> int:
        async with BatchClient(provider=provider, create_settle=args.create_settle) as client:
            return await action(client, args)

    try:
        return asyncio.run(main())
    except (AiobatchError, OSError) as exc:
        what = " ".join(filter(None, (name, getattr(args, "action", None))))
        print(f"aiobatch {what}: {exc}", file=sys.stderr)
        return ERROR


def _matches(batch: Batch, args: argparse.Namespace) -> bool:
    wanted = set(args.status or ())
    if wanted:
        status = batch.raw_status or batch.status.value
        if status not in wanted and not ("open" in wanted and batch.status in _OPEN):
            return False
    metadata = batch.metadata or {}
    return all(metadata.get(key) == value for key, value in args.metadata or ())


async def _selected(client: BatchClient, args: argparse.Namespace, limit: int) -> list[Batch]:
    found: list[Batch] = []
    async for batch in client.list_batches():
        if _matches(batch, args):
            found.append(batch)
            if len(found) >= limit:
                break
    return found


async def _list_batches(client: BatchClient, args: argparse.Namespace) -> int:
    batches = await _selected(client, args, args.limit)
    if args.json:
        out(json.dumps([to_wire(b) for b in batches], indent=2))
    else:
        out(table(_BATCH_HEADER, [batch_row(b) for b in batches]))
    return OK


async def _show_batch(client: BatchClient, args: argparse.Namespace) -> int:
    batch = await client.retrieve_batch(args.batch_id)
    if args.json:
        out(json.dumps(to_wire(batch), indent=2))
        return OK
    row = batch_row(batch)
    lines = [f"{name.lower():<10} {value}" for name, value in zip(_BATCH_HEADER, row, strict=True)]
    for field in ("input_file_id", "output_file_id", "error_file_id"):
        lines.append(f"{field.removesuffix('_id'):<10} {getattr(batch, field) or '-'}")
    if batch.errors is not None:
        for error in batch.errors.data:
            where = f" (line {error.line})" if error.line is not None else ""
            lines.append(f"{'error':<10} {error.code}{where}: {error.message}")
    out("\n".join(lines))
    return OK


async def _cancel_batches(client: BatchClient, args: argparse.Namespace) -> int:
    if not args.batch_ids and not args.metadata and not args.status:
        print(
            "aiobatch batches cancel: name batches, or select them with --metadata or --status",
            file=sys.stderr,
        )
        return USAGE
    if args.batch_ids:
        batches = [await client.retrieve_batch(batch_id) for batch_id in args.batch_ids]
        batches = [b for b in batches if _matches(b, args)]
    else:
        batches = await _selected(client, args, sys.maxsize)
    targets = [b for b in batches if b.status in _OPEN and b.status is not BatchStatus.CANCELLING]
    if not targets:
        out("no open batch to cancel")
        return OK
    if not args.yes:
        names = ", ".join(b.id for b in targets[:5]) + (" ..." if len(targets) > 5 else "")
        if not _confirm(f"cancel {len(targets)} batch(es): {names}? [y/N] "):
            print("aiobatch batches cancel: not confirmed; nothing cancelled", file=sys.stderr)
            return USAGE
    cancelled = [await client.cancel_batch(b.id) for b in targets]
    if args.json:
        out(json.dumps([to_wire(b) for b in cancelled], indent=2))
    else:
        out(table(_BATCH_HEADER, [batch_row(b) for b in cancelled]))
    return OK


def _confirm(prompt: str) -> bool:
    """Ask on stderr, read the answer from stdin (no terminal: no)."""
    if not sys.stdin or not sys.stdin.isatty():
        print(f"{prompt}(no terminal to ask: give --yes)", file=sys.stderr)
        return False
    print(prompt, end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


async def _download_batch(client: BatchClient, args: argparse.Namespace) -> int:
    batch = await client.retrieve_batch(args.batch_id)
    os.makedirs(args.dir, exist_ok=True)
    saved = 0
    for kind, file_id in (("output", batch.output_file_id), ("errors", batch.error_file_id)):
        if file_id:
            path = os.path.join(args.dir, f"{batch.id}.{kind}.jsonl")
            size = await client.download_file(file_id, path)
            out(f"{path}: {size:,} bytes")
            saved += 1
    if not saved:
        status = batch.raw_status or batch.status.value
        out(f"{batch.id} ({status}) has no output or error file yet")
    return OK


# -- files -----------------------------------------------------------------------------


def _files_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list files")
    listing.add_argument("--purpose", default=None, help="only files of this purpose")
    listing.add_argument("--limit", type=count, default=100, help="list at most this many")
    _json_flag(listing)
    _connection(listing)
    upload = actions.add_parser("upload", help="upload a file")
    upload.add_argument("path", help="the file (a JSONL batch input)")
    upload.add_argument("--purpose", default="batch", help="the file's purpose")
    _json_flag(upload)
    _connection(upload)
    delete = actions.add_parser("delete", help="delete files")
    delete.add_argument("file_ids", nargs="+", metavar="FILE_ID", help="the files")
    _connection(delete)


_FILES_EXAMPLES = """\
examples:
  aiobatch files list --purpose batch
  aiobatch files upload requests.jsonl
  aiobatch files delete file-abc123 file-def456

exit status: 0 done, 2 usage error, 4 the provider answered with an error"""


@command(
    "files",
    "list, upload and delete the files in an account",
    _files_arguments,
    epilog=_FILES_EXAMPLES,
)
def _files(args: argparse.Namespace) -> int:
    actions: dict[str, Callable[[BatchClient, argparse.Namespace], Awaitable[int]]] = {
        "list": _list_files,
        "upload": _upload_file,
        "delete": _delete_files,
    }
    return _with_client("files", args, actions[args.action])


async def _list_files(client: BatchClient, args: argparse.Namespace) -> int:
    files: list[File] = []
    async for file in client.list_files(purpose=args.purpose):
        files.append(file)
        if len(files) >= args.limit:
            break
    if args.json:
        out(json.dumps([to_wire(f) for f in files], indent=2))
    else:
        out(table(_FILE_HEADER, [file_row(f) for f in files]))
    return OK


async def _upload_file(client: BatchClient, args: argparse.Namespace) -> int:
    file = await client.upload_file(args.path, purpose=args.purpose)
    if args.json:
        out(json.dumps(to_wire(file), indent=2))
    else:
        out(table(_FILE_HEADER, [file_row(file)]))
    return OK


async def _delete_files(client: BatchClient, args: argparse.Namespace) -> int:
    for file_id in args.file_ids:
        deleted = await client.delete_file(file_id)
        out(f"{deleted.id}: {'deleted' if deleted.deleted else 'not deleted'}")
    return OK
