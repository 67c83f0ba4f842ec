"""What a run settles before its first step: its output path checked, its source taken
into the journal (or checked against the journal's), where its shard files go, and the
context its steps share (the fleet's config drawn from the run's)."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable

import attrs

from .._client import BatchClient
from .._fleet import Fleet, FleetConfig
from ..errors import InputError
from ..webhooks import DEFAULT_WEBHOOK_INTERVAL
from ._config import RequestSource, RunConfig
from ._context import RunContext
from ._ingest import check_source, ingest
from ._journal import Journal
from ._planning import ShardLimits
from ._sqlite_db import remove_journal

__all__ = [
    "check_output",
    "default_work_dir",
    "ingest_or_check",
    "run_context",
    "shard_limits",
]


def check_output(output: str | None) -> None:
    """Refuse, before any work, an output file that cannot be written at the end."""
    if output is not None:
        if os.path.isdir(output):
            raise InputError(f"the output path {output} is a directory; give a file path")
        folder = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(folder):
            raise InputError(f"the output file's folder {folder} does not exist")


async def ingest_or_check(
    journal: Journal,
    source: RequestSource | None,
    *,
    client: BatchClient,
    config: RunConfig,
    remove: str | None,
) -> bool:
    """Ingest the source into a new journal, or check it against the journal's;
    True when the run resumes. A failed ingest removes the journal file ``remove``
    (a database ingest leaves nothing behind)."""
    meta = await journal.meta()
    if meta is None:
        assert source is not None
        try:
            await ingest(
                journal,
                source,
                config=config,
                clock=client.clock,
                max_line_bytes=config.max_bytes or client.provider.limits.max_bytes,
                plan=shard_limits(config, client),
                custom_id_pattern=client.provider.limits.custom_id_pattern,
            )
        except BaseException:
            if remove is not None:
                await journal.close()
                remove_journal(remove)
            raise
        return False
    await check_source(journal, meta, source)
    return True


def shard_limits(config: RunConfig, client: BatchClient) -> ShardLimits:
    """How big the run's shards may be: the run's limits, else the provider's."""
    limits = client.provider.limits
    return ShardLimits(
        max_lines=config.max_lines or limits.max_lines,
        max_bytes=config.max_bytes or limits.max_bytes,
        max_inputs=limits.max_embedding_inputs,
        token_limits=config.enqueued_token_limits,
    )


def default_work_dir(
    journal_path: str, *, pg_name: str | None, output: str | None, run_id: str
) -> str:
    """Where shard files are written: beside a SQLite journal; beside the output
    file (else in the temporary folder) for a database journal."""
    if pg_name is None:
        return journal_path + ".files"
    if output is not None:
        return f"{output}.{run_id}.files"
    return os.path.join(tempfile.gettempdir(), f"aiobatch-{run_id}.files")


def fleet_config(config: RunConfig, *, webhooks: bool) -> FleetConfig:
    """The config of the fleet that tracks a run's batches, drawn from the run's."""
    fleet_config = config.fleet or FleetConfig()
    if fleet_config.max_retry_wait != config.max_retry_wait:
        fleet_config = attrs.evolve(fleet_config, max_retry_wait=config.max_retry_wait)
    if config.batch_timeout is not None or fleet_config.timeout is not None:
        # A deadline cancels the batch and keeps tracking it to its end: its lines
        # must not run elsewhere while it may still run them.
        fleet_config = attrs.evolve(fleet_config, cancel_on_deadline=True)
    if webhooks and fleet_config.webhook_interval is None:
        interval = max(DEFAULT_WEBHOOK_INTERVAL, fleet_config.min_interval)
        fleet_config = attrs.evolve(fleet_config, webhook_interval=interval)
    return fleet_config


def run_context(
    client: BatchClient,
    config: RunConfig,
    journal: Journal,
    run_id: str,
    *,
    webhooks: bool,
    work_dir: str,
    emit: Callable[[], None],
    stop: Callable[[str], None],
    stopping: asyncio.Event,
    changed: asyncio.Event,
    results_changed: asyncio.Event,
) -> RunContext:
    """The context a run's steps share, with the fleet that tracks its batches
    (``webhooks``: a receiver feeds it, so it polls seldom)."""
    return RunContext(
        client=client,
        config=config,
        journal=journal,
        run_id=run_id,
        fleet=Fleet(
            client,
            config=fleet_config(config, webhooks=webhooks),
            status_aliases=config.status_aliases,
        ),
        emit=emit,
        stop=stop,
        shard_limits=shard_limits(config, client),
        work_dir=work_dir,
        stopping=stopping,
        changed=changed,
        results_changed=results_changed,
    )
