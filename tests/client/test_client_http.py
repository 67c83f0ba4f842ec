"""BatchClient against small hand-written handlers: error mapping, streaming, secrets.

The fake batch service plays the server in ``test_client.py``; here a few lines of
handler produce exact bytes and statuses that the service has no reason to send
(non-JSON errors, chunk boundaries in the middle of lines, secrets echoed back).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import pickle
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import aclosing
from pathlib import Path
from typing import Any

import attrs
import pytest

import aiobatch
from aiobatch import BatchClient, OpenAIProvider, RetryPolicy, Secret, set_retry_testing
from aiobatch.errors import (
    AmbiguousCreateError,
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    ConflictError,
    DecodeError,
    LookupIncompleteError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    TransportError,
    UnexpectedTransitionError,
    UnprocessableEntityError,
)
from aiobatch.testing import VirtualClock
from aiobatch.transport import InMemoryTransport, Request, Response

KEY = "sk-test-0123456789abcdefSECRET"
BASE = "https://api.example.test/v1"

Handler = Callable[[Request], Awaitable[Response]]


@pytest.fixture(autouse=True)
def _no_global_testing_mode() -> Iterator[None]:
    """Every test starts and ends with the global retry testing mode off."""
    with set_retry_testing(False):
        yield


def make_client(handler: Handler, *, retry: RetryPolicy | None = None) -> BatchClient:
    return BatchClient(
        api_key=KEY,
        base_url=BASE,
        transport=InMemoryTransport(handler),
        retry=retry or RetryPolicy.for_testing(max_attempts=3),
        clock=VirtualClock(),
    )


def json_response(status: int, data: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        status, {"content-type": "application/json", **(headers or {})}, json.dumps(data).encode()
    )


def envelope(message: str, code: str | None = "some_code") -> dict[str, Any]:
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": "p", "code": code}
    }


def streamed(parts: list[bytes], released: list[bool]) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    async def release() -> None:
        released.append(True)

    return Response(200, {}, chunks=chunks(), release=release)


# --- provider and secrets ----------------------------------------------------------------


def test_secret_never_shows_its_value() -> None:
    """A Secret's repr, str and format are masked; reveal() gives the value."""
    secret = Secret(KEY)
    for text in (repr(secret), str(secret), f"{secret}", f"{secret!r}", repr([secret])):
        assert KEY not in text
    assert secret.reveal() == KEY
    assert secret == Secret(KEY)
    assert secret != Secret("other")
    assert hash(secret) == hash(Secret(KEY))
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    with pytest.raises(TypeError):
        Secret(123)  # type: ignore[arg-type]


def test_provider_urls_and_headers() -> None:
    """The provider joins paths onto the base URL and sends auth, org and project headers."""
    provider = OpenAIProvider(
        api_key=KEY, base_url=BASE + "/", organization="org-1", project="proj-1"
    )
    assert provider.url("/batches") == BASE + "/batches"
    assert provider.url("files/f1") == BASE + "/files/f1"
    assert provider.headers() == {
        "authorization": f"Bearer {KEY}",
        "openai-organization": "org-1",
        "openai-project": "proj-1",
    }
    assert OpenAIProvider().headers() == {}
    assert KEY not in repr(provider)
    assert KEY not in str(provider)


def test_provider_from_env() -> None:
    """from_env takes what is not given from the OPENAI_* variables, arguments winning."""
    env = {
        "OPENAI_API_KEY": KEY,
        "OPENAI_BASE_URL": "http://localhost:8080/v1",
        "OPENAI_ORG_ID": "org-env",
        "OPENAI_PROJECT_ID": "proj-env",
    }
    provider = OpenAIProvider.from_env(environ=env)
    assert provider.api_key == Secret(KEY)
    assert provider.base_url == "http://localhost:8080/v1"
    assert (provider.organization, provider.project) == ("org-env", "proj-env")
    other = OpenAIProvider.from_env(api_key="sk-arg", base_url=BASE, environ=env)
    assert other.api_key == Secret("sk-arg")
    assert other.base_url == BASE
    bare = OpenAIProvider.from_env(environ={})
    assert bare.api_key is None
    assert bare.base_url == aiobatch.DEFAULT_BASE_URL


