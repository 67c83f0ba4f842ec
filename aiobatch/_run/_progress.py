"""A live progress display for a run: a tqdm bar on a terminal, log lines elsewhere.

The runner hands a :class:`ProgressDisplay` a :class:`RunProgress` snapshot on every
event; the display decides whether to render it. On a terminal it draws one tqdm bar
(requests done out of the total, with the batches by status, the retries and the round
after it) redrawn at most every ``refresh`` seconds. Anywhere else (a pipe, a CI log, a
file) it writes one INFO record, :func:`format_progress`'s line, at most every
``log_interval`` seconds, and at once when the run changes state or starts a new retry
round. Closing the display always renders the final snapshot.

Time here only paces the rendering: it is read from an injected ``monotonic`` function
(wall time in real use), never slept on. The numbers shown, the run's elapsed time
included, come from the snapshot alone.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, NoReturn, TextIO

import attrs

from .._lifecycle import TERMINAL

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = [
    "BATCH_STATUS_ORDER",
    "TERMINAL_BATCH_STATUSES",
    "ProgressDisplay",
    "RunProgress",
    "format_progress",
]

BATCH_STATUS_ORDER: tuple[str, ...] = (
    "planned",
    "uploading",
    "uploaded",
    "creating",
    "validating",
    "in_progress",
    "finalizing",
    "cancelling",
    "completed",
    "failed",
    "expired",
    "cancelled",
    "file_upload_failed",
    "batch_start_failed",
    "rejected",
    "ended_unknown_status",
)
"""The order batch statuses are shown in: a batch's lifecycle, from planned to ended.
Statuses not listed here are shown after these, sorted by name."""

TERMINAL_BATCH_STATUSES: frozenset[str] = frozenset(
    {status.value for status in TERMINAL} | {"rejected", "not_found", "ended_unknown_status"}
)
"""Batch statuses that count as ended in :attr:`RunProgress.open_batches`: the
lifecycle's terminal ones (Portkey's ``file_upload_failed`` and ``batch_start_failed``
included), a shard whose create was refused, a batch the server lost, and a batch
collected in a status aiobatch does not know (``DoneReason.UNKNOWN_STATUS``)."""

_ORDER_INDEX = {status: index for index, status in enumerate(BATCH_STATUS_ORDER)}

_STATE_TEXT = {"cancelling": "cancelling", "done": "done", "cancelled": "cancelled"}
"""How a run state other than ``running`` ends the line (``failed`` reads "run failed",
so that it is not taken for a count of failed requests)."""


@attrs.frozen(slots=True)
class RunProgress:
    """A snapshot of a run, for display.

    Attributes:
        total: requests in the run.
        succeeded: requests with a final success.
        failed: requests with a final error.
        retrying: requests waiting for (or in) a retry round.
        batches: batches by status (``"planned"``, ``"uploading"``, ``"creating"``, the
            Batch API's statuses, or any other string); zero counts may be absent.
        round: the highest retry round in play (0 for the first submission).
        elapsed: seconds since the run started, on the run's clock.
        state: the run's state: ``"running"``, ``"cancelling"``, ``"stopping"``,
            ``"done"``, ``"cancelled"``, ``"stopped"`` or ``"failed"``.
    """

    total: int
    succeeded: int
    failed: int
    retrying: int
    batches: Mapping[str, int]
    round: int
    elapsed: float
    state: str

    @property
    def done(self) -> int:
        """Requests with a final result (success or error)."""
        return self.succeeded + self.failed

    @property
    def open_batches(self) -> int:
        """Batches not in a terminal status (planned, uploading and creating ones count
        as open)."""
        return sum(
            count for status, count in self.batches.items() if status not in TERMINAL_BATCH_STATUSES
        )

    def eta(self) -> float | None:
        """Seconds left at the rate requests have been done so far.

        Returns:
            0.0 when every request is done (a run of no requests included); None when
            nothing is done yet or no time has passed; otherwise the requests left over
            the average rate of done requests since the run started.
        """
        done = self.done
        if done >= self.total:
            return 0.0
        if done <= 0 or self.elapsed <= 0:
            return None
        return (self.total - done) * self.elapsed / done


def _status_key(status: str) -> tuple[int, str]:
    """Sort key: lifecycle order first, unknown statuses after, by name."""
    return (_ORDER_INDEX.get(status, len(BATCH_STATUS_ORDER)), status)


def _batches_text(batches: Mapping[str, int]) -> str:
    """``"2 validating, 5 in_progress, 3 completed"``; ``"none"`` when there are none."""
    parts = [
        f"{batches[status]:,} {status}"
        for status in sorted(batches, key=_status_key)
        if batches[status]
    ]
    return ", ".join(parts) if parts else "none"


def _elapsed_text(seconds: float) -> str:
    """A duration to the second: ``"42s"``, ``"12m03s"``, ``"2h05m"``."""
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _eta_text(seconds: float) -> str:
    """A time left, rounded up and coarse: ``"42s"``, ``"36m"``, ``"2h05m"``."""
    whole = max(0, math.ceil(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes = math.ceil(whole / 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _tail_text(progress: RunProgress) -> str:
    """``"12m03s elapsed, ETA 36m"`` while running, the run's state after that."""
    text = f"{_elapsed_text(progress.elapsed)} elapsed"
    if progress.state == "running":
        eta = progress.eta()
        if eta is not None:
            text += f", ETA {_eta_text(eta)}"
        return text
    return f"{text}, {_STATE_TEXT.get(progress.state, f'run {progress.state}')}"


def format_progress(progress: RunProgress) -> str:
    """One line that describes a run, for logs.

    For example ``"1,234/5,000 requests (1,200 ok, 34 failed, 10 retrying) | batches: 2
    validating, 5 in_progress, 3 completed | round 1 | 12m03s elapsed, ETA 36m"``.
    Batches are listed in lifecycle order (statuses aiobatch does not know after, by
    name) without zero counts; the round is left out while it is 0; the ETA is left out
    when it is unknown, and once the run is no longer running its state takes its place
    (``"done"``, ``"cancelling"``, ``"cancelled"``, ``"run failed"``).

    Args:
        progress: the snapshot to describe.

    Returns:
        The line, without a newline.
    """
    parts = [
        f"{progress.done:,}/{progress.total:,} requests ({progress.succeeded:,} ok, "
        f"{progress.failed:,} failed, {progress.retrying:,} retrying)",
        f"batches: {_batches_text(progress.batches)}",
    ]
    if progress.round:
        parts.append(f"round {progress.round}")
    parts.append(_tail_text(progress))
    return " | ".join(parts)


def _postfix(progress: RunProgress) -> str:
    """The text after a tqdm bar: outcomes, batches by status, round, a state other
    than running."""
    parts = [
        f"{progress.succeeded:,} ok, {progress.failed:,} failed, {progress.retrying:,} retrying",
        f"batches: {_batches_text(progress.batches)}",
    ]
    if progress.round:
        parts.append(f"round {progress.round}")
    if progress.state != "running":
        parts.append(_STATE_TEXT.get(progress.state, f"run {progress.state}"))
    return " | ".join(parts)


def _isatty(stream: TextIO) -> bool:
    """Whether the stream is a terminal (False when it cannot tell, e.g. closed)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


class ProgressDisplay:
    """Shows a run's progress as it goes: a tqdm bar on a terminal, log lines otherwise.

    :meth:`update` is cheap and meant to be called on every event; it renders a
    snapshot only when enough time has passed since the last rendering (``refresh`` for
    the bar, ``log_interval`` for log lines) or when the run's ``state`` or ``round``
    changed. The first snapshot is rendered at once. Snapshots skipped in between are
    not lost: :meth:`close` renders the last one (or the one it is given) whatever the
    time, then leaves the bar on screen. Updates after :meth:`close` are ignored.

    Use it as a context manager to close it on the way out::

        with ProgressDisplay() as display:
            ...
            display.update(progress)

    Args:
        stream: where the bar goes (``sys.stderr`` by default). Log lines go to
            ``logger``'s handlers, not to this stream.
        interactive: draw a bar (True) or write log lines (False); None draws a bar
            when ``stream`` is a terminal.
        log_interval: the shortest time between two log lines, in seconds.
        refresh: the shortest time between two redraws of the bar, in seconds.
        monotonic: the clock that paces rendering (seconds, never going back).
        logger: where log lines go (``logging.getLogger("aiobatch.run")`` by default),
            at INFO level.

    Raises:
        ValueError: ``log_interval`` or ``refresh`` is negative.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        interactive: bool | None = None,
        log_interval: float = 30.0,
        refresh: float = 0.2,
        monotonic: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
    ) -> None:
        if log_interval < 0:
            raise ValueError(f"log_interval must be >= 0, got {log_interval!r}")
        if refresh < 0:
            raise ValueError(f"refresh must be >= 0, got {refresh!r}")
        self._stream: TextIO = sys.stderr if stream is None else stream
        self._interactive = _isatty(self._stream) if interactive is None else interactive
        self._interval = refresh if self._interactive else log_interval
        self._monotonic = monotonic
        self._logger = logging.getLogger("aiobatch.run") if logger is None else logger
        self._bar: tqdm[NoReturn] | None = None  # tqdm is imported when a bar is drawn
        self._latest: RunProgress | None = None
        self._rendered: RunProgress | None = None
        self._rendered_at = 0.0
        self._closed = False

    @property
    def interactive(self) -> bool:
        """Whether the display draws a bar (True) or writes log lines (False)."""
        return self._interactive

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    def update(self, progress: RunProgress) -> None:
        """Take a new snapshot; render it if it is time to (see the class docstring).

        Args:
            progress: the run as it is now.
        """
        if self._closed:
            return
        self._latest = progress
        last = self._rendered
        now = self._monotonic()
        if (
            last is None
            or progress.state != last.state
            or progress.round != last.round
            or now - self._rendered_at >= self._interval
        ):
            self._render(progress, now)

    def close(self, progress: RunProgress | None = None) -> None:
        """Render the final snapshot and close the bar (leaving it on screen).

        The final snapshot is ``progress``, or else the last one :meth:`update` was
        given; it is rendered whatever the time, unless it is the very snapshot
        rendered last. Calling this again does nothing.

        Args:
            progress: the run's final state, if the last update was not it.
        """
        if self._closed:
            return
        self._closed = True
        final = self._latest if progress is None else progress
        try:
            if final is not None and final != self._rendered:
                self._render(final, self._monotonic())
        finally:
            if self._bar is not None:
                self._bar.close()

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _render(self, progress: RunProgress, now: float) -> None:
        """Show one snapshot now: redraw the bar or write a log line."""
        self._rendered = progress
        self._rendered_at = now
        if not self._interactive:
            if self._logger.isEnabledFor(logging.INFO):
                self._logger.info("%s", format_progress(progress), extra={"progress": progress})
            return
        postfix = _postfix(progress)
        bar = self._bar
        if bar is None:
            # tqdm draws the bar once on creation; our own pacing decides every redraw
            # after that (mininterval=0; the bar is never advanced with update()).
            # Its rate and ETA count only what is done from here on (initial), at the
            # average rate (smoothing=0).
            from tqdm import tqdm  # only when a bar is shown: `import aiobatch` stays light

            self._bar = tqdm(
                total=progress.total,
                initial=progress.done,
                unit="req",
                file=self._stream,
                dynamic_ncols=True,
                mininterval=0,
                smoothing=0,
                leave=True,
                postfix=postfix,
            )
            return
        bar.total = progress.total
        bar.n = progress.done
        bar.set_postfix_str(postfix, refresh=False)
        bar.refresh()
