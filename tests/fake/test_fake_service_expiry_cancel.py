"""The fake batch service: expiry and cancellation, with partial results."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from conftest import FakeApi, chat_line

from aiobatch.testing import LineErrorRule, VirtualClock

EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."


async def _files(api: FakeApi, batch: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    return await api.lines(batch["output_file_id"]), await api.lines(batch["error_file_id"])


async def test_expiry_keeps_finished_lines_and_lists_the_rest_as_batch_expired(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """At expires_at done lines go to the output file and the rest are batch_expired."""
    window, validation, rate = 100.0, 10.0, 0.1
    api = make_api(
        completion_window_seconds=window, validation_seconds=validation, lines_per_second=rate
    )
    custom_ids = [f"r{i}" for i in range(20)]
    batch = await api.submit([chat_line(c) for c in custom_ids])
    assert batch["expires_at"] == batch["created_at"] + int(window)
    clock.advance(window - 0.5)
    assert (await api.batch(batch["id"]))["status"] == "in_progress"
    clock.advance(0.5)
    expired = await api.batch(batch["id"])
    done = int((window - validation) * rate)
    assert expired["status"] == "expired"
    assert expired["expired_at"] == expired["expires_at"]
    assert expired["finalizing_at"] is None
    assert expired["completed_at"] is None
    assert expired["request_counts"] == {"total": 20, "completed": done, "failed": 20 - done}
    output, errors = await _files(api, expired)
    assert sorted(line["custom_id"] for line in output) == sorted(custom_ids[:done])
    assert sorted(line["custom_id"] for line in errors) == sorted(custom_ids[done:])
    for line in errors:
        assert line["response"] is None
        assert line["error"] == {"code": "batch_expired", "message": EXPIRED_MESSAGE}
    clock.advance(10_000)
    assert await api.batch(batch["id"]) == expired


async def test_expiry_with_http_errors_among_the_done_lines(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """An expired batch's error file holds both HTTP-error lines and batch_expired lines."""
    api = make_api(
        completion_window_seconds=10,
        validation_seconds=1,
        lines_per_second=1,
        line_errors=[LineErrorRule(status=500, custom_ids={"r0"})],
    )
    batch = await api.submit([chat_line(f"r{i}") for i in range(20)])
    clock.advance(10)
    expired = await api.batch(batch["id"])
    assert expired["request_counts"] == {"total": 20, "completed": 8, "failed": 12}
    _, errors = await _files(api, expired)
    by_id = {line["custom_id"]: line for line in errors}
    assert by_id["r0"]["response"]["status_code"] == 500
    assert by_id["r19"]["error"]["code"] == "batch_expired"


