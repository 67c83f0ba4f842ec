"""The fake batch service: auth, routing, headers and the Files API."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from email.utils import formatdate, parsedate_to_datetime

import pytest
from conftest import API_KEY, BASE_URL, FakeApi, chat_line, jsonl

from aiobatch.testing import FakeBatchService, FakeConfig, Fault, VirtualClock
from aiobatch.transport import FilePart, Multipart, Request

ERROR_KEYS = {"message", "type", "param", "code"}

# -- auth -------------------------------------------------------------------------------------


async def test_missing_authorization_is_401_in_openai_shape(
    make_api: Callable[..., FakeApi],
) -> None:
    """A request without an Authorization header gets 401 with OpenAI's error envelope."""
    api = make_api(key=None)
    status, body = await api.call("GET", "/batches")
    assert status == 401
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_KEYS
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] is None
    assert body["error"]["code"] is None
    assert "API key" in body["error"]["message"]


async def test_wrong_key_is_401_invalid_api_key_with_masked_key(
    make_api: Callable[..., FakeApi],
) -> None:
    """A bearer token other than the configured key gets 401 invalid_api_key, key masked."""
    wrong = "sk-wrong-key-abcdefghijklmnop"
    api = make_api(api_key=API_KEY, key=wrong)
    status, body = await api.call("GET", "/batches")
    assert status == 401
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "invalid_request_error"
    message = body["error"]["message"]
    assert wrong not in message
    assert wrong[-4:] in message  # enough to recognise the key, never the whole key
    assert API_KEY not in message


async def test_short_wrong_key_is_fully_masked(make_api: Callable[..., FakeApi]) -> None:
    """A short wrong key is not shown at all, not even in part."""
    api = make_api(api_key=API_KEY, key="abc123")
    status, body = await api.call("GET", "/batches")
    assert status == 401
    assert "abc" not in body["error"]["message"]
    assert "123" not in body["error"]["message"]


async def test_configured_key_is_accepted(make_api: Callable[..., FakeApi]) -> None:
    """The configured key is accepted."""
    api = make_api(api_key=API_KEY, key=API_KEY)
    status, _ = await api.call("GET", "/batches")
    assert status == 200


async def test_any_bearer_token_accepted_without_configured_key(
    make_api: Callable[..., FakeApi],
) -> None:
    """With api_key=None any bearer token is accepted."""
    api = make_api(key="anything-at-all")
    status, _ = await api.call("GET", "/files")
    assert status == 200


async def test_non_bearer_authorization_is_401(api: FakeApi) -> None:
    """An Authorization header with another scheme counts as no key."""
    status, body = await api.call(
        "GET", "/batches", headers={"Authorization": "Basic Zm9vOmJhcg=="}
    )
    assert status == 401
    assert body["error"]["code"] is None


async def test_azure_api_key_header_is_accepted(make_api: Callable[..., FakeApi]) -> None:
    """The api-key header (Azure style) is accepted in place of the bearer token."""
    api = make_api(api_key=API_KEY)
    status, _ = await api.call("GET", "/batches", headers={"api-key": API_KEY})
    assert status == 200


# -- routing and headers -------------------------------------------------------------------


async def test_every_response_has_request_id_and_content_type(api: FakeApi) -> None:
    """Success and error responses carry x-request-id req_<hex> and a content-type."""
    ids = set()
    for path in ("/batches", "/batches/batch_nope", "/nowhere"):
        response = await api.raw("GET", path)
        assert re.fullmatch(r"req_[0-9a-f]{32}", response.headers["x-request-id"])
        assert response.headers["content-type"] == "application/json"
        ids.add(response.headers["x-request-id"])
    unauthorised = await FakeApi(api.service, key=None).raw("GET", "/batches")
    assert re.fullmatch(r"req_[0-9a-f]{32}", unauthorised.headers["x-request-id"])
    ids.add(unauthorised.headers["x-request-id"])
    assert len(ids) == 4


