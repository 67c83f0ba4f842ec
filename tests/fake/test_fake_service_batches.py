"""The fake batch service: create, retrieve, list and cancel batches (synchronous behaviour)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from conftest import FakeApi, chat_line, jsonl

from aiobatch._convert import structure
from aiobatch._models import Batch
from aiobatch.testing import VirtualClock

BATCH_KEYS = {
    "id",
    "object",
    "endpoint",
    "model",
    "errors",
    "input_file_id",
    "completion_window",
    "status",
    "output_file_id",
    "error_file_id",
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
    "request_counts",
    "usage",
    "metadata",
}


async def test_create_returns_validating_batch_with_every_key(
    api: FakeApi, clock: VirtualClock
) -> None:
    """Create answers a validating batch with all keys, nulls kept, expires_at = created + 24h."""
    file = await api.upload(jsonl([chat_line("a")]))
    batch = await api.create(file["id"], metadata={"job": "nightly"})
    assert set(batch) == BATCH_KEYS
    assert re.fullmatch(r"batch_[0-9a-f]+", batch["id"])
    assert batch["object"] == "batch"
    assert batch["status"] == "validating"
    assert batch["endpoint"] == "/v1/chat/completions"
    assert batch["input_file_id"] == file["id"]
    assert batch["completion_window"] == "24h"
    assert batch["created_at"] == int(clock.now())
    assert batch["expires_at"] == batch["created_at"] + 86_400
    assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert batch["usage"]["total_tokens"] == 0
    assert batch["metadata"] == {"job": "nightly"}
    for key in (
        "errors",
        "output_file_id",
        "error_file_id",
        "in_progress_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
    ):
        assert batch[key] is None, key
    assert structure(batch, Batch).status.value == "validating"
    assert api.service.batch_ids == [batch["id"]]


async def test_retrieve_returns_the_created_batch(api: FakeApi) -> None:
    """GET /batches/{id} returns the batch as created while nothing has changed."""
    batch = await api.submit([chat_line("a")])
    assert await api.batch(batch["id"]) == batch


async def test_retrieve_unknown_batch_is_404_batch_not_found(api: FakeApi) -> None:
    """Unknown batch ids get 404 with code batch_not_found."""
    status, body = await api.call("GET", "/batches/batch_nope")
    assert status == 404
    assert body["error"]["code"] == "batch_not_found"
    assert "batch_nope" in body["error"]["message"]


def _long(n: int) -> str:
    return "k" * n


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"input_file_id": None}, "input_file_id"),
        ({"input_file_id": 42}, "input_file_id"),
        ({"endpoint": None}, "endpoint"),
        ({"endpoint": "/v1/fine_tuning/jobs"}, "endpoint"),
        ({"endpoint": "/chat/completions"}, "endpoint"),
        ({"completion_window": None}, "completion_window"),
        ({"completion_window": "48h"}, "completion_window"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {_long(65): "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
        ({"metadata": {"k": 5}}, "metadata.k"),
        ({"metadata": ["k", "v"]}, "metadata"),
        ({"output_expires_after": {"anchor": "created_at", "seconds": 3599}}, "seconds"),
        ({"output_expires_after": {"anchor": "created_at", "seconds": 2_592_001}}, "seconds"),
        ({"output_expires_after": {"anchor": "completed_at", "seconds": 3600}}, "anchor"),
        ({"output_expires_after": 3600}, "output_expires_after"),
    ],
)
async def test_create_with_invalid_parameters_is_400(
    api: FakeApi, change: dict[str, Any], param: str
) -> None:
    """Create checks its parameters synchronously: 400 naming the parameter, no batch made."""
    file = await api.upload(jsonl([chat_line("a")]))
    payload: dict[str, Any] = {
        "input_file_id": file["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    for key, value in change.items():
        if value is None:
            payload.pop(key)
        else:
            payload[key] = value
    status, body = await api.call("POST", "/batches", json_body=payload)
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"].endswith(param)
    assert api.service.batch_ids == []


async def test_create_with_invalid_json_body_is_400(api: FakeApi) -> None:
    """A body that is not JSON is refused."""
    status, body = await api.call("POST", "/batches", body=b"{not json")
    assert status == 400
    assert "JSON" in body["error"]["message"]


async def test_create_accepts_metadata_at_its_limits(api: FakeApi) -> None:
    """16 pairs, 64-character keys and 512-character values are accepted and echoed."""
    metadata = {f"{i:02d}" + _long(62): "v" * 512 for i in range(16)}
    batch = await api.submit([chat_line("a")], metadata=metadata)
    assert batch["metadata"] == metadata


async def test_create_accepts_output_expires_after_bounds(api: FakeApi) -> None:
    """output_expires_after seconds 3600 and 2592000 are accepted."""
    for seconds in (3600, 2_592_000):
        batch = await api.submit(
            [chat_line("a")], output_expires_after={"anchor": "created_at", "seconds": seconds}
        )
        assert batch["status"] == "validating"


async def test_create_with_unknown_or_deleted_file_is_404(api: FakeApi) -> None:
    """An unknown or deleted input file gets 404."""
    status, body = await api.call(
        "POST",
        "/batches",
        json_body={
            "input_file_id": "file-nope",
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    assert status == 404
    assert "file-nope" in body["error"]["message"]
    file = await api.upload(jsonl([chat_line("a")]))
    await api.ok("DELETE", f"/files/{file['id']}")
    status, _ = await api.call(
        "POST",
        "/batches",
        json_body={
            "input_file_id": file["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    assert status == 404
    assert api.service.batch_ids == []


async def test_create_from_non_batch_file_is_400(api: FakeApi) -> None:
    """The input file must have purpose batch."""
    file = await api.upload(jsonl([chat_line("a")]), filename="a.jsonl", purpose="user_data")
    status, body = await api.call(
        "POST",
        "/batches",
        json_body={
            "input_file_id": file["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    assert status == 400
    assert body["error"]["param"] == "input_file_id"
    assert "purpose" in body["error"]["message"]


async def test_deleting_input_file_after_create_does_not_break_the_batch(
    api: FakeApi, clock: VirtualClock
) -> None:
    """A batch keeps its input once created, even if the file is deleted."""
    batch = await api.submit([chat_line("a"), chat_line("b")])
    await api.ok("DELETE", f"/files/{batch['input_file_id']}")
    clock.advance(60)
    done = await api.batch(batch["id"])
    assert done["status"] == "completed"
    assert done["request_counts"]["completed"] == 2


# -- list -------------------------------------------------------------------------------------


async def _create_many(api: FakeApi, clock: VirtualClock, count: int) -> list[str]:
    file = await api.upload(jsonl([chat_line("a")]))
    ids = []
    for _ in range(count):
        ids.append((await api.create(file["id"]))["id"])
        clock.advance(1)
    return ids


async def test_list_batches_newest_first_default_limit_20(
    api: FakeApi, clock: VirtualClock
) -> None:
    """GET /batches lists newest first, 20 by default, with first_id/last_id/has_more."""
    ids = await _create_many(api, clock, 25)
    page = await api.ok("GET", "/batches")
    assert page["object"] == "list"
    assert [b["id"] for b in page["data"]] == ids[::-1][:20]
    assert page["first_id"] == ids[-1]
    assert page["last_id"] == ids[5]
    assert page["has_more"] is True
    created = [b["created_at"] for b in page["data"]]
    assert created == sorted(created, reverse=True)


async def test_list_batches_after_gives_items_strictly_after(
    api: FakeApi, clock: VirtualClock
) -> None:
    """Paging with after = last item's id visits every batch once, newest first."""
    ids = await _create_many(api, clock, 11)
    seen: list[str] = []
    params = {"limit": "4"}
    pages = 0
    while True:
        page = await api.ok("GET", "/batches", params=params)
        pages += 1
        seen.extend(b["id"] for b in page["data"])
        if not page["has_more"]:
            break
        params = {"limit": "4", "after": page["data"][-1]["id"]}
    assert seen == ids[::-1]
    assert pages == 3
    page = await api.ok("GET", "/batches", params={"after": ids[5]})
    assert [b["id"] for b in page["data"]] == ids[:5][::-1]
    page = await api.ok("GET", "/batches", params={"after": ids[0]})
    assert page["data"] == []
    assert page["has_more"] is False


