"""The run layer: a whole request set through the Batch API, resumable, exactly once.

Private; :mod:`aiobatch` re-exports the public names. The layout (each module owns one
thing; see DESIGN.md):

- ``_config``: :class:`RunConfig`, :class:`RunResult`, what a run reads;
- ``_states``: the shard lifecycle as data (states, the table of moves);
- ``_records``: the typed records a run and its journal trade;
- ``_journal``: the :class:`Journal` protocol; ``_sqlite``: its SQLite file;
- ``_preflight`` (with ``_line_checks``, the checks of one line), ``_ingest``: checking
  the source into the journal;
- ``_planning``: cutting requests into shards (a new run's as its ingest adds them,
  pending ones for a retry round);
- ``_outcomes``: what a result means (final, or another round);
- ``_context``: what the steps share;
- ``_start``: what a run settles before its first step (output check, ingest or
  source check, work folder, the steps' context and the fleet's config);
- ``_submit``, ``_collect``, ``_settle``: the steps, each returning the shard's next
  state;
- ``_dispatch``: a shard's tasks (its submission and collection loops, the fleet's
  events, resume, tracking);
- ``_supervise``: the loop that plans pending requests until every one has its result
  (:func:`plan_pending`, the planning step);
- ``_cancel``: a cancel from inside the run (:func:`wind_down`); ``_control``: cancel,
  liveness, from outside the run's process;
- ``_report``, ``_progress``: what a run did, and a live display of it; ``_follow``:
  its final results as they come;
- ``_batch_run``: :class:`BatchRun`, which dispatches by state;
- ``_worker``: :class:`Worker` and :class:`SharedRun`, runs shared by several processes
  on a PostgreSQL journal (``_postgres*``), by leases.
"""

from ._batch_run import BatchRun
from ._config import Price, RequestSource, RunConfig, RunResult
from ._control import cancel_batches, request_cancel, run_is_live
from ._events import BatchCreated, BatchEnded, BatchEvent
from ._journal import Journal
from ._progress import ProgressDisplay, RunProgress
from ._report import RunReport, build_report, format_report, read_report
from ._sqlite import JournalFile
from ._sqlite_journal import SQLiteJournal
from ._states import SHARD_MOVES, ShardState
from ._worker import SharedRun, Worker

__all__ = [
    "SHARD_MOVES",
    "BatchCreated",
    "BatchEnded",
    "BatchEvent",
    "BatchRun",
    "Journal",
    "JournalFile",
    "Price",
    "ProgressDisplay",
    "RequestSource",
    "RunConfig",
    "RunProgress",
    "RunReport",
    "RunResult",
    "SQLiteJournal",
    "SharedRun",
    "ShardState",
    "Worker",
    "build_report",
    "cancel_batches",
    "format_report",
    "read_report",
    "request_cancel",
    "run_is_live",
]
