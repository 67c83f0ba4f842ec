"""Anthropic's Message Batches wire read into our models: the status rule (every
processing status, with and without a cancel and expired requests), counts, times,
result lines, the error envelope, and the provider's headers and path rules."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from aiobatch import AnthropicProvider, BatchStatus, provider_from_env
from aiobatch._convert import decode, decode_result_line, parse_error_body
from aiobatch._models import Batch, BatchPage, ResultError, ResultHTTPError, ResultSuccess
from aiobatch.errors import DecodeError, UnsupportedError

CREATED = "2024-09-24T18:37:24.100435Z"
ENDED = "2024-09-24T19:37:24Z"


def _batch(
    processing: str, *, cancel: str | None = None, expired: int = 0, ended: bool = True
) -> dict[str, Any]:
    done = processing == "ended"
    return {
        "id": "msgbatch_013Zva2CMHLNnXjNJJKqJ2EF",
        "type": "message_batch",
        "processing_status": processing,
        "request_counts": {
            "processing": 0 if done else 4,
            "succeeded": 2 if done else 0,
            "errored": 1 if done else 0,
            "canceled": 1 if done else 0,
            "expired": expired,
        },
        "ended_at": ENDED if done and ended else None,
        "created_at": CREATED,
        "expires_at": "2024-09-25T18:37:24.100435Z",
        "archived_at": None,
        "cancel_initiated_at": cancel,
        "results_url": "https://api.anthropic.com/v1/messages/batches/x/results" if done else None,
    }


_RULE = {
    # (processing_status, cancel initiated, expired requests) -> (status, raw_status)
    ("in_progress", False, False): (BatchStatus.IN_PROGRESS, None),
    ("in_progress", True, False): (BatchStatus.IN_PROGRESS, None),
    ("canceling", True, False): (BatchStatus.CANCELLING, "canceling"),
    ("canceling", False, False): (BatchStatus.CANCELLING, "canceling"),
    ("ended", True, True): (BatchStatus.CANCELLED, "ended"),
    ("ended", True, False): (BatchStatus.CANCELLED, "ended"),
    ("ended", False, True): (BatchStatus.EXPIRED, "ended"),
    ("ended", False, False): (BatchStatus.COMPLETED, "ended"),
}


@pytest.mark.parametrize(
    ("processing", "cancelled", "expired"),
    [
        (p, c, e)
        for p, c, e in itertools.product(
            ("in_progress", "canceling", "ended"), (False, True), (False, True)
        )
        if p == "ended" or not e
    ],
)
def test_status_rule(processing: str, cancelled: bool, expired: bool) -> None:
    """Each processing status, with or without a cancel and expired requests, maps by the
    documented rule, and the server's string is kept in raw_status."""
    key = (processing, cancelled, expired)
    wire = _batch(processing, cancel=CREATED if cancelled else None, expired=3 if expired else 0)
    batch = decode(json.dumps(wire), Batch)
    status, raw = _RULE.get(key, _RULE.get((processing, cancelled, False)))  # type: ignore[misc]
    assert (batch.status, batch.raw_status) == (status, raw)
    assert batch.wire_status == processing


def test_unknown_processing_status_is_kept() -> None:
    """A processing status Anthropic may add later decodes as UNKNOWN, its string kept."""
    batch = decode(json.dumps(_batch("archiving")), Batch)
    assert batch.status is BatchStatus.UNKNOWN
    assert batch.raw_status == "archiving"


