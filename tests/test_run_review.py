"""A reviewer's tests of the runner (BatchRun): each one plays a situation a demanding
user meets and checks the promise the runner makes for it.

Every test drives the in-memory fake service on a virtual clock. Where the fake has no
switch for a server behaviour (a lagging ``output_file_id``, a server that does not keep
metadata, a result file that is gone), a small handler in front of the service plays it,
the way ``conftest.make_env`` does for the fleet tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    API_KEY,
    Handler,
    chat_line,
    client_for,
    config,
    in_front,
    service_on,
)

from aiobatch import (
    BatchRun,
    FleetConfig,
    RetryPolicy,
    RunReport,
    RunResult,
)
from aiobatch._aio import first_of
from aiobatch._provider import AzureOpenAIProvider
from aiobatch._run._preflight import estimate_tokens
from aiobatch.cli import main
from aiobatch.errors import AiobatchError, RunError
from aiobatch.testing import (
    FakeBatchService,
    FakeConfig,
    FakeDialect,
    Fault,
    VirtualClock,
)
from aiobatch.transport import Request, Response

MODEL = "gpt-4o-mini"


async def edited_json(response: Response, edit: Callable[[Any], None]) -> Response:
    """``response`` with its JSON body changed in place by ``edit``."""
    body = json.loads(await response.read())
    edit(body)
    headers = {k: v for k, v in response.headers.items() if k != "content-length"}
    return Response(response.status, headers, json.dumps(body).encode())


def error_response(status: int, message: str) -> Response:
    """An OpenAI-shaped error answer."""
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    return Response(status, {"content-type": "application/json"}, json.dumps(body).encode())


def path_of(request: Request) -> str:
    """The request path after the API root (``/batches/batch_1``)."""
    path = request.url.split("://", 1)[-1]
    path = path[path.index("/") :] if "/" in path else "/"
    for root in ("/openai/v1", "/openai", "/v1"):
        if path.startswith(root + "/"):
            return path[len(root) :]
    return path


def requests(n: int, prefix: str = "r", *, model: str = MODEL) -> list[dict[str, Any]]:
    """``n`` chat requests with custom_ids ``{prefix}-0``... and distinct prompts."""
    return [chat_line(f"{prefix}-{i}", f"question {i}", model=model) for i in range(n)]


def write_jsonl(path: Path, lines: Iterable[Mapping[str, Any]]) -> Path:
    """Write request objects as a JSONL file; returns the path."""
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


async def run_to_end(run: BatchRun) -> tuple[RunReport, list[RunResult]]:
    """Run to the end with results() read alongside."""
    streamed = asyncio.ensure_future(_all_results(run))
    try:
        report = await run.run()
        return report, await streamed
    finally:
        if not streamed.done():
            streamed.cancel()


async def _all_results(run: BatchRun) -> list[RunResult]:
    return [result async for result in run.results()]


async def shards_of_batches(service: FakeBatchService) -> Counter[str]:
    """How many batches the service holds per ``aiobatch_shard`` (the service's own view)."""
    shards: Counter[str] = Counter()
    for batch_id in service.batch_ids:
        batch = await service.get_batch(batch_id)
        shards[(batch.metadata or {}).get("aiobatch_shard", "?")] += 1
    return shards


async def executed(service: FakeBatchService) -> Counter[str]:
    """How many times each custom_id was answered by some batch (output and error files)."""
    counts: Counter[str] = Counter()
    for batch_id in service.batch_ids:
        batch = await service.get_batch(batch_id)
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id is None:
                continue
            for line in service.file_content(file_id).splitlines():
                item = json.loads(line)
                if item.get("response") is not None:  # it ran (success or HTTP error)
                    counts[item["custom_id"]] += 1
    return counts


# --- collection ----------------------------------------------------------------------------


async def test_a_failed_retrieve_while_output_file_id_lags_keeps_the_batch_results(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A completed batch whose output_file_id lags, and whose next retrieve fails, still has
    its results collected: no second batch, every request answered by the first."""
    service = service_on(clock)
    completed_answers: Counter[str] = Counter()

    async def lagging(request: Request, handle: Handler) -> Response:
        path = path_of(request)
        response = await handle(request)
        if request.method != "GET" or not path.startswith("/batches/") or response.status != 200:
            return response
        body = json.loads(await response.read())
        headers = {k: v for k, v in response.headers.items() if k != "content-length"}
        if body.get("status") == "completed":
            seen = completed_answers[body["id"]]
            completed_answers[body["id"]] += 1
            if seen == 0:
                body["output_file_id"] = None  # OpenAI's lag: completed, file id not yet set
            elif seen <= 3:
                return error_response(503, "the server is overloaded")  # a short outage
        return Response(200, headers, json.dumps(body).encode())

    source = write_jsonl(tmp_path / "in.jsonl", requests(5))
    async with client_for(clock, in_front(service, lagging)) as client:
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=config())
        async with clock.auto_advance():
            report, results = await run_to_end(run)
    assert report.state == "done"
    assert len(service.batch_ids) == 1, "the batch's results were thrown away and re-run"
    assert all(r.ok for r in results), [r.result for r in results if not r.ok]
    assert {r.batch_id for r in results} == {service.batch_ids[0]}


async def test_a_result_file_that_is_gone_does_not_make_the_run_unfinishable(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A batch whose output file answers 404 for good (deleted, expired after 30 days)
    does not stop the run for ever: the run ends with one result per request."""
    service = service_on(clock)
    lost: set[str] = set()

    async def losing_the_first_output(request: Request, handle: Handler) -> Response:
        path = path_of(request)
        if request.method == "GET" and path.startswith("/files/") and path.endswith("/content"):
            file_id = path.split("/")[2]
            if not lost:
                first = await service.get_batch(service.batch_ids[0])
                if first.output_file_id is not None:
                    lost.add(first.output_file_id)
            if file_id in lost:
                return error_response(404, f"No such File object: {file_id}")
        return await handle(request)

    source = write_jsonl(tmp_path / "in.jsonl", requests(4))
    settings = config(step_backoff=1.0, max_step_failures=3)
    async with (
        client_for(clock, in_front(service, losing_the_first_output)) as client,
        clock.auto_advance(),
    ):
        outcomes: list[RunReport | AiobatchError] = []
        for _ in range(2):  # and a resume, as a user would try
            run = BatchRun(client, source, journal=tmp_path / "run.journal", config=settings)
            try:
                outcomes.append(await run.run())
                break
            except AiobatchError as exc:
                outcomes.append(exc)
    assert isinstance(outcomes[-1], RunReport), [repr(o)[:90] for o in outcomes]
    assert outcomes[-1].state == "done"
    assert outcomes[-1].pending == 0
    assert outcomes[-1].requests == 4


# --- submission ----------------------------------------------------------------------------


async def test_on_azure_an_adopted_upload_is_not_used_before_it_is_processed(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """On Azure, an upload whose answer was lost is adopted by its name only once it is
    'processed' (as upload_file waits for), so the create is accepted and every request
    succeeds instead of ending with batch_create_rejected."""
    service = FakeBatchService(
        clock=clock,
        config=FakeConfig(validation_seconds=5.0, lines_per_second=1.0, finalizing_seconds=5.0),
        dialect=FakeDialect.azure(file_pending_seconds=60.0),  # a big file, a busy resource
    )
    # The service stores the first upload; its answer never reaches the run.
    service.faults.add(Fault.drop(after=True, method="POST", path="/files"))
    source = write_jsonl(tmp_path / "in.jsonl", requests(4))
    provider = AzureOpenAIProvider(endpoint="http://fake.local", api_key=API_KEY)
    transport = service.transport()
    async with client_for(
        clock, transport, provider=provider, retry=RetryPolicy.for_testing(max_attempts=1)
    ) as client:
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=config())
        async with clock.auto_advance():
            report, results = await run_to_end(run)
    assert report.errors.get("batch_create_rejected", 0) == 0, dict(report.errors)
    assert report.succeeded == 4
    assert all(r.ok for r in results)


async def test_on_a_server_without_metadata_a_lost_create_answer_makes_no_second_batch(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """On a server that does not keep batch metadata (the client learns it from the first
    create and then refuses to look keys up), a create whose answer is lost is never sent
    again for the same shard: no shard gets a second batch."""
    service = service_on(clock)
    creates = 0

    def strip(body: Any) -> None:
        items = body.get("data") if body.get("object") == "list" else [body]
        for item in items or ():
            if isinstance(item, dict) and item.get("object") == "batch":
                item["metadata"] = None

    async def forgetful(request: Request, handle: Handler) -> Response:
        nonlocal creates
        path = path_of(request)
        response = await handle(request)
        if request.method == "POST" and path == "/batches":
            creates += 1
            if creates == 1:
                # From the second create on, the answer is lost once, after the service
                # made the batch.
                service.faults.add(Fault.drop(after=True, method="POST", path="/batches"))
        if path.startswith("/batches") and response.status == 200:
            return await edited_json(response, strip)
        return response

    source = write_jsonl(tmp_path / "in.jsonl", requests(4))
    settings = config(max_lines=2, max_submissions=1)
    async with client_for(clock, in_front(service, forgetful)) as client:
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=settings)
        async with clock.auto_advance():
            with contextlib.suppress(AiobatchError):  # stopping with an error is fine
                await run.run()
    shards = await shards_of_batches(service)
    assert all(count == 1 for count in shards.values()), shards


async def test_a_create_answered_409_for_a_while_is_tried_again_not_rejected(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A create refused with 409 Conflict (transient, like 429 and 5xx, in aiobatch's retry
    policy) beyond the client's retries is tried again later: the requests succeed
    instead of ending with batch_create_rejected."""
    service = service_on(clock)
    service.faults.add(Fault.http(409, method="POST", path="/batches", times=3))
    source = write_jsonl(tmp_path / "in.jsonl", requests(3))
    async with client_for(clock, service.transport()) as client:
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=config())
        async with clock.auto_advance():
            report, results = await run_to_end(run)
    assert dict(report.errors) == {}
    assert report.succeeded == 3
    assert all(r.ok for r in results)


# --- tracking ------------------------------------------------------------------------------


async def test_a_fleet_deadline_does_not_run_the_lines_of_a_running_batch_twice(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """With a deadline in RunConfig.fleet (FleetConfig.timeout), a batch still running at
    its deadline is not abandoned while it runs on: no request is executed twice."""
    service = service_on(clock, lines_per_second=0.1)  # 5 lines: about 55 s of processing
    source = write_jsonl(tmp_path / "in.jsonl", requests(5))
    fleet = FleetConfig(
        min_interval=1.0,
        max_interval=10.0,
        validating_interval=1.0,
        in_progress_interval=5.0,
        jitter=0.0,
        seed=0,
        timeout=30.0,
    )
    async with client_for(clock, service.transport()) as client:
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=config(fleet=fleet))
        async with clock.auto_advance():
            with contextlib.suppress(AiobatchError):
                await run.run()
            await clock.sleep(3600.0)  # whatever is still running on the server ends
    assert all(
        b.status.is_terminal for b in [await service.get_batch(i) for i in service.batch_ids]
    )
    runs = await executed(service)
    assert max(runs.values()) == 1, runs


async def test_shards_waiting_for_a_models_token_budget_do_not_hold_up_other_models(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """Shards waiting for room under one model's enqueued-token limit do not take the
    submission slots: a shard of another (unlimited) model is created at once, not after
    the limited model's batches end."""
    service = service_on(clock, lines_per_second=0.02)  # 2 lines: 100 s of processing
    limited = requests(8, "a", model="gpt-a")  # 4 shards of 2, one fits at a time
    other = requests(2, "b", model="gpt-b")  # 1 shard, no limit
    source = write_jsonl(tmp_path / "in.jsonl", limited + other)
    per_shard = sum(estimate_tokens(line["body"]) for line in limited[:2])
    settings = config(max_lines=2, max_submissions=2, enqueued_token_limits={"gpt-a": per_shard})
    async with client_for(clock, service.transport()) as client:
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=settings)
        async with clock.auto_advance():
            report = await run.run()
    assert report.state == "done"
    batches = [await service.get_batch(i) for i in service.batch_ids]
    by_model = {m: [b for b in batches if b.model == m] for m in ("gpt-a", "gpt-b")}
    first_a = min(by_model["gpt-a"], key=lambda b: b.created_at)
    (b_batch,) = by_model["gpt-b"]
    assert first_a.completed_at is not None
    assert b_batch.created_at < first_a.completed_at, (
        f"gpt-b created at +{b_batch.created_at - first_a.created_at}s, after gpt-a's first "
        f"batch ended at +{first_a.completed_at - first_a.created_at}s"
    )


async def test_a_run_whose_fleet_stops_fails_instead_of_waiting_for_ever(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """When the fleet stops tracking for good (here: the client is closed under the run),
    run() ends with an error instead of waiting for ever for batches nobody tracks."""
    service = service_on(clock, lines_per_second=0.01)
    source = write_jsonl(tmp_path / "in.jsonl", requests(3))
    async with client_for(clock, service.transport()) as client:
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=config())
        async with clock.auto_advance():
            runner = asyncio.ensure_future(run.run())
            while not service.batch_ids:
                await clock.sleep(1.0)
            await client.aclose()
            with contextlib.suppress(RunError):
                await first_of(
                    asyncio.ensure_future(asyncio.shield(runner)),
                    asyncio.ensure_future(clock.sleep(3600.0)),
                )
            ended = runner.done()
            if not ended:
                runner.cancel()
            with contextlib.suppress(BaseException):
                await runner
    assert ended, "run() still waiting an hour after its fleet stopped"
    assert isinstance(runner.exception(), RunError)


# --- outcomes ------------------------------------------------------------------------------


async def test_a_batch_failed_for_one_named_line_resubmits_the_other_lines(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A batch that fails validation because of one input line (errors.data names the
    line) ends that line with its error; the other lines never ran and are submitted
    again, so they succeed."""
    service = service_on(clock)
    service.fail_next_batches(
        "invalid_request", line=2, param="body.model", message="the model cannot take this"
    )
    items = requests(5)
    source = write_jsonl(tmp_path / "in.jsonl", items)
    async with client_for(clock, service.transport()) as client:
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=config())
        async with clock.auto_advance():
            report, results = await run_to_end(run)
    outcome = {r.custom_id: r for r in results}
    assert not outcome["r-1"].ok  # line 2 of the only shard
    assert report.errors.get("invalid_request") == 1
    assert [cid for cid, r in outcome.items() if not r.ok] == ["r-1"], dict(report.errors)


async def test_own_error_results_name_the_batch_they_are_about(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """A result aiobatch writes itself for a failed batch (no result line came back) has
    ``id`` None and names that batch in ``batch_id``, as RunResult documents."""
    service = service_on(clock)
    service.fail_next_batches("model_not_found")
    source = write_jsonl(tmp_path / "in.jsonl", requests(2))
    async with client_for(clock, service.transport()) as client:
        run = BatchRun(client, source, journal=tmp_path / "run.journal", config=config())
        async with clock.auto_advance():
            _report, results = await run_to_end(run)
    assert len(results) == 2
    assert all(not r.ok and r.result.id is None for r in results)  # aiobatch's own lines
    assert [r.batch_id for r in results] == service.batch_ids * 2


# --- the command line ----------------------------------------------------------------------


def test_run_with_a_bad_option_value_exits_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``aiobatch run --max-rounds -1`` exits with a usage error naming the option, not a
    Python traceback (and sends nothing)."""
    source = write_jsonl(tmp_path / "in.jsonl", requests(2))
    argv = ["run", str(source), "-o", str(tmp_path / "out.jsonl"), "--fake", "-q"]
    code = main([*argv, "--max-rounds", "-1"])
    assert code in (1, 2)
    assert "max-rounds" in capsys.readouterr().err.replace("_", "-")
    assert not (tmp_path / "out.jsonl.journal").exists()


async def test_skip_invalid_with_no_valid_line_says_what_was_wrong(
    clock: VirtualClock, tmp_path: Path
) -> None:
    """With skip_invalid, an input whose every line is invalid stops with an error that
    names the problems (file and line), not only that there are no requests."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"custom_id": "a", "method": \n{"custom_id": 3}\n', encoding="utf-8")
    service = service_on(clock)
    async with client_for(clock, service.transport()) as client:
        run = BatchRun(
            client, source, journal=tmp_path / "run.journal", config=config(skip_invalid=True)
        )
        with pytest.raises(AiobatchError) as info:
            await run.run()
    problems = getattr(info.value, "problems", ())
    assert problems or f"{source}:1" in str(info.value), str(info.value)
    assert service.requests == ()