async def test_list_batches_same_second_keeps_creation_order(api: FakeApi) -> None:
    """Batches created in the same second still list newest (latest created) first."""
    file = await api.upload(jsonl([chat_line("a")]))
    ids = [(await api.create(file["id"]))["id"] for _ in range(5)]
    page = await api.ok("GET", "/batches")
    assert [b["id"] for b in page["data"]] == ids[::-1]


async def test_list_batches_exact_page_has_no_more(api: FakeApi, clock: VirtualClock) -> None:
    """A page that takes the last items says has_more false."""
    ids = await _create_many(api, clock, 4)
    page = await api.ok("GET", "/batches", params={"limit": "4"})
    assert len(page["data"]) == 4
    assert page["has_more"] is False
    page = await api.ok("GET", "/batches", params={"limit": "3"})
    assert page["has_more"] is True
    assert page["last_id"] == ids[1]


async def test_list_batches_empty(api: FakeApi) -> None:
    """With no batches the list is empty, has_more false, ids null."""
    page = await api.ok("GET", "/batches")
    assert page == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }


@pytest.mark.parametrize(
    "params",
    [{"limit": "0"}, {"limit": "101"}, {"limit": "x"}, {"after": "batch_unknown"}],
)
async def test_list_batches_bad_query_is_400(api: FakeApi, params: dict[str, str]) -> None:
    """limit must be 1..100 and after a known batch id."""
    status, body = await api.call("GET", "/batches", params=params)
    assert status == 400
    assert body["error"]["param"] == next(iter(params))