def test_a_client_for_openai_itself_without_a_key_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OpenAI's own API without a key (OPENAI_API_KEY unset) is refused when the client is
    made, naming the variable; a server of one's own may take no key."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    transport = InMemoryTransport(_never)
    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY"):
        BatchClient(transport=transport)
    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY"):
        BatchClient(provider=OpenAIProvider(), transport=transport)
    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY"):
        BatchClient(provider="openai", base_url="https://api.openai.com/v1/", transport=transport)
    local = BatchClient(base_url="http://localhost:8000/v1", transport=transport)
    assert local.provider.base_url == "http://localhost:8000/v1"


def test_client_takes_provider_or_its_parts() -> None:
    """Passing a provider and provider arguments together is refused."""
    with pytest.raises(TypeError, match="either provider"):
        BatchClient(provider=OpenAIProvider(), api_key=KEY, transport=InMemoryTransport(_never))


async def test_default_transport_is_aiohttp_and_closed_with_the_client() -> None:
    """Without a transport the client makes an AiohttpTransport and closes it."""
    from aiobatch.transport import AiohttpTransport

    async with BatchClient(api_key=KEY, base_url=BASE) as client:
        assert isinstance(client._transport, AiohttpTransport)
    assert "closed" in repr(client._transport)


async def test_passed_transport_stays_open() -> None:
    """A transport the caller passed in is not closed by the client."""
    seen: list[Request] = []

    async def handler(request: Request) -> Response:
        seen.append(request)
        return json_response(200, {"id": "file-1", "object": "file", "deleted": True})

    transport = InMemoryTransport(handler)
    async with BatchClient(api_key=KEY, base_url=BASE, transport=transport):
        pass
    await make_client(handler).delete_file("file-1")
    async with BatchClient(api_key=KEY, base_url=BASE, transport=transport) as client:
        await client.delete_file("file-1")
    assert len(seen) == 2


async def _never(request: Request) -> Response:
    raise AssertionError("no request expected")


async def test_requests_carry_auth_and_never_show_it() -> None:
    """Each request carries the bearer key; reprs of client and request do not."""
    seen: list[Request] = []

    async def handler(request: Request) -> Response:
        seen.append(request)
        return json_response(200, {"id": "file-1", "object": "file", "deleted": True})

    client = make_client(handler)
    await client.delete_file("file-1")
    (request,) = seen
    assert request.method == "DELETE"
    assert request.url == BASE + "/files/file-1"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    for text in (repr(client), str(client), repr(client.provider), repr(request)):
        assert KEY not in text


async def test_ids_are_quoted_in_paths() -> None:
    """An id with a slash or a space cannot change the path it is put in."""
    seen: list[str] = []

    async def handler(request: Request) -> Response:
        seen.append(request.url)
        return json_response(404, envelope("nope"))

    client = make_client(handler)
    with pytest.raises(NotFoundError):
        await client.retrieve_batch("../files x")
    assert seen == [BASE + "/batches/..%2Ffiles%20x"]
    with pytest.raises(ValueError, match="non-empty"):
        await client.retrieve_batch("")


# --- error mapping -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, ConflictError),
        (418, APIStatusError),
        (422, UnprocessableEntityError),
        (429, RateLimitError),
        (500, ServerError),
        (503, ServerError),
    ],
)
async def test_error_status_maps_to_error_class(status: int, cls: type[APIStatusError]) -> None:
    """Each status becomes its error class with the envelope's fields and the request id."""

    async def handler(request: Request) -> Response:
        return json_response(status, envelope(f"failed with {status}"), {"x-request-id": "req_42"})

    with pytest.raises(cls) as info:
        await make_client(handler, retry=RetryPolicy.never()).retrieve_batch("batch_1")
    err = info.value
    assert type(err) is cls
    assert err.status_code == status
    assert err.message == f"failed with {status}"
    assert err.request_id == "req_42"
    assert (err.error_type, err.error_code, err.error_param) == (
        "invalid_request_error",
        "some_code",
        "p",
    )
    assert (err.method, err.url) == ("GET", BASE + "/batches/batch_1")
    assert "req_42" in str(err)
    assert err.body == envelope(f"failed with {status}")


async def test_non_json_error_body_becomes_the_message() -> None:
    """A plain-text error body is kept as the message (trimmed) and as the body."""

    async def handler(request: Request) -> Response:
        return Response(502, {}, b"<html>Bad gateway</html>")

    with pytest.raises(ServerError) as info:
        await make_client(handler, retry=RetryPolicy.never()).retrieve_batch("b")
    assert info.value.message == "<html>Bad gateway</html>"
    assert info.value.request_id is None