async def test_every_response_has_a_date_from_the_service_clock(
    api: FakeApi, clock: VirtualClock
) -> None:
    """JSON, error, streamed and faulted answers carry an RFC 7231 date on the service clock."""
    uploaded = await api.upload(jsonl([chat_line("a")]))
    clock.advance(3600.7)
    expected = formatdate(clock.now(), usegmt=True)
    assert expected.endswith(" GMT")
    responses = [
        await api.raw("GET", "/batches"),
        await api.raw("GET", "/batches/batch_nope"),
        await api.raw("GET", f"/files/{uploaded['id']}/content"),
        await FakeApi(api.service, key=None).raw("GET", "/batches"),
    ]
    api.service.faults.add(Fault.http(429))
    responses.append(await api.raw("GET", "/batches"))
    for response in responses:
        assert response.headers["date"] == expected
        assert parsedate_to_datetime(response.headers["date"]).timestamp() == int(clock.now())


async def test_date_is_taken_when_a_slow_answer_leaves(api: FakeApi, clock: VirtualClock) -> None:
    """A slow fault's answer is dated at the end of the delay, when it is sent."""
    api.service.faults.add(Fault.slow(90, path="/batches"))
    start = clock.now()
    async with clock.auto_advance():
        response = await api.raw("GET", "/batches")
    assert response.headers["date"] == formatdate(start + 90, usegmt=True)


async def test_routes_on_path_after_last_v1_segment(api: FakeApi) -> None:
    """Base URLs with a prefix before /v1 (gateways, Azure) route the same way."""
    for url in ("http://gw.local/openai/v1/batches", "http://h/proxy/v1/x/v1/batches"):
        response = await api.service.handle(Request("GET", url, headers=api.headers()))
        assert response.status == 200
        assert json.loads(await response.read())["object"] == "list"


async def test_query_in_url_is_honoured(api: FakeApi) -> None:
    """Query parameters in the URL itself are read like request.params."""
    response = await api.service.handle(
        Request("GET", f"{BASE_URL}/batches?limit=0", headers=api.headers())
    )
    assert response.status == 400


async def test_unknown_route_is_404_invalid_url(api: FakeApi) -> None:
    """Unknown paths and methods get OpenAI's 404 'Invalid URL'."""
    for method, path in (("GET", "/nowhere"), ("DELETE", "/batches/batch_x"), ("PUT", "/files")):
        status, body = await api.call(method, path)
        assert status == 404
        assert body["error"]["message"].startswith("Invalid URL")
        assert method in body["error"]["message"]


async def test_transport_uses_the_service_clock_and_handler(clock: VirtualClock) -> None:
    """service.transport() sends requests to handle() without sockets."""
    service = FakeBatchService(clock=clock)
    transport = service.transport(timeout=5)
    response = await transport.send(
        Request("GET", f"{BASE_URL}/batches", headers={"authorization": "Bearer k"})
    )
    assert response.status == 200
    assert service.request_count("GET", "/batches") == 1


# -- files ---------------------------------------------------------------------------------


async def test_upload_returns_processed_file_expiring_in_30_days(
    api: FakeApi, clock: VirtualClock
) -> None:
    """A batch upload returns a processed file-<hex> object that expires 30 days later."""
    content = jsonl([chat_line("a"), chat_line("b")])
    file = await api.upload(content, filename="reqs.jsonl")
    assert re.fullmatch(r"file-[0-9a-f]+", file["id"])
    assert file["object"] == "file"
    assert file["bytes"] == len(content)
    assert file["filename"] == "reqs.jsonl"
    assert file["purpose"] == "batch"
    assert file["status"] == "processed"
    assert file["created_at"] == int(clock.now())
    assert file["expires_at"] == file["created_at"] + 30 * 86_400
    assert api.service.file_content(file["id"]) == content