async def test_list_batches_limit_100_is_accepted(api: FakeApi, clock: VirtualClock) -> None:
    """limit=100 is the maximum and is accepted."""
    await _create_many(api, clock, 2)
    assert len((await api.ok("GET", "/batches", params={"limit": "100"}))["data"]) == 2


async def test_list_shows_the_same_state_as_retrieve(api: FakeApi, clock: VirtualClock) -> None:
    """Listed batches are the same objects retrieve returns at that moment."""
    first = await api.submit([chat_line("a")])
    clock.advance(30)
    second = await api.submit([chat_line("b")])
    page = await api.ok("GET", "/batches")
    assert page["data"] == [await api.batch(second["id"]), await api.batch(first["id"])]
    assert page["data"][1]["status"] == "completed"


# -- cancel -----------------------------------------------------------------------------------


async def test_cancel_in_progress_gives_cancelling(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """Cancelling an in_progress batch answers it as cancelling with cancelling_at set."""
    api = make_api(lines_per_second=1)
    batch = await api.submit([chat_line(str(i)) for i in range(10)])
    clock.advance(3)
    assert (await api.batch(batch["id"]))["status"] == "in_progress"
    cancelled = await api.ok("POST", f"/batches/{batch['id']}/cancel")
    assert cancelled["status"] == "cancelling"
    assert cancelled["cancelling_at"] == int(clock.now())
    assert cancelled["in_progress_at"] is not None


async def test_repeat_cancel_returns_the_batch_unchanged(
    make_api: Callable[..., FakeApi], clock: VirtualClock
) -> None:
    """A second cancel of a cancelling batch returns it unchanged (same cancelling_at)."""
    api = make_api(cancel_seconds=600)
    batch = await api.submit([chat_line("a")])
    first = await api.ok("POST", f"/batches/{batch['id']}/cancel")
    clock.advance(5)
    second = await api.ok("POST", f"/batches/{batch['id']}/cancel")
    assert second == first
    assert second["status"] == "cancelling"


@pytest.mark.parametrize("config", [{}, {"cancel_seconds": 0.0}])
async def test_cancel_of_a_finished_batch_is_400(
    make_api: Callable[..., FakeApi], clock: VirtualClock, config: dict[str, float]
) -> None:
    """Cancelling a completed or cancelled batch is a 400 naming its status."""
    api = make_api(**config)
    batch = await api.submit([chat_line("a")])
    if config:
        await api.ok("POST", f"/batches/{batch['id']}/cancel")
    clock.advance(60)
    final = (await api.batch(batch["id"]))["status"]
    assert final == ("cancelled" if config else "completed")
    status, body = await api.call("POST", f"/batches/{batch['id']}/cancel")
    assert status == 400
    assert final in body["error"]["message"]
    assert (await api.batch(batch["id"]))["status"] == final


async def test_cancel_unknown_batch_is_404(api: FakeApi) -> None:
    """Cancelling an unknown batch is 404 batch_not_found."""
    status, body = await api.call("POST", "/batches/batch_nope/cancel")
    assert status == 404
    assert body["error"]["code"] == "batch_not_found"


# -- status overrides ------------------------------------------------------------------------


async def test_override_status_reports_an_unknown_status(api: FakeApi, clock: VirtualClock) -> None:
    """override_status makes retrieve, list and cancel report any string as the status."""
    first = await api.submit([chat_line("a")])
    second = await api.submit([chat_line("b")])
    api.service.override_status(first["id"], "scheduled")
    assert (await api.batch(first["id"]))["status"] == "scheduled"
    assert (await api.batch(second["id"]))["status"] == "validating"
    listed = {b["id"]: b["status"] for b in (await api.ok("GET", "/batches"))["data"]}
    assert listed == {first["id"]: "scheduled", second["id"]: "validating"}
    cancelled = await api.ok("POST", f"/batches/{first['id']}/cancel")
    assert cancelled["status"] == "scheduled"
    assert cancelled["cancelling_at"] is not None  # the simulation went on underneath
    assert (await api.service.get_batch(first["id"])).status.value == "cancelling"


async def test_override_status_can_be_removed(api: FakeApi, clock: VirtualClock) -> None:
    """None restores the real status, which has kept moving meanwhile."""
    batch = await api.submit([chat_line("a")])
    api.service.override_status(batch["id"], "batch_queued")
    clock.advance(3600)
    overridden = await api.batch(batch["id"])
    assert overridden["status"] == "batch_queued"
    assert overridden["completed_at"] is not None
    api.service.override_status(batch["id"], None)
    assert (await api.batch(batch["id"]))["status"] == "completed"


async def test_override_status_checks_its_arguments(api: FakeApi) -> None:
    """An unknown batch is a KeyError, an empty status a ValueError."""
    batch = await api.submit([chat_line("a")])
    with pytest.raises(KeyError):
        api.service.override_status("batch_nope", "scheduled")
    with pytest.raises(KeyError):
        api.service.override_status("batch_nope", None)
    with pytest.raises(ValueError, match="non-empty"):
        api.service.override_status(batch["id"], "")
    assert (await api.batch(batch["id"]))["status"] == "validating"