async def test_expiry_during_validation_lists_every_line_as_expired(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """A batch still validating at expires_at expires with every line batch_expired."""
    api = make_api(completion_window_seconds=5, validation_seconds=10)
    batch = await api.submit([chat_line("a"), chat_line("b")])
    clock.advance(5)
    expired = await api.batch(batch["id"])
    assert expired["status"] == "expired"
    assert expired["in_progress_at"] is None
    assert expired["output_file_id"] is None
    assert expired["request_counts"] == {"total": 2, "completed": 0, "failed": 2}
    _, errors = await _files(api, expired)
    assert {line["error"]["code"] for line in errors} == {"batch_expired"}


async def test_stalled_batch_expires_with_nothing_done(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """lines_per_second=0 never finishes a line, so the batch expires with no output file."""
    api = make_api(completion_window_seconds=60, lines_per_second=0)
    batch = await api.submit([chat_line("a")])
    clock.advance(59)
    assert (await api.batch(batch["id"]))["request_counts"]["completed"] == 0
    clock.advance(1)
    expired = await api.batch(batch["id"])
    assert expired["status"] == "expired"
    assert expired["output_file_id"] is None
    assert expired["error_file_id"] is not None


async def test_a_batch_that_finishes_in_time_does_not_expire(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """A batch that finishes processing before expires_at completes, even past the window."""
    api = make_api(completion_window_seconds=10, lines_per_second=1, finalizing_seconds=20)
    batch = await api.submit([chat_line(f"r{i}") for i in range(5)])
    clock.advance(100)
    done = await api.batch(batch["id"])
    assert done["status"] == "completed"
    assert done["expired_at"] is None


async def test_cancel_in_progress_keeps_done_lines_and_cancels_the_rest(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """Cancel freezes progress; once cancelled, done lines are output, the rest cancelled."""
    api = make_api(validation_seconds=1, lines_per_second=2, cancel_seconds=30)
    custom_ids = [f"r{i}" for i in range(20)]
    batch = await api.submit([chat_line(c) for c in custom_ids])
    clock.advance(4)  # 3 s of processing at 2 lines/s = 6 lines
    cancelling = await api.ok("POST", f"/batches/{batch['id']}/cancel")
    assert cancelling["status"] == "cancelling"
    assert cancelling["request_counts"] == {"total": 20, "completed": 6, "failed": 0}
    clock.advance(29)
    still = await api.batch(batch["id"])
    assert still["status"] == "cancelling"
    assert still["request_counts"] == cancelling["request_counts"]  # nothing progresses
    clock.advance(1)
    cancelled = await api.batch(batch["id"])
    assert cancelled["status"] == "cancelled"
    assert cancelled["cancelled_at"] == cancelled["cancelling_at"] + 30
    assert cancelled["request_counts"] == {"total": 20, "completed": 6, "failed": 14}
    assert cancelled["finalizing_at"] is None
    output, errors = await _files(api, cancelled)
    assert sorted(line["custom_id"] for line in output) == sorted(custom_ids[:6])
    assert sorted(line["custom_id"] for line in errors) == sorted(custom_ids[6:])
    for line in errors:
        assert line["response"] is None
        assert line["error"]["code"] == "batch_cancelled"
        assert line["error"]["message"]


async def test_cancel_while_validating_cancels_every_line(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """A batch cancelled while validating never runs: no output file, all lines cancelled."""
    api = make_api(validation_seconds=10, cancel_seconds=2)
    batch = await api.submit([chat_line("a"), chat_line("b")])
    clock.advance(1)
    await api.ok("POST", f"/batches/{batch['id']}/cancel")
    clock.advance(20)
    cancelled = await api.batch(batch["id"])
    assert cancelled["status"] == "cancelled"
    assert cancelled["in_progress_at"] is None
    assert cancelled["output_file_id"] is None
    assert cancelled["request_counts"] == {"total": 2, "completed": 0, "failed": 2}
    _, errors = await _files(api, cancelled)
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}


async def test_cancel_while_validating_an_invalid_file_writes_no_files(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """Cancelling a batch whose file would fail validation ends with no result files."""
    api = make_api(validation_seconds=10, cancel_seconds=2)
    batch = await api.submit(["not json"])
    await api.ok("POST", f"/batches/{batch['id']}/cancel")
    clock.advance(5)
    cancelled = await api.batch(batch["id"])
    assert cancelled["status"] == "cancelled"
    assert cancelled["output_file_id"] is None
    assert cancelled["error_file_id"] is None
    assert cancelled["errors"] is None


async def test_cancel_while_finalizing_keeps_every_result(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """A batch cancelled while finalizing ends cancelled with all lines in the output file."""
    api = make_api(finalizing_seconds=100, cancel_seconds=1)
    batch = await api.submit([chat_line("a"), chat_line("b")])
    clock.advance(5)
    assert (await api.batch(batch["id"]))["status"] == "finalizing"
    await api.ok("POST", f"/batches/{batch['id']}/cancel")
    clock.advance(1)
    cancelled = await api.batch(batch["id"])
    assert cancelled["status"] == "cancelled"
    assert cancelled["error_file_id"] is None
    assert len(await api.lines(cancelled["output_file_id"])) == 2


async def test_cancelling_batch_does_not_expire(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """Once cancelling, a batch ends cancelled even if the window passes meanwhile."""
    api = make_api(completion_window_seconds=10, cancel_seconds=50, lines_per_second=0.1)
    batch = await api.submit([chat_line(f"r{i}") for i in range(5)])
    clock.advance(5)
    await api.ok("POST", f"/batches/{batch['id']}/cancel")
    clock.advance(100)
    assert (await api.batch(batch["id"]))["status"] == "cancelled"