async def test_upload_other_purpose_has_no_expiry(api: FakeApi) -> None:
    """Non-batch uploads do not expire unless asked to."""
    file = await api.upload(b"hello", filename="notes.txt", purpose="user_data")
    assert file["expires_at"] is None
    assert file["purpose"] == "user_data"


async def test_upload_non_jsonl_for_batch_is_400(api: FakeApi) -> None:
    """A purpose=batch upload whose name is not .jsonl is refused like OpenAI does."""
    form = Multipart(
        fields=(("purpose", "batch"),), files=(("file", FilePart("data.csv", content=b"x")),)
    )
    status, body = await api.call("POST", "/files", body=form)
    assert status == 400
    assert body["error"]["message"] == "Invalid file format for Batch API. Must be .jsonl"
    assert body["error"]["param"] is None
    assert api.service.file_ids == []


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ((), "purpose"),
        ((("purpose", "training"),), "purpose"),
    ],
)
async def test_upload_with_missing_or_bad_purpose_is_400(
    api: FakeApi, fields: tuple[tuple[str, str], ...], param: str
) -> None:
    """The purpose field is required and must be a known purpose."""
    form = Multipart(fields=fields, files=(("file", FilePart("a.jsonl", content=b"{}")),))
    status, body = await api.call("POST", "/files", body=form)
    assert status == 400
    assert body["error"]["param"] == param
    assert api.service.file_ids == []


async def test_upload_without_file_part_is_400(api: FakeApi) -> None:
    """The file part is required."""
    status, body = await api.call("POST", "/files", body=Multipart(fields=(("purpose", "batch"),)))
    assert status == 400
    assert body["error"]["param"] == "file"


async def test_upload_with_json_body_is_400(api: FakeApi) -> None:
    """Uploads must be multipart."""
    status, _ = await api.call("POST", "/files", json_body={"purpose": "batch"})
    assert status == 400


async def test_upload_over_the_batch_size_limit_is_400(make_api: Callable[..., FakeApi]) -> None:
    """A batch file over max_batch_file_bytes is refused; other purposes use max_file_bytes."""
    api = make_api(max_batch_file_bytes=10, max_file_bytes=20)
    form = Multipart(
        fields=(("purpose", "batch"),), files=(("file", FilePart("a.jsonl", content=b"x" * 11)),)
    )
    status, body = await api.call("POST", "/files", body=form)
    assert status == 400
    assert body["error"]["code"] == "file_too_large"
    assert (await api.upload(b"x" * 15, filename="a.txt", purpose="user_data"))["bytes"] == 15
    status, _ = await api.call(
        "POST",
        "/files",
        body=Multipart(
            fields=(("purpose", "user_data"),),
            files=(("file", FilePart("a.txt", content=b"x" * 21)),),
        ),
    )
    assert status == 400


async def test_malformed_lines_are_accepted_at_upload(api: FakeApi) -> None:
    """A .jsonl file with broken lines uploads fine (it fails later, at validation)."""
    file = await api.upload(b"not json\n{also not\n")
    assert file["status"] == "processed"


async def test_upload_expires_after_sets_expires_at(api: FakeApi) -> None:
    """expires_after[anchor]/[seconds] form fields set expires_at."""
    form = Multipart(
        fields=(
            ("purpose", "batch"),
            ("expires_after[anchor]", "created_at"),
            ("expires_after[seconds]", "7200"),
        ),
        files=(("file", FilePart("a.jsonl", content=b"{}")),),
    )
    file = await api.ok("POST", "/files", body=form)
    assert file["expires_at"] == file["created_at"] + 7200


@pytest.mark.parametrize(
    ("anchor", "seconds"), [("created_at", "60"), ("created_at", "9999999"), ("now", "7200")]
)
async def test_upload_bad_expires_after_is_400(api: FakeApi, anchor: str, seconds: str) -> None:
    """expires_after needs anchor created_at and 3600..2592000 seconds."""
    form = Multipart(
        fields=(
            ("purpose", "batch"),
            ("expires_after[anchor]", anchor),
            ("expires_after[seconds]", seconds),
        ),
        files=(("file", FilePart("a.jsonl", content=b"{}")),),
    )
    status, body = await api.call("POST", "/files", body=form)
    assert status == 400
    assert body["error"]["param"].startswith("expires_after")


