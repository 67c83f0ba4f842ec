"""A batch that reports a status aiobatch does not know: tracked, reported once with how to
map it (``status_aliases``), and ended once it cannot be running any more (it carries
result files, or its ``expires_at`` is long past), so that a run collects it and ends,
also after a cancel. Against the fake service on a virtual clock."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    FLEET_TIMINGS,
    Handler,
    client_for,
    config,
    in_front,
    service_on,
    within,
)

from aiobatch import (
    BatchDone,
    BatchRun,
    BatchStatus,
    DoneReason,
    Fleet,
    FleetConfig,
    FleetEvent,
    RunConfig,
    RunReport,
    StatusChanged,
    TrackingError,
)
from aiobatch.errors import UnknownStatusError
from aiobatch.testing import FakeBatchService, VirtualClock, chat_requests
from aiobatch.transport import Request, Response

#: Virtual seconds after which a test calls a fleet hung (past a batch's 24 h expiry),
#: and a run (whose batches all end within minutes).
HUNG = 3 * 86_400.0
RUN_HUNG = 6 * 3600.0


def quiet(**overrides: Any) -> FleetConfig:
    """A fleet config without jitter."""
    return FleetConfig(**{"jitter": 0.0, "seed": 0, **overrides})


def spelled(
    statuses: Mapping[str, str], *, strip_files: bool = False
) -> Callable[[Request, Handler], Any]:
    """A front for the fake: a server that spells some statuses its own way (``statuses``
    maps the fake's string to the one sent) in every batch answer; with
    ``strip_files``, a server whose batches never show file ids."""

    async def front(request: Request, handle: Handler) -> Response:
        response = await handle(request)
        if response.status != 200 or "/batches" not in request.url:
            return response
        body = json.loads(await response.read())
        for batch in body["data"] if body.get("object") == "list" else [body]:
            batch["status"] = statuses.get(batch["status"], batch["status"])
            if strip_files:
                batch["output_file_id"] = batch["error_file_id"] = None
        return Response(200, response.headers, json.dumps(body).encode())

    return front


#: A server that says "succeeded" for a completed batch.
SUCCEEDED = {"completed": "succeeded"}
#: A server with its own words for every status a run passes through when cancelled.
OWN_WORDS = {
    "in_progress": "running",
    "cancelling": "stopping_soon",
    "cancelled": "halted",
    "completed": "succeeded",
}


async def track(
    clock: VirtualClock,
    service: FakeBatchService,
    front: Callable[[Request, Handler], Any],
    *,
    lines: int = 5,
    **fleet_args: Any,
) -> tuple[BatchDone, list[FleetEvent]]:
    """Create one batch of ``lines`` lines and track it to its end through ``front``."""
    events: list[FleetEvent] = []
    async with client_for(clock, in_front(service, front)) as client, clock.auto_advance():
        uploaded = await client.upload_file(chat_requests(lines))
        batch = await client.create_batch(uploaded.id, "/v1/chat/completions")
        fleet_args.setdefault("config", quiet())
        async with Fleet(client, on_event=events.append, **fleet_args) as fleet:
            fleet.add(batch)
            outcomes = await within(clock, HUNG, fleet.wait_all())
    return outcomes[batch.id], events


# --- the fleet --------------------------------------------------------------------------------


async def test_an_unknown_status_with_result_files_ends_the_batch(clock: VirtualClock) -> None:
    """A batch in an unknown status ends (UNKNOWN_STATUS) once it carries result files."""
    service = service_on(clock, **FLEET_TIMINGS)
    done, _ = await track(clock, service, spelled(SUCCEEDED))
    assert done.reason is DoneReason.UNKNOWN_STATUS
    assert not done.finished
    assert done.batch is not None and done.batch.raw_status == "succeeded"
    assert done.batch.output_file_id is not None
    assert isinstance(done.error, UnknownStatusError)
    assert (done.error.value, done.error.batch_id) == ("succeeded", done.batch_id)
    real = await service.get_batch(done.batch_id)
    assert real.status is BatchStatus.COMPLETED
    assert done.batch.output_file_id == real.output_file_id


async def test_an_unknown_status_without_files_ends_after_expiry_and_grace(
    clock: VirtualClock,
) -> None:
    """Without result files, a batch in an unknown status ends unknown_status_grace
    seconds after its expires_at, not before."""
    service = service_on(clock, **FLEET_TIMINGS)
    front = spelled({s.value: "paused" for s in BatchStatus}, strip_files=True)
    config = quiet(max_interval=300.0, unknown_status_grace=1800.0)
    done, _ = await track(clock, service, front, config=config)
    assert done.reason is DoneReason.UNKNOWN_STATUS
    assert done.batch is not None and done.batch.expires_at is not None
    assert done.batch.output_file_id is None and done.batch.error_file_id is None
    ended = clock.now()
    assert done.batch.expires_at + 1800.0 <= ended <= done.batch.expires_at + 1800.0 + 300.0


async def test_status_aliases_map_an_unknown_status_everywhere(clock: VirtualClock) -> None:
    """With status_aliases={'succeeded': 'completed'} the batch finishes as completed:
    events and outcome carry the mapped status, and nothing is reported."""
    service = service_on(clock, **FLEET_TIMINGS)
    done, events = await track(
        clock,
        service,
        spelled(SUCCEEDED),
        status_aliases={"succeeded": "completed"},
    )
    assert done.reason is DoneReason.FINISHED
    assert done.batch is not None
    assert done.batch.status is BatchStatus.COMPLETED
    assert done.batch.raw_status == "succeeded"
    assert not [e for e in events if isinstance(e, TrackingError)]
    changes = [e.batch.status for e in events if isinstance(e, StatusChanged)]
    assert changes[-1] is BatchStatus.COMPLETED


def test_status_aliases_must_map_to_an_aiobatch_status(clock: VirtualClock) -> None:
    """A status_aliases target that is no aiobatch status is refused, naming it."""
    with pytest.raises(ValueError, match=r"'succeeded' maps to 'done'.*completed"):
        RunConfig(status_aliases={"succeeded": "done"})
    with pytest.raises(ValueError, match="'unknown'"):
        RunConfig(status_aliases={"x": BatchStatus.UNKNOWN})
    assert RunConfig(status_aliases={"succeeded": "completed"}).status_aliases == {
        "succeeded": BatchStatus.COMPLETED
    }


async def test_the_warning_names_status_batch_and_how_to_map_it_once(
    clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """One WARNING per batch and unknown status, naming both and status_aliases, however
    many polls see it; one TrackingError event likewise."""
    service = service_on(clock, validation_seconds=30.0, lines_per_second=0.1)
    with caplog.at_level(logging.WARNING, logger="aiobatch"):
        done, events = await track(clock, service, spelled(OWN_WORDS), lines=10)
    assert done.reason is DoneReason.UNKNOWN_STATUS
    assert service.request_count("GET", "/batches/*") > 5  # 'running' was seen many times
    reports = [r.getMessage() for r in caplog.records if "reports unknown status" in r.getMessage()]
    assert len(reports) == 2
    running, succeeded = reports
    for status, message in (("running", running), ("succeeded", succeeded)):
        assert done.batch_id in message
        assert f"unknown status '{status}'" in message
        assert f"status_aliases={{'{status}': STATUS}}" in message
        assert "in_progress, finalizing, completed" in message
    errors = [e for e in events if isinstance(e, TrackingError)]
    assert [
        (e.batch_id, e.error.value) for e in errors if isinstance(e.error, UnknownStatusError)
    ] == [
        (done.batch_id, "running"),
        (done.batch_id, "succeeded"),
    ]


# --- wait() ------------------------------------------------------------------------------------


async def test_wait_names_the_batch_of_an_unknown_status_and_takes_aliases(
    clock: VirtualClock,
) -> None:
    """wait()'s UnknownStatusError names the batch id and status_aliases; with
    status_aliases the wait returns the batch in the mapped status."""
    service = service_on(clock, **FLEET_TIMINGS)
    async with (
        client_for(clock, in_front(service, spelled(SUCCEEDED))) as client,
        clock.auto_advance(),
    ):
        uploaded = await client.upload_file(chat_requests(3))
        batch = await client.create_batch(uploaded.id, "/v1/chat/completions")
        with pytest.raises(UnknownStatusError) as info:
            await client.wait(batch, poll_interval=1.0)
        assert info.value.batch_id == batch.id
        assert batch.id in str(info.value)
        assert "status_aliases={'succeeded': STATUS}" in str(info.value)
        with pytest.raises(UnknownStatusError, match=re.escape(batch.id)):
            await client.wait(batch.id)
        done = await client.wait(batch.id, status_aliases={"succeeded": BatchStatus.COMPLETED})
    assert done.status is BatchStatus.COMPLETED
    assert done.raw_status == "succeeded"
    assert done.output_file_id is not None


# --- the runner ----------------------------------------------------------------------------------


async def run_through(
    clock: VirtualClock,
    service: FakeBatchService,
    front: Callable[[Request, Handler], Any],
    tmp_path: Path,
    run_config: RunConfig,
    *,
    lines: int = 6,
    cancel_after_lines: int | None = None,
) -> tuple[RunReport, list[dict[str, Any]]]:
    """Run ``lines`` requests through ``front``; with ``cancel_after_lines``, cancel the
    run once the first batch has finished that many lines. Returns the report and the
    output file's lines (none when the run was cancelled)."""
    source = tmp_path / "in.jsonl"
    source.write_bytes(chat_requests(lines))
    output = tmp_path / "out.jsonl"
    async with client_for(clock, in_front(service, front)) as client, clock.auto_advance():
        run = BatchRun(
            client, source, journal=tmp_path / "run.journal", output=output, config=run_config
        )

        async def cancel() -> None:
            assert cancel_after_lines is not None
            while True:
                await clock.sleep(1.0)
                if service.batch_ids:
                    real = await service.get_batch(service.batch_ids[0])
                    counts = real.request_counts
                    if counts is not None and counts.completed >= cancel_after_lines:
                        run.cancel()
                        return

        canceller = asyncio.ensure_future(cancel()) if cancel_after_lines is not None else None
        try:
            report = await within(clock, RUN_HUNG, run.run())
        finally:
            if canceller is not None:
                canceller.cancel()
    written = (
        [json.loads(line) for line in output.read_bytes().splitlines()] if output.exists() else []
    )
    return report, written


async def test_a_run_collects_a_batch_ended_in_an_unknown_status(
    clock: VirtualClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run whose batch reports 'succeeded' ends: it collects the output file, and the
    report and the log name the unknown status as the reason."""
    service = service_on(clock)
    with caplog.at_level(logging.WARNING, logger="aiobatch"):
        report, written = await run_through(clock, service, spelled(SUCCEEDED), tmp_path, config())
    assert report.state == "done"
    assert (report.succeeded, report.failed, report.pending) == (6, 0, 0)
    assert dict(report.statuses) == {"ended_unknown_status": 1}
    assert sorted(line["custom_id"] for line in written) == [f"req-{i}" for i in range(6)]
    (batch_id,) = service.batch_ids
    assert any(
        "ended in unknown status 'succeeded'" in r.getMessage() and batch_id in r.getMessage()
        for r in caplog.records
    )


async def test_a_run_with_status_aliases_sees_the_mapped_status(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """RunConfig(status_aliases=...) reaches the fleet: the batch counts as completed."""
    service = service_on(clock)
    run_config = config(status_aliases={"succeeded": "completed"})
    report, written = await run_through(clock, service, spelled(SUCCEEDED), tmp_path, run_config)
    assert report.state == "done"
    assert report.succeeded == 6
    assert dict(report.statuses) == {"completed": 1}
    assert len(written) == 6


async def test_cancelling_a_run_with_a_batch_in_an_unknown_status_ends(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A cancelled run whose batch reports an unknown status does not hang in
    cancelling: the batch ends once cancelled with files, and what it finished is kept."""
    service = service_on(clock, lines_per_second=0.2, cancel_seconds=30.0)
    report, _ = await run_through(
        clock,
        service,
        spelled(OWN_WORDS),
        tmp_path,
        config(),
        lines=10,
        cancel_after_lines=3,
    )
    assert report.state == "cancelled"
    (batch_id,) = service.batch_ids
    real = await service.get_batch(batch_id)
    assert real.status is BatchStatus.CANCELLED
    assert real.request_counts is not None
    assert report.succeeded == real.request_counts.completed >= 3
    assert report.pending == 10 - report.succeeded
    assert dict(report.statuses) == {"ended_unknown_status": 1}
