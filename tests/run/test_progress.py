"""The run's progress display: the snapshot, its one-line text, and the paced display."""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping

import attrs
import pytest

from aiobatch._run._progress import ProgressDisplay, RunProgress, format_progress

LOGGER = "aiobatch.run"


class FakeMonotonic:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class TTYStringIO(io.StringIO):
    """A StringIO that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def snapshot(
    *,
    total: int = 100,
    succeeded: int = 0,
    failed: int = 0,
    retrying: int = 0,
    batches: Mapping[str, int] | None = None,
    round: int = 0,
    elapsed: float = 0.0,
    state: str = "running",
) -> RunProgress:
    """A RunProgress with defaults for what a test does not care about."""
    return RunProgress(
        total=total,
        succeeded=succeeded,
        failed=failed,
        retrying=retrying,
        batches={} if batches is None else batches,
        round=round,
        elapsed=elapsed,
        state=state,
    )


def progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages the display logged."""
    return [record.getMessage() for record in caplog.records if record.name == LOGGER]


@pytest.fixture
def clock() -> FakeMonotonic:
    """A fake monotonic clock at 0."""
    return FakeMonotonic()


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """caplog, capturing the display's INFO records."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    return caplog


# -- RunProgress -------------------------------------------------------------------------


def test_done_is_succeeded_plus_failed() -> None:
    """done counts every request with a final result, success or error."""
    assert snapshot(succeeded=7, failed=3, retrying=5).done == 10


def test_open_batches_counts_non_terminal_statuses() -> None:
    """open_batches counts planned/uploading/creating and live statuses, not ended ones."""
    progress = snapshot(
        batches={
            "planned": 1,
            "uploading": 2,
            "creating": 3,
            "validating": 4,
            "in_progress": 5,
            "finalizing": 6,
            "cancelling": 7,
            "completed": 100,
            "failed": 100,
            "expired": 100,
            "cancelled": 100,
            "file_upload_failed": 100,
            "batch_start_failed": 100,
        }
    )
    assert progress.open_batches == 28


def test_eta_extrapolates_the_average_rate() -> None:
    """eta() is the requests left over the rate of done requests since the start."""
    progress = snapshot(total=1000, succeeded=200, failed=50, elapsed=100.0)
    assert progress.eta() == pytest.approx(300.0)


def test_eta_is_none_before_anything_is_done() -> None:
    """eta() is None while no request is done yet."""
    assert snapshot(total=10, retrying=3, elapsed=50.0).eta() is None


def test_eta_is_none_when_no_time_has_passed() -> None:
    """eta() is None at elapsed 0, even with requests done."""
    assert snapshot(total=10, succeeded=2, elapsed=0.0).eta() is None


def test_eta_is_zero_when_everything_is_done() -> None:
    """eta() is 0 once done equals total, whatever the elapsed time."""
    assert snapshot(total=10, succeeded=8, failed=2, elapsed=5.0).eta() == 0.0
    assert snapshot(total=10, succeeded=10, elapsed=0.0).eta() == 0.0


def test_eta_of_an_empty_run_is_zero() -> None:
    """A run of no requests has nothing left: eta() is 0."""
    assert snapshot(total=0).eta() == 0.0


# -- format_progress ---------------------------------------------------------------------


def test_format_progress_matches_the_documented_example() -> None:
    """The line holds counts, batches, round, elapsed and ETA in the documented shape."""
    progress = snapshot(
        total=5000,
        succeeded=1200,
        failed=34,
        retrying=10,
        batches={"completed": 3, "in_progress": 5, "validating": 2},
        round=1,
        elapsed=723.0,
    )
    assert format_progress(progress) == (
        "1,234/5,000 requests (1,200 ok, 34 failed, 10 retrying) | batches: 2 validating, "
        "5 in_progress, 3 completed | round 1 | 12m03s elapsed, ETA 37m"
    )


def test_format_progress_uses_thousands_separators() -> None:
    """Every count, batch counts included, has thousands separators."""
    progress = snapshot(
        total=1_234_567,
        succeeded=1_000_000,
        failed=2_345,
        retrying=12_000,
        batches={"in_progress": 1_500},
        elapsed=10.0,
    )
    line = format_progress(progress)
    assert line.startswith(
        "1,002,345/1,234,567 requests (1,000,000 ok, 2,345 failed, 12,000 retrying)"
    )
    assert "batches: 1,500 in_progress" in line


def test_format_progress_lists_statuses_in_lifecycle_order() -> None:
    """Batches follow the lifecycle order, unknown statuses after it sorted, zeros left out."""
    progress = snapshot(
        batches={
            "zeta": 1,
            "cancelled": 1,
            "completed": 2,
            "alpha": 3,
            "expired": 4,
            "in_progress": 5,
            "planned": 6,
            "failed": 7,
            "finalizing": 0,
            "cancelling": 8,
            "creating": 9,
            "validating": 10,
            "uploading": 11,
            "batch_start_failed": 12,
        }
    )
    assert (
        "batches: 6 planned, 11 uploading, 9 creating, 10 validating, 5 in_progress, "
        "8 cancelling, 2 completed, 7 failed, 4 expired, 1 cancelled, "
        "12 batch_start_failed, 3 alpha, 1 zeta |"
    ) in format_progress(progress)


def test_format_progress_without_batches_says_none() -> None:
    """With no batches (or only zero counts) the batches part reads 'none'."""
    assert "| batches: none |" in format_progress(snapshot())
    assert "| batches: none |" in format_progress(snapshot(batches={"completed": 0}))


def test_format_progress_shows_the_round_only_after_the_first() -> None:
    """Round 0 (the first submission) is left out; a retry round is shown."""
    assert "round" not in format_progress(snapshot(round=0))
    assert "| round 2 |" in format_progress(snapshot(round=2))


@pytest.mark.parametrize(
    ("elapsed", "text"),
    [
        (0.0, "0s elapsed"),
        (42.9, "42s elapsed"),
        (60.0, "1m00s elapsed"),
        (723.0, "12m03s elapsed"),
        (3599.0, "59m59s elapsed"),
        (3600.0, "1h00m elapsed"),
        (7530.0, "2h05m elapsed"),
        (100_000.0, "27h46m elapsed"),
    ],
)
def test_format_progress_elapsed_is_human_readable(elapsed: float, text: str) -> None:
    """Elapsed time reads in seconds, minutes and seconds, or hours and minutes."""
    assert text in format_progress(snapshot(elapsed=elapsed))


@pytest.mark.parametrize(
    ("elapsed", "text"),
    [
        (10.0, "ETA 30s"),  # 25 done in 10s, 75 left
        (19.5, "ETA 59s"),  # 58.5s left
        (19.9, "ETA 1m"),  # 59.7s left, rounded up to a minute
        (20.0, "ETA 1m"),
        (100.0, "ETA 5m"),
        (100.1, "ETA 6m"),
        (1180.0, "ETA 59m"),
        (1199.0, "ETA 1h00m"),
        (2510.0, "ETA 2h06m"),
    ],
)
def test_format_progress_eta_is_rounded_up_and_coarse(elapsed: float, text: str) -> None:
    """The ETA reads in seconds, whole minutes, or hours and minutes, rounded up."""
    line = format_progress(snapshot(total=100, succeeded=25, elapsed=elapsed))
    assert line.endswith(f"elapsed, {text}")


def test_format_progress_leaves_out_an_unknown_eta() -> None:
    """Before any request is done the line ends with the elapsed time, no ETA."""
    line = format_progress(snapshot(total=100, retrying=4, elapsed=30.0))
    assert line.endswith("| 30s elapsed")
    assert "ETA" not in line


def test_format_progress_done_state_replaces_the_eta() -> None:
    """A finished run says 'done' where the ETA was."""
    progress = snapshot(
        total=5000, succeeded=4990, failed=10, batches={"completed": 3}, elapsed=90.0, state="done"
    )
    assert format_progress(progress) == (
        "5,000/5,000 requests (4,990 ok, 10 failed, 0 retrying) | batches: 3 completed "
        "| 1m30s elapsed, done"
    )


@pytest.mark.parametrize(
    ("state", "text"),
    [
        ("cancelling", "5s elapsed, cancelling"),
        ("cancelled", "5s elapsed, cancelled"),
        ("failed", "5s elapsed, run failed"),
        ("paused", "5s elapsed, run paused"),
    ],
)
def test_format_progress_names_a_state_other_than_running(state: str, text: str) -> None:
    """Any state but running ends the line instead of an ETA ('failed' as 'run failed')."""
    line = format_progress(snapshot(total=10, succeeded=5, elapsed=5.0, state=state))
    assert line.endswith(f"| {text}")
    assert "ETA" not in line


# -- ProgressDisplay, log lines ----------------------------------------------------------


def test_log_lines_are_rate_limited(clock: FakeMonotonic, logs: pytest.LogCaptureFixture) -> None:
    """Updates within log_interval give one line; the first after it gives the next."""
    display = ProgressDisplay(io.StringIO(), interactive=False, monotonic=clock)
    for done in range(10):
        display.update(snapshot(succeeded=done, elapsed=float(done)))
        clock.advance(2.9)  # ten updates in 29s < 30s
    assert progress_lines(logs) == [format_progress(snapshot(succeeded=0, elapsed=0.0))]
    clock.now = 30.0
    display.update(snapshot(succeeded=50, elapsed=30.0))
    assert progress_lines(logs)[1:] == [format_progress(snapshot(succeeded=50, elapsed=30.0))]


def test_log_interval_is_configurable(clock: FakeMonotonic, logs: pytest.LogCaptureFixture) -> None:
    """log_interval sets the pause between lines."""
    display = ProgressDisplay(io.StringIO(), interactive=False, log_interval=5.0, monotonic=clock)
    for done in range(11):
        display.update(snapshot(succeeded=done))
        clock.advance(1.0)
    assert [line.split("/")[0] for line in progress_lines(logs)] == ["0", "5", "10"]


def test_log_lines_are_info_records_with_the_snapshot(
    clock: FakeMonotonic, logs: pytest.LogCaptureFixture
) -> None:
    """Each line is an INFO record of aiobatch.run carrying the snapshot as 'progress'."""
    display = ProgressDisplay(io.StringIO(), interactive=False, monotonic=clock)
    progress = snapshot(succeeded=3)
    display.update(progress)
    (record,) = [r for r in logs.records if r.name == LOGGER]
    assert record.levelno == logging.INFO
    assert record.progress is progress  # type: ignore[attr-defined]


def test_log_lines_go_to_the_given_logger(
    clock: FakeMonotonic, caplog: pytest.LogCaptureFixture
) -> None:
    """A logger passed in receives the lines instead of aiobatch.run."""
    caplog.set_level(logging.INFO)
    display = ProgressDisplay(
        io.StringIO(), interactive=False, monotonic=clock, logger=logging.getLogger("mine")
    )
    display.update(snapshot())
    assert [r.name for r in caplog.records] == ["mine"]


def test_state_change_is_logged_at_once(
    clock: FakeMonotonic, logs: pytest.LogCaptureFixture
) -> None:
    """A change of state is logged within log_interval of the previous line."""
    display = ProgressDisplay(io.StringIO(), interactive=False, monotonic=clock)
    display.update(snapshot(succeeded=1))
    clock.advance(1.0)
    display.update(snapshot(succeeded=2))
    clock.advance(1.0)
    display.update(snapshot(succeeded=3, state="cancelling"))
    lines = progress_lines(logs)
    assert len(lines) == 2
    assert lines[1].startswith("3/100 requests")
    assert lines[1].endswith("cancelling")


def test_round_change_is_logged_at_once(
    clock: FakeMonotonic, logs: pytest.LogCaptureFixture
) -> None:
    """A new retry round is logged within log_interval of the previous line."""
    display = ProgressDisplay(io.StringIO(), interactive=False, monotonic=clock)
    display.update(snapshot(succeeded=1))
    clock.advance(1.0)
    display.update(snapshot(succeeded=2))
    display.update(snapshot(succeeded=3, round=1))
    display.update(snapshot(succeeded=4, round=1))
    lines = progress_lines(logs)
    assert len(lines) == 2
    assert "| round 1 |" in lines[1]
    assert lines[1].startswith("3/100 requests")


def test_immediate_line_restarts_the_interval(
    clock: FakeMonotonic, logs: pytest.LogCaptureFixture
) -> None:
    """After a line forced by a state change, the next waits a full log_interval."""
    display = ProgressDisplay(io.StringIO(), interactive=False, monotonic=clock)
    display.update(snapshot(succeeded=1))
    clock.now = 20.0
    display.update(snapshot(succeeded=2, state="cancelling"))
    clock.now = 35.0
    display.update(snapshot(succeeded=3, state="cancelling"))
    clock.now = 50.0
    display.update(snapshot(succeeded=4, state="cancelling"))
    assert [line.split("/")[0] for line in progress_lines(logs)] == ["1", "2", "4"]


def test_close_logs_the_final_state(clock: FakeMonotonic, logs: pytest.LogCaptureFixture) -> None:
    """close() logs the last snapshot at once, whatever the rate limit."""
    display = ProgressDisplay(io.StringIO(), interactive=False, monotonic=clock)
    display.update(snapshot(succeeded=1))
    clock.advance(1.0)
    display.update(snapshot(succeeded=100, elapsed=1.0))
    display.close()
    assert progress_lines(logs)[-1] == format_progress(snapshot(succeeded=100, elapsed=1.0))
    assert len(progress_lines(logs)) == 2


def test_close_logs_the_progress_it_is_given(
    clock: FakeMonotonic, logs: pytest.LogCaptureFixture
) -> None:
    """close(progress) logs that snapshot as the final state."""
    display = ProgressDisplay(io.StringIO(), interactive=False, monotonic=clock)
    display.update(snapshot(succeeded=1))
    final = snapshot(succeeded=90, failed=10, elapsed=3.0, state="done")
    display.close(final)
    assert progress_lines(logs) == [format_progress(snapshot(succeeded=1)), format_progress(final)]


def test_close_does_not_repeat_the_line_just_logged(
    clock: FakeMonotonic, logs: pytest.LogCaptureFixture
) -> None:
    """close() after the last snapshot was logged adds no duplicate line."""
    display = ProgressDisplay(io.StringIO(), interactive=False, monotonic=clock)
    display.update(snapshot(succeeded=1))
    display.close()
    assert len(progress_lines(logs)) == 1


def test_close_without_any_progress_logs_nothing(logs: pytest.LogCaptureFixture) -> None:
    """A display closed before any update has nothing to show."""
    ProgressDisplay(io.StringIO(), interactive=False).close()
    assert progress_lines(logs) == []


def test_close_is_idempotent_and_ends_updates(
    clock: FakeMonotonic, logs: pytest.LogCaptureFixture
) -> None:
    """A second close() and updates after close() log nothing."""
    display = ProgressDisplay(io.StringIO(), interactive=False, monotonic=clock)
    display.close(snapshot(succeeded=5))
    assert display.closed
    clock.advance(100.0)
    display.close(snapshot(succeeded=6))
    display.update(snapshot(succeeded=7, state="done"))
    assert len(progress_lines(logs)) == 1


def test_context_manager_closes(clock: FakeMonotonic, logs: pytest.LogCaptureFixture) -> None:
    """Leaving a with block closes the display, logging the last snapshot."""
    with ProgressDisplay(io.StringIO(), interactive=False, monotonic=clock) as display:
        display.update(snapshot(succeeded=1))
        display.update(snapshot(succeeded=2))
    assert display.closed
    assert progress_lines(logs)[-1].startswith("2/100 requests")


def test_log_mode_writes_nothing_to_the_stream(
    clock: FakeMonotonic, logs: pytest.LogCaptureFixture
) -> None:
    """Without a terminal the stream stays untouched: lines go to the logger."""
    stream = io.StringIO()
    with ProgressDisplay(stream, interactive=False, monotonic=clock) as display:
        display.update(snapshot(succeeded=1))
    assert stream.getvalue() == ""


# -- ProgressDisplay, the bar ------------------------------------------------------------


def test_bar_shows_counts_and_batches(clock: FakeMonotonic) -> None:
    """The bar shows done/total in req, outcomes, batches by status and the round."""
    stream = io.StringIO()
    display = ProgressDisplay(stream, interactive=True, monotonic=clock)
    display.update(
        snapshot(
            total=5000,
            succeeded=1200,
            failed=34,
            retrying=10,
            batches={"in_progress": 5, "validating": 2},
            round=1,
            elapsed=60.0,
        )
    )
    out = stream.getvalue()
    assert "1234/5000" in out
    assert "req" in out
    assert "25%" in out
    assert "1,200 ok, 34 failed, 10 retrying" in out
    assert "batches: 2 validating, 5 in_progress" in out
    assert "round 1" in out
    display.close()


def test_bar_respects_refresh(clock: FakeMonotonic) -> None:
    """Updates within refresh seconds are not drawn; the first one after is."""
    stream = io.StringIO()
    display = ProgressDisplay(stream, interactive=True, refresh=0.5, monotonic=clock)
    display.update(snapshot(succeeded=1))
    clock.advance(0.1)
    display.update(snapshot(succeeded=2))
    clock.advance(0.1)
    display.update(snapshot(succeeded=3))
    out = stream.getvalue()
    assert "1/100" in out
    assert "2/100" not in out
    assert "3/100" not in out
    clock.advance(0.3)
    display.update(snapshot(succeeded=4))
    assert "4/100" in stream.getvalue()
    display.close()


def test_bar_redraws_at_once_on_state_change(clock: FakeMonotonic) -> None:
    """A change of state redraws the bar within refresh seconds."""
    stream = io.StringIO()
    display = ProgressDisplay(stream, interactive=True, refresh=10.0, monotonic=clock)
    display.update(snapshot(succeeded=1))
    display.update(snapshot(succeeded=2, state="cancelling"))
    out = stream.getvalue()
    assert "2/100" in out
    assert "cancelling" in out
    display.close()


def test_bar_close_draws_the_final_state_and_leaves_it(clock: FakeMonotonic) -> None:
    """close() draws the final snapshot despite refresh and leaves the bar, ending the line."""
    stream = io.StringIO()
    display = ProgressDisplay(stream, interactive=True, refresh=10.0, monotonic=clock)
    display.update(snapshot(succeeded=1))
    display.update(snapshot(succeeded=50))
    display.close(snapshot(succeeded=99, failed=1, batches={"completed": 2}, state="done"))
    out = stream.getvalue()
    assert "50/100" not in out
    last = out.rstrip("\n").split("\r")[-1]
    assert "100/100" in last
    assert "batches: 2 completed" in last
    assert "done" in last
    assert out.endswith("\n")


def test_bar_close_is_idempotent(clock: FakeMonotonic) -> None:
    """A second close() and later updates write nothing more."""
    stream = io.StringIO()
    display = ProgressDisplay(stream, interactive=True, monotonic=clock)
    display.update(snapshot(succeeded=10))
    display.close()
    written = stream.getvalue()
    clock.advance(100.0)
    display.close(snapshot(succeeded=20))
    display.update(snapshot(succeeded=30))
    assert stream.getvalue() == written


def test_bar_follows_a_changing_total(clock: FakeMonotonic) -> None:
    """A snapshot with a new total redraws the bar against it."""
    stream = io.StringIO()
    display = ProgressDisplay(stream, interactive=True, refresh=0.0, monotonic=clock)
    display.update(snapshot(total=100, succeeded=10))
    display.update(snapshot(total=200, succeeded=20))
    assert "20/200" in stream.getvalue()
    display.close()


def test_bar_closed_before_any_update_writes_nothing() -> None:
    """A display closed before any update draws no bar."""
    stream = io.StringIO()
    ProgressDisplay(stream, interactive=True).close()
    assert stream.getvalue() == ""


def test_bar_mode_logs_nothing(clock: FakeMonotonic, logs: pytest.LogCaptureFixture) -> None:
    """With a bar there are no log lines."""
    with ProgressDisplay(io.StringIO(), interactive=True, monotonic=clock) as display:
        display.update(snapshot(succeeded=1))
    assert progress_lines(logs) == []


# -- ProgressDisplay, choosing the mode --------------------------------------------------


def test_interactive_none_follows_isatty_false(
    clock: FakeMonotonic, logs: pytest.LogCaptureFixture
) -> None:
    """interactive=None on a StringIO (not a tty) writes log lines, no bar."""
    stream = io.StringIO()
    with ProgressDisplay(stream, monotonic=clock) as display:
        assert not display.interactive
        display.update(snapshot(succeeded=1))
    assert stream.getvalue() == ""
    assert len(progress_lines(logs)) == 1


def test_interactive_none_follows_isatty_true(
    clock: FakeMonotonic, logs: pytest.LogCaptureFixture
) -> None:
    """interactive=None on a stream that is a tty draws the bar."""
    stream = TTYStringIO()
    with ProgressDisplay(stream, monotonic=clock) as display:
        assert display.interactive
        display.update(snapshot(succeeded=1))
    assert "1/100" in stream.getvalue()
    assert progress_lines(logs) == []


def test_closed_stream_is_not_a_terminal() -> None:
    """interactive=None on a stream that cannot answer isatty() means log lines."""
    stream = io.StringIO()
    stream.close()
    assert not ProgressDisplay(stream).interactive


def test_default_stream_is_stderr(clock: FakeMonotonic, capsys: pytest.CaptureFixture[str]) -> None:
    """Without a stream the bar goes to sys.stderr."""
    with ProgressDisplay(interactive=True, monotonic=clock) as display:
        display.update(snapshot(succeeded=7))
    captured = capsys.readouterr()
    assert "7/100" in captured.err
    assert captured.out == ""


@pytest.mark.parametrize("option", ["log_interval", "refresh"])
def test_negative_intervals_are_rejected(option: str) -> None:
    """A negative log_interval or refresh is a ValueError."""
    with pytest.raises(ValueError, match=option):
        ProgressDisplay(io.StringIO(), **{option: -1.0})  # type: ignore[arg-type]


def test_snapshots_are_frozen() -> None:
    """RunProgress is immutable; attrs.evolve makes the next one."""
    progress = snapshot()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        progress.succeeded = 1  # type: ignore[misc]
    assert attrs.evolve(progress, succeeded=1).done == 1