async def test_error_without_envelope_or_body() -> None:
    """An empty error body gives a message naming the status."""

    async def handler(request: Request) -> Response:
        return Response(404, {}, b"")

    with pytest.raises(NotFoundError, match="HTTP 404"):
        await make_client(handler).retrieve_batch("b")


async def test_portkey_style_error_body_is_kept() -> None:
    """A JSON body that is not OpenAI's envelope is kept whole on the error."""
    body = {"status": "failure", "message": "Something went wrong"}

    async def handler(request: Request) -> Response:
        return json_response(500, body)

    with pytest.raises(ServerError) as info:
        await make_client(handler, retry=RetryPolicy.never()).retrieve_batch("b")
    assert info.value.body == body


async def test_rate_limit_past_the_cap_is_raised_with_retry_after() -> None:
    """A 429 asking for longer than max_retry_after is raised at once with retry_after."""
    seen: list[Request] = []

    async def handler(request: Request) -> Response:
        seen.append(request)
        return json_response(
            429, envelope("slow down", "rate_limit_exceeded"), {"retry-after": "600"}
        )

    clock = VirtualClock()
    client = BatchClient(
        api_key=KEY, base_url=BASE, transport=InMemoryTransport(handler), clock=clock
    )
    with pytest.raises(RateLimitError) as info:
        await client.retrieve_batch("b")
    assert info.value.retry_after == 600.0
    assert len(seen) == 1
    assert clock.now() == VirtualClock().now()


async def test_undecodable_success_body_is_a_decode_error() -> None:
    """A 200 whose body is not a Batch raises DecodeError naming what was decoded."""

    async def handler(request: Request) -> Response:
        return json_response(200, {"id": "batch_1", "status": "validating"})

    with pytest.raises(DecodeError, match="Batch"):
        await make_client(handler).retrieve_batch("batch_1")


async def test_echoed_key_is_scrubbed_from_errors(caplog: pytest.LogCaptureFixture) -> None:
    """A server echoing the key in its error message does not put it in our exception."""

    async def handler(request: Request) -> Response:
        if request.method == "GET":
            return json_response(401, envelope(f"Incorrect API key provided: {KEY}."))
        return Response(500, {}, f"bad key {KEY}".encode())

    client = make_client(handler)
    with caplog.at_level(logging.DEBUG, logger="aiobatch"):
        with pytest.raises(AuthenticationError) as info:
            await client.retrieve_batch("b")
        assert KEY not in str(info.value)
        assert KEY not in info.value.message
        assert "***" in info.value.message
        assert KEY not in repr(info.value.body)
        with pytest.raises(ServerError) as info2:
            await client.cancel_batch("b")
        assert KEY not in str(info2.value)
        assert KEY not in repr(info2.value.body)
    for record in caplog.records:
        assert KEY not in record.getMessage()
        assert KEY not in repr(record.__dict__)


# --- streaming files ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parts", "lines"),
    [
        ([b"a\nb\n"], [b"a", b"b"]),
        ([b"a\nb"], [b"a", b"b"]),
        ([b"ab", b"c\nde", b"f\n", b"g"], [b"abc", b"def", b"g"]),
        ([b"a\r\n", b"b\r", b"\n"], [b"a", b"b"]),
        ([b"a\n\nb\n"], [b"a", b"", b"b"]),
        ([b"\n"], [b""]),
        ([], []),
        ([b"x" * 100_000 + b"\n", b"y"], [b"x" * 100_000, b"y"]),
    ],
)
async def test_file_lines_split_across_chunks(parts: list[bytes], lines: list[bytes]) -> None:
    """Lines are split on newlines whatever the chunk boundaries, without their line ends."""
    released: list[bool] = []

    async def handler(request: Request) -> Response:
        assert request.url == BASE + "/files/file-1/content"
        return streamed(parts, released)

    got = [line async for line in make_client(handler).iter_file_lines("file-1")]
    assert got == lines
    assert released == [True]