def test_counts_times_and_results_file() -> None:
    """Counts sum to total (failed = errored + canceled + expired); RFC 3339 times become
    Unix seconds, ended_at lands by the status; results_url makes the results readable
    as the output file; the endpoint is /v1/messages."""
    batch = decode(json.dumps(_batch("ended", expired=2)), Batch)
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (6, 2)
    assert batch.request_counts.failed == 4
    assert batch.created_at == 1727203044
    assert batch.in_progress_at == batch.created_at
    assert batch.expired_at == 1727206644
    assert batch.completed_at is None
    assert batch.output_file_id == batch.id
    assert batch.error_file_id is None
    assert batch.endpoint == "/v1/messages"
    running = decode(json.dumps(_batch("in_progress")), Batch)
    assert running.output_file_id is None
    cancelled = decode(json.dumps(_batch("ended", cancel=CREATED)), Batch)
    assert (cancelled.cancelling_at, cancelled.cancelled_at) == (1727203044, 1727206644)


def test_a_list_page_decodes() -> None:
    """Anthropic's list envelope (data, has_more, first_id, last_id) is a BatchPage."""
    page = decode(
        json.dumps(
            {"data": [_batch("in_progress")], "has_more": True, "first_id": "a", "last_id": "a"}
        ),
        BatchPage,
    )
    assert page.has_more and page.data[0].status is BatchStatus.IN_PROGRESS


def test_result_lines_become_our_union() -> None:
    """succeeded -> success (200, the message as body); errored -> an HTTP error with the
    status of its type and the envelope as body; canceled/expired -> batch_cancelled /
    batch_expired errors."""
    message = {"id": "msg_1", "type": "message", "content": []}
    ok = decode_result_line(
        json.dumps({"custom_id": "a", "result": {"type": "succeeded", "message": message}})
    )
    assert isinstance(ok, ResultSuccess)
    assert (ok.response.status_code, ok.body) == (200, message)
    envelope = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    bad = decode_result_line(
        json.dumps({"custom_id": "b", "result": {"type": "errored", "error": envelope}})
    )
    assert isinstance(bad, ResultHTTPError)
    assert (bad.status_code, bad.response.body) == (529, envelope)
    invalid = {"type": "error", "error": {"type": "invalid_request_error", "message": "no"}}
    refused = decode_result_line(
        json.dumps({"custom_id": "c", "result": {"type": "errored", "error": invalid}})
    )
    assert isinstance(refused, ResultHTTPError) and refused.status_code == 400
    for kind, code in (("canceled", "batch_cancelled"), ("expired", "batch_expired")):
        line = decode_result_line(json.dumps({"custom_id": "d", "result": {"type": kind}}))
        assert isinstance(line, ResultError) and line.code == code
    with pytest.raises(DecodeError):
        decode_result_line(json.dumps({"custom_id": "e", "result": {"type": "mystery"}}))


def test_error_envelope() -> None:
    """Anthropic's {"type": "error", "error": {type, message}} gives message and type."""
    body = parse_error_body(
        {"type": "error", "error": {"type": "not_found_error", "message": "gone"}}
    )
    assert body is not None and (body.message, body.type) == ("gone", "not_found_error")


def test_provider_headers_paths_and_env() -> None:
    """x-api-key and anthropic-version; the client's paths map to /v1/messages/batches;
    ANTHROPIC_API_KEY / ANTHROPIC_BASE_URL are read; file uploads are refused."""
    provider = provider_from_env(
        "anthropic", environ={"ANTHROPIC_API_KEY": "sk-ant-1", "ANTHROPIC_BASE_URL": "http://h/"}
    )
    assert isinstance(provider, AnthropicProvider)
    assert dict(provider.headers()) == {"x-api-key": "sk-ant-1", "anthropic-version": "2023-06-01"}
    assert "sk-ant-1" not in repr(provider.headers())
    assert provider.url("/batches") == "http://h/v1/messages/batches"
    assert (
        provider.url("/batches/msgbatch_1/cancel")
        == "http://h/v1/messages/batches/msgbatch_1/cancel"
    )
    assert (
        provider.url("/files/msgbatch_1/content")
        == "http://h/v1/messages/batches/msgbatch_1/results"
    )
    assert provider.limits.max_lines == 100_000
    assert provider.quirks.submission == "inline"
    with pytest.raises(UnsupportedError):
        provider.url("/files")
