"""What a run did, read from its journal: :class:`RunReport` and its text form."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import attrs

from ._progress import BATCH_STATUS_ORDER, RunProgress, _elapsed_text
from ._records import JournalCounts, RunMeta, token_pairs

if TYPE_CHECKING:
    from ._config import Price
    from ._context import RunContext
    from ._journal import Journal
    from ._sqlite import JournalFile

__all__ = [
    "RunReport",
    "as_shown",
    "build_report",
    "final_report",
    "format_report",
    "journal_report",
    "load_counts",
    "read_report",
    "run_progress",
]


def _frozen(value: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(value))


def _frozen_tokens(value: Mapping[str, tuple[int, int]]) -> Mapping[str, tuple[int, int]]:
    return MappingProxyType(dict(value))


def _frozen_costs(value: Mapping[str, float]) -> Mapping[str, float]:
    return MappingProxyType(dict(value))


def _ordered(counts: Mapping[str, int]) -> list[tuple[str, int]]:
    known = [(name, counts[name]) for name in BATCH_STATUS_ORDER if counts.get(name)]
    rest = sorted((k, v) for k, v in counts.items() if k not in BATCH_STATUS_ORDER and v)
    return known + rest


@attrs.frozen(slots=True, kw_only=True)
class RunReport:
    """Counts of a run, as its journal has them.

    Attributes:
        run_id: the run's id (in every batch's ``aiobatch_run`` metadata).
        state: ``running``, ``cancelling``, ``cancelled`` (its batches were cancelled),
            ``stopped`` (stopped without cancelling them), ``done`` or ``failed``; or
            ``interrupted``: the journal says running or cancelling but no process runs
            it (the process was killed; running it again resumes it).
        requests: accepted requests.
        succeeded: requests whose final result is a success.
        failed: requests whose final result is an error (HTTP error or batch error).
        pending: requests without a final result yet.
        skipped: input lines rejected by preflight and skipped (``skip_invalid``).
        errors: final errors by code (the HTTP status for an HTTP error without one).
        retried: requests submitted again at least once (after a retryable failure).
        rounds: retry rounds used (0 when nothing was re-submitted).
        batches: batches created.
        recreated: batches re-created from their uploaded file after
            ``token_limit_exceeded``.
        statuses: shards by their batch's last status (or the shard's state before its
            batch exists: ``planned``, ``uploaded``, ``creating``).
        input_tokens: prompt tokens of the final results, from their ``usage``.
        output_tokens: completion tokens of the final results.
        elapsed: seconds from the run's start to ``now`` or, by default, to the last
            moment it recorded (on the run's clock), downtime included.
        output: the output file, once written.
        extra_uploads_deleted: extra copies of shard input files, left on the server
            by uploads whose answer was lost, that the run deleted.
        live: whether a process runs the journal right now (None: not checked).
        tokens_by_model: model -> (prompt, completion) tokens of the final results
            (each request counted once; ``""`` for results of no model), in the report
            a run returns.
        cost_by_model: model -> the dollars its tokens cost, for the models
            ``RunConfig.prices`` has a price for.
    """

    run_id: str
    state: str
    requests: int
    succeeded: int
    failed: int
    pending: int
    skipped: int = 0
    errors: Mapping[str, int] = attrs.field(factory=dict, converter=_frozen)
    retried: int = 0
    rounds: int = 0
    batches: int = 0
    recreated: int = 0
    statuses: Mapping[str, int] = attrs.field(factory=dict, converter=_frozen)
    input_tokens: int = 0
    output_tokens: int = 0
    elapsed: float = 0.0
    output: str | None = None
    extra_uploads_deleted: int = 0
    live: bool | None = None
    tokens_by_model: Mapping[str, tuple[int, int]] = attrs.field(
        factory=dict, converter=_frozen_tokens
    )
    cost_by_model: Mapping[str, float] = attrs.field(factory=dict, converter=_frozen_costs)

    @property
    def cost(self) -> float | None:
        """The dollars of every priced model's tokens (None when no model has a price)."""
        return sum(self.cost_by_model.values()) if self.cost_by_model else None

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.input_tokens + self.output_tokens

    @property
    def complete(self) -> bool:
        """Every request has its final result."""
        return self.pending == 0


#: The states a run records while a process runs it.
_UNDERWAY = ("running", "cancelling")


def read_report(
    journal: JournalFile, *, now: float | None = None, live: bool | None = None
) -> RunReport:
    """The report of the run a journal file holds, at any time (also while it runs).

    Args:
        journal: the run's journal file (``JournalFile(path, readonly=True)``).
        now: the current time on the run's clock, for ``elapsed`` (default: the last
            time the run recorded: its latest step, or the time it notes every
            ``cancel_poll_interval`` seconds while it runs).
        live: whether a process runs the journal (:func:`aiobatch._run.run_is_live`);
            False makes a run recorded as underway ``interrupted``.
    """
    return build_report(journal.meta(), journal.counts(), now=now, live=live)


def build_report(
    meta: RunMeta | None,
    counts: JournalCounts,
    *,
    now: float | None = None,
    live: bool | None = None,
) -> RunReport:
    """A report from a run's facts and figures (see :func:`read_report`)."""
    states = counts.requests
    kinds = counts.kinds
    started = meta.started_at if meta is not None else 0.0
    last = max(meta.updated_at if meta is not None else 0.0, counts.last_step, started)
    elapsed = max(0.0, (now if now is not None else last) - started) if started else 0.0
    state = meta.state if meta is not None else "?"
    if live is False and state in _UNDERWAY:
        state = "interrupted"
    return RunReport(
        run_id=meta.run_id if meta is not None else "?",
        state=state,
        requests=sum(states.values()),
        succeeded=int(kinds.get("success", 0)),
        failed=sum(v for k, v in kinds.items() if k != "success"),
        pending=sum(v for k, v in states.items() if k != "done"),
        skipped=meta.skipped if meta is not None else 0,
        errors=counts.codes,
        retried=counts.retried,
        rounds=counts.rounds,
        batches=counts.batches,
        recreated=counts.recreated,
        statuses=counts.statuses,
        input_tokens=counts.input_tokens,
        output_tokens=counts.output_tokens,
        elapsed=elapsed,
        output=meta.output_written if meta is not None else None,
        extra_uploads_deleted=meta.extra_uploads_deleted if meta is not None else 0,
        live=live,
    )


async def journal_report(journal: Journal) -> RunReport:
    """The report of the run a :class:`~._journal.Journal` holds (its figures read in the
    journal's worker thread, see :meth:`~._journal.Journal.counts`: a pass over every
    result)."""
    return build_report(await journal.meta(), await journal.counts(background=True))


async def final_report(journal: Journal, prices: Mapping[str, Price]) -> RunReport:
    """The report a run returns as it ends: with its tokens, and their cost for the
    models ``prices`` has (read as for :func:`journal_report`)."""
    report = await journal_report(journal)
    tokens = await journal.tokens_by_model(background=True)
    return attrs.evolve(
        report,
        tokens_by_model=token_pairs(tokens),
        cost_by_model={
            m: prices[m].cost(t.input, t.output) for m, t in tokens.items() if m in prices
        },
    )


async def load_counts(ctx: RunContext) -> None:
    """Start a run's progress figures from what its journal already holds (read as for
    :func:`journal_report`: a resumed run may have many results)."""
    report = await journal_report(ctx.journal)
    ctx.counts.update(
        total=report.requests,
        succeeded=report.succeeded,
        failed=report.failed,
        retrying=await ctx.journal.retrying_count(),
    )
    ctx.round = report.rounds


def run_progress(
    ctx: RunContext | None,
    *,
    state: str,
    started_at: float,
    final: RunReport | None,
    last: RunProgress | None,
) -> RunProgress:
    """A snapshot of a run, for display: before the run has a context (and after),
    its ``last`` one in its ``state`` now; with the figures of the report it ended with,
    once it has one (``final``)."""
    if ctx is None:
        if last is not None:
            return last if last.state == state else attrs.evolve(last, state=state)
        return RunProgress(
            total=0,
            succeeded=0,
            failed=0,
            retrying=0,
            batches={},
            round=0,
            elapsed=0.0,
            state=state,
        )
    snapshot = ctx.progress(state=state, started_at=started_at)
    if final is not None:
        snapshot = as_shown(snapshot, final)
    return snapshot


def as_shown(snapshot: RunProgress, final: RunReport) -> RunProgress:
    """A progress snapshot with the figures of the report the run ended with (so that
    the two agree)."""
    return attrs.evolve(
        snapshot,
        total=final.requests,
        succeeded=final.succeeded,
        failed=final.failed,
        batches={status: n for status, n in final.statuses.items() if n},
        round=final.rounds,
        elapsed=final.elapsed,
    )


def format_duration(seconds: float) -> str:
    """``"45s"``, ``"12m03s"``, ``"3h07m"``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_report(report: RunReport) -> str:
    """The report as a few lines of text (what ``aiobatch run`` and ``aiobatch status``
    print)."""
    state = report.state
    if state == "interrupted":
        state += " (no process is running it; run the same command again to resume)"
    lines = [
        f"run {report.run_id}: {state}, {_elapsed_text(report.elapsed)} elapsed",
        f"requests: {report.requests:,} ({report.succeeded:,} succeeded, "
        f"{report.failed:,} failed, {report.pending:,} pending)"
        + (f"; {report.skipped:,} invalid input lines skipped" if report.skipped else ""),
    ]
    if report.errors:
        errors = ", ".join(
            f"{code} {count:,}" for code, count in sorted(report.errors.items(), key=_by_count)
        )
        lines.append(f"errors: {errors}")
    batches = ", ".join(f"{count:,} {name}" for name, count in _ordered(report.statuses))
    lines.append(
        f"batches: {report.batches:,} created"
        + (f" ({batches})" if batches else "")
        + (
            f"; {report.recreated:,} re-created after token_limit_exceeded"
            if report.recreated
            else ""
        )
    )
    lines.append(f"retry rounds: {report.rounds} ({report.retried:,} requests re-submitted)")
    lines.append(
        f"tokens: {report.input_tokens:,} in, {report.output_tokens:,} out, "
        f"{report.total_tokens:,} total"
    )
    extras = report.extra_uploads_deleted
    if extras:
        lines.append(
            f"input files: {extras:,} extra cop{'y' if extras == 1 else 'ies'} left by lost "
            "upload answers deleted"
        )
    if report.output:
        lines.append(f"results: {report.output}")
    return "\n".join(lines)


def _by_count(item: tuple[str, int]) -> tuple[int, str]:
    return (-item[1], item[0])