async def test_stopping_early_closes_the_response() -> None:
    """Closing the line iterator after one line releases the streamed response."""
    released: list[bool] = []
    produced: list[int] = []

    async def handler(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(1000):
                produced.append(i)
                yield b"line %d\n" % i

        async def release() -> None:
            released.append(True)

        return Response(200, {}, chunks=chunks(), release=release)

    client = make_client(handler)
    async with aclosing(client.iter_file_lines("file-1")) as lines:
        async for line in lines:
            assert line == b"line 0"
            break
    assert released == [True]
    assert len(produced) < 5
    released.clear()
    async with aclosing(client.iter_results("file-1")) as results:
        with pytest.raises(DecodeError):
            await results.__anext__()
    assert released == [True]


async def test_bad_result_line_names_file_and_line() -> None:
    """A line that does not decode raises DecodeError with the file id and line number."""
    good = {
        "id": "r1",
        "custom_id": "a",
        "response": {"status_code": 200, "body": {}},
        "error": None,
    }
    content = (json.dumps(good) + "\n\n" + '{"custom_id": "b"}\n').encode()
    released: list[bool] = []

    async def handler(request: Request) -> Response:
        return streamed([content], released)

    got = []

    async def consume() -> None:
        async for item in make_client(handler).iter_results("file-9"):
            got.append(item)

    with pytest.raises(DecodeError, match=r"line 3 of file file-9"):
        await consume()
    assert [r.custom_id for r in got] == ["a"]
    assert released == [True]


async def test_download_is_atomic(tmp_path: Path) -> None:
    """A download that breaks midway leaves the old file untouched and no temp file."""
    target = tmp_path / "out.jsonl"
    target.write_bytes(b"old")

    async def handler(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"partial"
            raise TransportError("connection reset")

        return Response(200, {}, chunks=chunks())

    with pytest.raises(TransportError):
        await make_client(handler).download_file("file-1", target)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.jsonl"]


async def test_download_error_status_leaves_nothing(tmp_path: Path) -> None:
    """A 404 on download raises NotFoundError and creates no file."""

    async def handler(request: Request) -> Response:
        return json_response(404, envelope("No such File object"))

    with pytest.raises(NotFoundError):
        await make_client(handler).download_file("file-1", tmp_path / "x.jsonl")
    assert os.listdir(tmp_path) == []


# --- create without room for the key -----------------------------------------------------


async def test_full_metadata_means_no_key_and_no_blind_resend() -> None:
    """With 16 metadata pairs no key fits, so an ambiguous failure is raised, not re-sent."""
    seen: list[Request] = []

    async def handler(request: Request) -> Response:
        seen.append(request)
        return json_response(500, envelope("oops", None))

    metadata = {f"k{i}": "v" for i in range(16)}
    with pytest.raises(AmbiguousCreateError) as info:
        await make_client(handler).create_batch("file-1", "/v1/chat/completions", metadata=metadata)
    assert info.value.create_key is None
    assert isinstance(info.value.__cause__, ServerError)
    assert len(seen) == 1
    sent = json.loads(seen[0].body)  # type: ignore[arg-type]
    assert sent["metadata"] == metadata


async def test_full_metadata_still_retries_safe_failures() -> None:
    """Without a key, a 429 (refused, so safe) is still retried."""
    statuses = [429, 200]
    batch = {
        "id": "batch_1",
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-1",
        "completion_window": "24h",
        "status": "validating",
        "created_at": 1,
    }

    async def handler(request: Request) -> Response:
        status = statuses.pop(0)
        return json_response(status, batch if status == 200 else envelope("slow"))

    metadata = {f"k{i}": "v" for i in range(16)}
    got = await make_client(handler).create_batch("file-1", "/v1/embeddings", metadata=metadata)
    assert got.id == "batch_1"
    assert statuses == []


# --- wait and the lifecycle --------------------------------------------------------------


def batch_json(status: str) -> dict[str, Any]:
    return {
        "id": "batch_1",
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-1",
        "completion_window": "24h",
        "status": status,
        "created_at": 1,
    }


async def test_wait_rejects_a_backwards_move() -> None:
    """wait() checks every poll with the lifecycle: in_progress then validating is an error."""
    statuses = ["in_progress", "validating"]

    async def handler(request: Request) -> Response:
        return json_response(200, batch_json(statuses.pop(0)))

    clock = VirtualClock()
    client = BatchClient(
        api_key=KEY, base_url=BASE, transport=InMemoryTransport(handler), clock=clock
    )
    async with clock.auto_advance():
        with pytest.raises(UnexpectedTransitionError) as info:
            await client.wait("batch_1", poll_interval=1.0)
    assert (info.value.current, info.value.observed) == ("in_progress", "validating")


async def test_wait_polls_on_a_growing_schedule() -> None:
    """Polls start at poll_interval and grow by half up to max_interval."""
    statuses = ["validating"] * 5 + ["completed"]
    times: list[float] = []
    clock = VirtualClock()

    async def handler(request: Request) -> Response:
        times.append(clock.now())
        return json_response(200, batch_json(statuses.pop(0)))

    client = BatchClient(
        api_key=KEY, base_url=BASE, transport=InMemoryTransport(handler), clock=clock
    )
    async with clock.auto_advance():
        batch = await client.wait("batch_1", poll_interval=2.0, max_interval=5.0, jitter=0)
    assert batch.status is aiobatch.BatchStatus.COMPLETED
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == [2.0, 3.0, 4.5, 5.0, 5.0]


# --- the public surface ------------------------------------------------------------------


def test_public_surface() -> None:
    """aiobatch exports a sorted __all__ whose names all exist, and a version."""
    assert aiobatch.__all__ == sorted(aiobatch.__all__)
    for name in aiobatch.__all__:
        assert getattr(aiobatch, name) is not None
    for name in ("BatchClient", "RetryPolicy", "OpenAIProvider", "BatchStatus", "TERMINAL"):
        assert name in aiobatch.__all__
    assert isinstance(aiobatch.__version__, str)
    with pytest.raises(AttributeError):
        aiobatch.no_such_name  # noqa: B018


# --- secrets: decode errors, provider state, traceback locals ----------------------------


async def echo_headers(request: Request) -> Response:
    """A misconfigured proxy answering 200 with the request headers as text."""
    text = "\n".join(f"{k}: {v}" for k, v in request.headers.items())
    return Response(200, {"content-type": "text/plain"}, text.encode())


async def echo_in_a_field(request: Request) -> Response:
    """A 200 batch whose created_at echoes the authorization header (wrong type)."""
    body = {**batch_json("validating"), "created_at": request.headers["authorization"]}
    return json_response(200, body)


def traceback_text(exc: BaseException) -> str:
    """The exception as a traceback with every frame's locals, as pytest -l or Sentry show."""
    return "".join(traceback.TracebackException.from_exception(exc, capture_locals=True).format())


@pytest.mark.parametrize("handler", [echo_headers, echo_in_a_field], ids=["text", "field"])
async def test_success_body_echoing_the_key_gives_a_scrubbed_decode_error(
    handler: Handler,
) -> None:
    """A 200 body echoing the key gives a DecodeError without it, its chain or its locals."""
    with pytest.raises(DecodeError) as info:
        await make_client(handler).retrieve_batch("batch_1")
    err = info.value
    assert "***" in str(err)
    for text in (str(err), repr(err), err.detail, traceback_text(err)):
        assert KEY not in text
    assert err.__cause__ is None


async def test_result_line_echoing_the_key_is_scrubbed() -> None:
    """iter_results: a bad line holding the key raises a DecodeError without it."""

    async def handler(request: Request) -> Response:
        return streamed([json.dumps({"custom_id": 7, "note": KEY}).encode() + b"\n"], [])

    client = make_client(handler)
    with pytest.raises(DecodeError, match="line 1 of file file-1") as info:
        async for _ in client.iter_results("file-1"):
            pass
    assert KEY not in traceback_text(info.value)


async def test_key_is_not_in_provider_fields_client_state_or_locals() -> None:
    """attrs.asdict(provider), vars(client) and a 401's traceback locals hold no key."""

    async def unauthorized(request: Request) -> Response:
        return Response(401, {}, b"not json at all")

    client = make_client(unauthorized)
    assert KEY not in repr(attrs.asdict(client.provider))
    assert KEY not in repr(vars(client))
    assert KEY not in repr(client.provider.headers())
    with pytest.raises(AuthenticationError) as info:
        await client.retrieve_batch("batch_1")
    assert KEY not in traceback_text(info.value)
    assert client.provider.headers()["authorization"] == f"Bearer {KEY}"


def test_secret_redacts_text_and_bytes() -> None:
    """Secret.redact masks every occurrence in str and bytes; short values are left alone."""
    secret = Secret(KEY)
    assert secret.redact(f"a {KEY} b {KEY}") == "a *** b ***"
    assert secret.redact(f"x{KEY}".encode()) == b"x***"
    text = "nothing here"
    assert secret.redact(text) is text
    assert Secret("ab").redact("abc ab") == "abc ab"


def test_key_whitespace_is_dropped_and_control_characters_refused() -> None:
    """Whitespace around a key is dropped; a control character inside it is refused unshown."""
    provider = OpenAIProvider(api_key=f"  {KEY}\n", base_url=BASE)
    assert provider.headers()["authorization"] == f"Bearer {KEY}"
    assert OpenAIProvider(api_key=Secret(KEY + "\n")).api_key == Secret(KEY)
    with pytest.raises(ValueError, match="control character") as info:
        OpenAIProvider(api_key=KEY[:5] + "\r\n" + KEY[5:])
    assert KEY[5:] not in str(info.value)


# --- long lines --------------------------------------------------------------------------


async def test_long_line_and_many_short_lines_across_odd_chunks() -> None:
    """A 3 MB line, short lines and CRLFs split at odd (prime) chunk sizes come out whole."""
    lines = [b"a", b"x" * 3_000_000, *[b"line %d" % i for i in range(2000)], b"", b"tail"]
    content = b"\n".join(lines[:-1]) + b"\r\n" + lines[-1]
    expected = [*lines[:-2], b"", b"tail"]
    for size in (1, 7, 65_537):
        if size == 1:
            data = content[:20_000] + b"\n"  # byte by byte: keep it small
            want = data[:-1].split(b"\n")
        else:
            data, want = content, expected
        parts = [data[i : i + size] for i in range(0, len(data), size)]

        async def handler(request: Request, parts: list[bytes] = parts) -> Response:
            return streamed(parts, [])

        got = [line async for line in make_client(handler).iter_file_lines("file-1")]
        assert got == want, size


# --- the create-key lookup on hand-built lists -------------------------------------------


def listing(batches: list[dict[str, Any]], *, date: str | None = None) -> Handler:
    """A GET /batches handler serving ``batches`` (in the given order) 100 per page."""

    async def handler(request: Request) -> Response:
        after = request.params.get("after")
        start = next(i for i, b in enumerate(batches) if b["id"] == after) + 1 if after else 0
        chunk = batches[start : start + int(request.params["limit"])]
        body = {"object": "list", "data": chunk, "has_more": start + len(chunk) < len(batches)}
        return json_response(200, body, {"date": date} if date else None)

    return handler


def keyed_batch(n: int, created_at: int, key: str | None = None) -> dict[str, Any]:
    meta = {"aiobatch_create_key": key} if key else {"n": str(n)}
    return {
        **batch_json("in_progress"),
        "id": f"batch_{n}",
        "created_at": created_at,
        "metadata": meta,
    }


async def test_find_created_batch_outcomes() -> None:
    """find_created_batch: the earliest twin, None when proved absent, else an error."""
    batches = [keyed_batch(n, 10_000 - n) for n in range(350)]
    batches[120] = keyed_batch(120, 10_000 - 120, "k1")
    batches[121] = keyed_batch(121, 10_000 - 121, "k1")
    client = make_client(listing(batches))
    found = await client.find_created_batch("k1")
    assert found is not None
    assert found.id == "batch_121"
    assert await client.find_created_batch("k2") is None  # 4 pages, the whole list
    with pytest.raises(LookupIncompleteError) as info:
        await client.find_created_batch("k2", max_pages=2)
    assert info.value.create_key == "k2"
    assert "no bound" in info.value.reason
    assert await client.find_created_batch("k2", since=10_000 - 150, max_pages=2) is None


async def test_lookup_without_a_date_header_walks_to_the_end() -> None:
    """Without a date header a short list is read to its end; a long one makes the create raise."""
    posts: list[Request] = []
    history = [keyed_batch(n, 10_000 - n) for n in range(150)]
    list_handler = listing(history)

    async def handler(request: Request) -> Response:
        if request.method == "POST":
            posts.append(request)
            if len(posts) == 1:
                raise TransportError("connection reset", method="POST")
            return json_response(
                200, {**batch_json("validating"), "metadata": json.loads(request.body)["metadata"]}
            )  # type: ignore[arg-type]
        return await list_handler(request)

    client = make_client(handler)
    clock = client.clock
    assert isinstance(clock, VirtualClock)
    async with clock.auto_advance():
        batch = await client.create_batch("file-1", "/v1/chat/completions")
        assert batch.metadata is not None
        assert len(posts) == 2
        history.extend(keyed_batch(n, 9_000 - n) for n in range(150, 2500))
        posts.clear()
        with pytest.raises(AmbiguousCreateError, match="no server date"):
            await client.create_batch("file-1", "/v1/chat/completions")
    assert len(posts) == 1