async def test_file_expires_at_expires_at(api: FakeApi, clock: VirtualClock) -> None:
    """A file past its expires_at is gone (404)."""
    form = Multipart(
        fields=(
            ("purpose", "batch"),
            ("expires_after[anchor]", "created_at"),
            ("expires_after[seconds]", "3600"),
        ),
        files=(("file", FilePart("a.jsonl", content=b"{}")),),
    )
    file = await api.ok("POST", "/files", body=form)
    clock.advance(3599)
    assert (await api.call("GET", f"/files/{file['id']}"))[0] == 200
    clock.advance(1)
    assert (await api.call("GET", f"/files/{file['id']}"))[0] == 404


async def test_retrieve_file_and_unknown_file(api: FakeApi) -> None:
    """GET /files/{id} returns the same object as the upload; unknown ids are 404."""
    file = await api.upload(b"{}\n")
    assert await api.ok("GET", f"/files/{file['id']}") == file
    status, body = await api.call("GET", "/files/file-missing")
    assert status == 404
    assert "file-missing" in body["error"]["message"]


async def test_content_is_streamed_in_chunks(make_api: Callable[..., FakeApi]) -> None:
    """File content comes back as a stream of chunk_size pieces that join to the upload."""
    api = make_api(chunk_size=10)
    content = bytes(range(256)) * 3
    file = await api.upload(content, filename="blob.bin", purpose="user_data")
    response = await api.raw("GET", f"/files/{file['id']}/content")
    assert response.status == 200
    assert response.is_streamed
    chunks = [chunk async for chunk in response.iter_chunks()]
    assert b"".join(chunks) == content
    assert len(chunks) == -(-len(content) // 10)
    assert all(len(c) == 10 for c in chunks[:-1])
    assert re.fullmatch(r"req_[0-9a-f]{32}", response.headers["x-request-id"])


async def test_delete_file(api: FakeApi) -> None:
    """DELETE returns {id, object: file, deleted: true}; the file is then gone everywhere."""
    file = await api.upload(b"{}\n")
    body = await api.ok("DELETE", f"/files/{file['id']}")
    assert body == {"id": file["id"], "object": "file", "deleted": True}
    for method, path in (
        ("GET", f"/files/{file['id']}"),
        ("GET", f"/files/{file['id']}/content"),
        ("DELETE", f"/files/{file['id']}"),
    ):
        assert (await api.call(method, path))[0] == 404
    assert file["id"] not in api.service.file_ids
    listed = await api.ok("GET", "/files")
    assert listed["data"] == []


async def _upload_many(api: FakeApi, clock: VirtualClock, count: int) -> list[str]:
    ids = []
    for index in range(count):
        purpose = "batch" if index % 2 == 0 else "user_data"
        name = f"f{index}.jsonl" if purpose == "batch" else f"f{index}.txt"
        ids.append((await api.upload(b"{}\n", filename=name, purpose=purpose))["id"])
        clock.advance(1)
    return ids


async def test_list_files_newest_first_by_default(api: FakeApi, clock: VirtualClock) -> None:
    """GET /files lists every file, newest first, with first_id/last_id and has_more."""
    ids = await _upload_many(api, clock, 5)
    page = await api.ok("GET", "/files")
    assert page["object"] == "list"
    assert [f["id"] for f in page["data"]] == ids[::-1]
    assert page["first_id"] == ids[-1]
    assert page["last_id"] == ids[0]
    assert page["has_more"] is False
    created = [f["created_at"] for f in page["data"]]
    assert created == sorted(created, reverse=True)


async def test_list_files_ascending_and_by_purpose(api: FakeApi, clock: VirtualClock) -> None:
    """order=asc lists oldest first; purpose filters."""
    ids = await _upload_many(api, clock, 5)
    page = await api.ok("GET", "/files", params={"order": "asc"})
    assert [f["id"] for f in page["data"]] == ids
    page = await api.ok("GET", "/files", params={"purpose": "batch", "order": "asc"})
    assert [f["id"] for f in page["data"]] == ids[0::2]
    assert {f["purpose"] for f in page["data"]} == {"batch"}


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_list_files_paginates_with_after(
    api: FakeApi, clock: VirtualClock, order: str
) -> None:
    """limit and after page through every file exactly once, in order."""
    ids = await _upload_many(api, clock, 7)
    expected = ids if order == "asc" else ids[::-1]
    seen: list[str] = []
    params = {"limit": "3", "order": order}
    while True:
        page = await api.ok("GET", "/files", params=params)
        seen.extend(f["id"] for f in page["data"])
        if not page["has_more"]:
            break
        assert len(page["data"]) == 3
        params = {**params, "after": page["data"][-1]["id"]}
    assert seen == expected


async def test_list_files_after_a_deleted_file(api: FakeApi, clock: VirtualClock) -> None:
    """A deleted file's id still works as the after cursor."""
    ids = await _upload_many(api, clock, 4)
    await api.ok("DELETE", f"/files/{ids[2]}")
    page = await api.ok("GET", "/files", params={"after": ids[2]})
    assert [f["id"] for f in page["data"]] == [ids[1], ids[0]]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "10001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"order": "sideways"}, "order"),
        ({"after": "file-unknown"}, "after"),
    ],
)
async def test_list_files_bad_query_is_400(
    api: FakeApi, params: dict[str, str], param: str
) -> None:
    """limit must be 1..10000, order asc/desc, after a known id."""
    status, body = await api.call("GET", "/files", params=params)
    assert status == 400
    assert body["error"]["param"] == param


async def test_list_files_limit_bounds_are_accepted(api: FakeApi, clock: VirtualClock) -> None:
    """limit=1 and limit=10000 are both valid."""
    await _upload_many(api, clock, 2)
    assert len((await api.ok("GET", "/files", params={"limit": "1"}))["data"]) == 1
    assert len((await api.ok("GET", "/files", params={"limit": "10000"}))["data"]) == 2


async def test_config_rejects_nonsense() -> None:
    """FakeConfig refuses negative durations and non-positive limits."""
    with pytest.raises(ValueError, match="validation_seconds"):
        FakeConfig(validation_seconds=-1)
    with pytest.raises(ValueError, match="max_lines"):
        FakeConfig(max_lines=0)


async def test_request_log_records_requests(api: FakeApi, clock: VirtualClock) -> None:
    """service.requests records method, path, params, status, request id and time."""
    await api.call("GET", "/batches", params={"limit": "5"})
    clock.advance(3)
    await api.call("GET", "/files/file-x")
    first, second = api.service.requests
    assert (first.method, first.path, dict(first.params), first.status) == (
        "GET",
        "/batches",
        {"limit": "5"},
        200,
    )
    assert (second.path, second.status) == ("/files/file-x", 404)
    assert second.at - first.at == 3
    assert first.fault is None
    assert api.service.request_count("GET", "/files/*") == 1
    assert api.service.request_count(path="/v1/batches") == 1


async def test_request_log_is_bounded(make_api: Callable[..., FakeApi]) -> None:
    """request_log_size bounds the log, keeping the newest entries."""
    api = make_api(request_log_size=2)
    for limit in ("1", "2", "3"):
        await api.call("GET", "/batches", params={"limit": limit})
    assert [r.params["limit"] for r in api.service.requests] == ["2", "3"]


async def test_repr_never_shows_the_api_key(clock: VirtualClock) -> None:
    """The service's repr does not contain its API key."""
    service = FakeBatchService(clock=clock, api_key=API_KEY)
    assert API_KEY not in repr(service)
