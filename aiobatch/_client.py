"""BatchClient: typed calls for the Files and Batch APIs.

The client builds requests (the provider says where and with which headers), sends them
through the retry policy and the transport, and turns answers into models with the
converter; error statuses become the :mod:`aiobatch.errors` tree. It parses and builds
no wire format itself: every body goes through :mod:`aiobatch._convert`.

This module holds the client itself (its options, closing, ``with_options``) and the
Batch API calls, waiting for a batch included; the Files API calls are in
:mod:`aiobatch._client_files` and the plumbing under every call (requests, sends, error
mapping, decoding, redaction) in :mod:`aiobatch._client_core`.

Safe creates
------------
``create_batch`` never blindly re-sends a create: after a failure that may have made
the batch it settles, looks the create's key up, and sends again only when the lookup
proved no batch carries it. The machinery, and its theory of operation, live in
:mod:`aiobatch._create`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from typing import Any

from ._client_core import quote_id, response_lines
from ._client_files import FileCalls
from ._clock import Clock, SystemClock
from ._convert import (
    decode_batch_output_line,
    decode_json,
    encode_create_batch,
    encode_inline_create,
    encode_online_body,
)
from ._create import LOOKUP_MAX_PAGES, Creator, keyed_metadata
from ._lifecycle import BatchLifecycle, BatchStatus, parse_status_aliases
from ._models import (
    Batch,
    BatchErrors,
    BatchPage,
    BatchRequest,
    LineResponse,
    ResultLine,
    alias_status,
)
from ._provider import OpenAIProvider, Provider, Secret, provider_from_env, require_key
from ._retry import RetryPolicy, is_transient, poll_intervals
from .errors import (
    APIStatusError,
    NoOutputError,
    NotFoundError,
    TransportError,
    UnsupportedError,
    WaitTimeoutError,
    describe,
)
from .transport._base import Transport

__all__ = ["DEFAULT_CREATE_SETTLE", "BatchClient"]

logger = logging.getLogger("aiobatch")

#: Seconds to wait, after a create the server may still be working on, before looking
#: its key up (see :class:`BatchClient`).
DEFAULT_CREATE_SETTLE = 10.0

#: How much of a wait's timeout is kept for its last poll (at most _FINAL_POLL_MAX s).
_FINAL_POLL_SHARE = 0.1
_FINAL_POLL_MAX = 10.0


class _Keep:
    """The type of :data:`_KEEP`: "leave this option as it is"."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<keep>"


_KEEP = _Keep()


class BatchClient(FileCalls):
    """An async client for the Files and Batch APIs of one provider.

    Use it as an async context manager (or call :meth:`aclose`)::

        async with BatchClient(api_key=...) as client:
            f = await client.upload_file("requests.jsonl")
            batch = await client.create_batch(f.id, "/v1/chat/completions")
            batch = await client.wait(batch.id)

    Args:
        api_key: the API key; default ``$OPENAI_API_KEY``. Never shown in any repr,
            log or error. OpenAI's own API without one is refused
            (:class:`~aiobatch.errors.ConfigurationError`); a server of one's own, at
            another ``base_url``, may take none.
        base_url: the API root; default ``$OPENAI_BASE_URL`` or OpenAI's.
        organization: the ``OpenAI-Organization`` header.
        project: the ``OpenAI-Project`` header.
        provider: where requests go: a provider object (:class:`~aiobatch.OpenAIProvider`,
            :class:`~aiobatch.PortkeyProvider`, :class:`~aiobatch.AzureOpenAIProvider`,
            :class:`~aiobatch.CompatibleProvider` or your own
            :class:`~aiobatch.Provider`), or a name (``"openai"``, ``"portkey"``,
            ``"azure"``, ``"compatible"``) filled from the environment by
            :func:`~aiobatch.provider_from_env`, with the four arguments above where
            they apply. None is ``"openai"``.
        transport: how requests travel; default a new
            :class:`~aiobatch.transport.AiohttpTransport`, closed with the client.
            A transport passed in stays open (it may be shared).
        retry: the retry policy; default :class:`~aiobatch.RetryPolicy()`. Its
            ``timeout`` bounds each logical call, attempts and waits included: every
            attempt's timeout is cut to what is left of it.
        clock: the time source for retries, waits and deadlines.
        timeout: seconds per control request (create, retrieve, list...; for a streamed
            download, per wait for data); uploads use the transport's default. None
            leaves every request to the transport's default.
        create_settle: seconds to wait, after a create that timed out or lost its
            connection (the server may still be working on it), before looking its key
            up; see :meth:`create_batch`. Zero in the retry testing mode, like every
            retry wait (test late commits with a policy that is not in testing mode).
    """

    def __init__(
        self,
        *,
        api_key: str | Secret | None = None,
        base_url: str | None = None,
        organization: str | None = None,
        project: str | None = None,
        provider: Provider | str | None = None,
        transport: Transport | None = None,
        retry: RetryPolicy | None = None,
        clock: Clock | None = None,
        timeout: float | None = 120.0,
        create_settle: float = DEFAULT_CREATE_SETTLE,
    ) -> None:
        if provider is None:
            provider = OpenAIProvider.from_env(
                api_key=api_key, base_url=base_url, organization=organization, project=project
            )
        elif isinstance(provider, str):
            provider = provider_from_env(
                provider,
                api_key=api_key,
                base_url=base_url,
                organization=organization,
                project=project,
            )
        elif api_key is not None or base_url is not None or organization or project:
            raise TypeError("pass either provider or api_key/base_url/organization/project")
        elif not isinstance(provider, Provider):
            raise TypeError(
                f"provider must be a provider object or a name, not {type(provider).__name__}"
            )
        if not create_settle >= 0:
            raise ValueError(f"create_settle must be >= 0, got {create_settle!r}")
        require_key(provider)
        self._owns_transport = transport is None
        if transport is None:
            from .transport._aiohttp import AiohttpTransport

            transport = AiohttpTransport()
        super().__init__(
            provider,
            transport,
            retry if retry is not None else RetryPolicy(),
            clock if clock is not None else SystemClock(),
            timeout,
        )
        self._create_settle = float(create_settle)
        self._creates = Creator(
            transport=transport,
            check_open=self._check_open,
            fetch=self._fetch,
            status_error=self._status_error,
            decode=self._decode,
            cancel=self.cancel_batch,
            retry=self._retry,
            clock=self._clock,
            settle=float(create_settle),
            server=provider.base_url,
            logger=logger,
        )

    # --- the client --------------------------------------------------------------------------

    @property
    def provider(self) -> Provider:
        """The provider requests go to."""
        return self._provider

    @property
    def retry_policy(self) -> RetryPolicy:
        """The retry policy in force."""
        return self._retry

    @property
    def clock(self) -> Clock:
        """The client's clock."""
        return self._clock

    @property
    def create_settle(self) -> float:
        """Seconds a create that may still be on its way is given to land before a
        lookup of its key is trusted."""
        return self._create_settle

    async def aclose(self) -> None:
        """Close the client, and the transport if the client created it. Safe to call twice.

        Every later call raises :class:`~aiobatch.errors.ClosedError` without sending.
        """
        self._closed = True
        if self._owns_transport:
            await self._transport.aclose()

    async def __aenter__(self) -> BatchClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"BatchClient(base_url={self._provider.base_url!r}, transport={self._transport!r})"

    def with_options(
        self,
        *,
        retry: RetryPolicy | None = None,
        timeout: float | _Keep | None = _KEEP,
        wrap_transport: Callable[[Transport], Transport] | None = None,
    ) -> BatchClient:
        """A client for the same provider, over the same transport and clock, with other
        options (like the official SDK's ``with_options``).

        The new client shares this one's transport and never closes it; closing this
        client closes it too (its calls then raise
        :class:`~aiobatch.errors.ClosedError`). The fleet uses it to make single
        attempts under its own request budget.

        Args:
            retry: the retry policy of the new client (default: this one's).
            timeout: seconds per control request (default: this one's).
            wrap_transport: the new client sends through ``wrap_transport(transport)``
                instead of this one's transport (a wrapper that adds a check or a wait
                before each request); the wrapper is not closed by either client.
        """
        transport = self._transport
        child = BatchClient(
            provider=self._provider,
            transport=wrap_transport(transport) if wrap_transport is not None else transport,
            retry=retry if retry is not None else self._retry,
            clock=self._clock,
            timeout=self._timeout if isinstance(timeout, _Keep) else timeout,
            create_settle=self._create_settle,
        )
        child._parent = self
        return child

    # --- batches ---------------------------------------------------------------------------

    async def iter_batch_output(self, batch: str | Batch) -> AsyncGenerator[ResultLine, None]:
        """A finished batch's output lines, streamed in one call (Portkey's
        ``GET /batches/{id}/output``), in constant memory; blank lines skipped.

        It saves the retrieve that finding ``output_file_id`` takes elsewhere. The
        output file holds the successful requests only: read the error file
        (``error_file_id``) with :meth:`iter_results` for the rest. A finished batch
        without a successful request has no output file: it yields nothing (the
        gateway answers 404 for it, and a retrieve then tells it from an unfinished
        batch; some servers answer an empty ``{}``).

        Raises:
            UnsupportedError: the provider has no such endpoint (only Portkey does; see
                :attr:`Quirks.batch_output_endpoint <aiobatch.Quirks.batch_output_endpoint>`);
                nothing is sent. Elsewhere, read ``output_file_id`` with
                :meth:`iter_results`.
            NotFoundError: no such batch, or it has not finished yet.
            NoOutputError: the batch has no output file and the gateway answered with
                the batch's errors instead (it failed validation); ``errors`` holds them.
            DecodeError: a line does not decode; the message names the line.
        """
        batch_id = batch.id if isinstance(batch, Batch) else batch
        if not self._provider.quirks.batch_output_endpoint:
            raise UnsupportedError(
                f"the {self._provider.name} provider has no /batches/{{id}}/output endpoint "
                "(Portkey's); read the batch's output_file_id with iter_results()"
            )
        request = self._request(
            "GET", f"/batches/{quote_id(batch_id)}/output", timeout=self._timeout
        )
        missing: NotFoundError | None = None
        try:
            response = await self._send(request, stream=True)
        except NotFoundError as exc:
            missing = exc
        if missing is not None:
            # The gateway asks the provider for the content of the batch's output file:
            # a batch without one (no request succeeded) is a 404 too.
            known = batch if isinstance(batch, Batch) and batch.is_terminal else None
            if known is None:
                known = await self.retrieve_batch(batch_id)
            if known.is_terminal and known.output_file_id is None:
                return
            raise missing
        decoded = self._decoded_lines(
            response_lines(response), decode_batch_output_line, f"the output of batch {batch_id}"
        )
        async with contextlib.aclosing(decoded) as results:
            async for result in results:
                if isinstance(result, BatchErrors):
                    if not result.data:
                        return  # no errors and no output: no request succeeded
                    first = result.data[0].message if result.data else None
                    raise NoOutputError(
                        f"batch {batch_id} has no output file; the gateway sent its errors"
                        + (f": {first}" if first else ""),
                        batch_id=batch_id,
                        errors=result,
                    )
                yield result

    async def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        *,
        completion_window: str = "24h",
        metadata: Mapping[str, str] | None = None,
        output_expires_after_seconds: int | None = None,
    ) -> Batch:
        """Create a batch (``POST /batches``); one call makes at most one batch.

        The call adds ``aiobatch_create_key`` to the metadata (or uses the one the
        caller put there). After a failure that may have created the batch it waits for
        the server to settle and looks the key up (see the module notes); it sends
        again only when the lookup *proved* that no batch carries the key, and raises
        :class:`~aiobatch.errors.AmbiguousCreateError` when it could not tell. When the
        metadata already has 16 pairs no key fits: then an ambiguous failure is raised
        at once, never re-sent.

        A caller-supplied key is looked up only after an ambiguous failure *within this
        call*: calling ``create_batch`` twice with the same key makes two batches. To
        resume after a crash (the key recorded in a journal before the call), call
        :meth:`find_created_batch` with the key first, and create only when it returns
        None.

        Args:
            input_file_id: the uploaded input file (purpose ``batch``).
            endpoint: the endpoint of every line, e.g. ``/v1/chat/completions``.
            completion_window: ``24h``.
            metadata: up to 16 string pairs.
            output_expires_after_seconds: expire the output files this long after
                their creation (3600 to 2592000).

        Raises:
            APIStatusError: the server refused (after the retries the policy allows),
                and no attempt may have made a batch.
            TransportError: the network failed before any attempt could reach the server.
            AmbiguousCreateError: an attempt may have made a batch, and it could not be
                found nor proved absent; ``create_key`` says what to look up later.
            ClosedError: the client is closed.
        """
        meta, key = keyed_metadata(metadata)
        body = encode_create_batch(
            input_file_id,
            endpoint,
            completion_window=completion_window,
            metadata=meta or None,
            output_expires_after_seconds=output_expires_after_seconds,
        )
        request = self._request("POST", "/batches", body=body, timeout=self._timeout)
        self._check_open()
        return await self._creates.create(request, key)

    async def create_inline_batch(self, requests: Iterable[BatchRequest]) -> Batch:
        """Create a batch with its requests in the call itself (Anthropic's
        ``POST /v1/messages/batches``, :attr:`Quirks.submission
        <aiobatch.Quirks.submission>` ``"inline"``); one call makes at most one batch.

        Such a batch carries no metadata, so a create whose answer was lost cannot be
        looked up by a key: it is never sent again, and
        :class:`~aiobatch.errors.AmbiguousCreateError` is raised at once (the run layer
        then looks for it by its request count and creation time).

        Args:
            requests: the requests (each line's ``body`` is a Messages API body).

        Raises:
            APIStatusError: the server refused, and no attempt may have made a batch.
            AmbiguousCreateError: an attempt may have made a batch.
        """
        body = encode_inline_create(requests)
        request = self._request("POST", "/batches", body=body, timeout=self._timeout)
        self._check_open()
        return await self._creates.create(request, None)

    async def find_created_batch(
        self, create_key: str, *, since: float | None = None, max_pages: int = LOOKUP_MAX_PAGES
    ) -> Batch | None:
        """Find the batch a create tagged with ``create_key`` made, if any.

        Reads the batch list newest first, ``max_pages`` pages at most. Use it to
        resume after a crash, or after an :class:`~aiobatch.errors.AmbiguousCreateError`.
        When more than one batch carries the key (a server finished an attempt after the
        client gave up on it), the earliest created is returned: the one
        :meth:`create_batch` keeps.

        Args:
            create_key: the ``aiobatch_create_key`` metadata value.
            since: Unix time, on the server's clock, before which the batch cannot have
                been created (e.g. when the key was journaled, less a few minutes for
                clock skew): the walk can stop there. None walks to the end of the list.
            max_pages: the most pages to read (100 batches each).

        Returns:
            The batch, or None when the walk proved that no batch carries the key.

        Raises:
            LookupIncompleteError: the walk could not prove the key absent (the page
                limit came first, or the server does not list newest first).
        """
        return await self._creates.find(create_key, since=since, max_pages=max_pages)

    async def send_online(
        self, url: str, body: Mapping[str, Any], *, deadline: float | None = None
    ) -> LineResponse:
        """Send one request to the ordinary (online) endpoint a batch line would call, at
        full price, retried like every call.

        Args:
            url: the endpoint as a batch line names it (``/v1/chat/completions``).
            body: the request body.
            deadline: give up retrying at this monotonic time (None: the policy's own).

        Returns:
            Its status code, decoded body and request id.

        Raises:
            APIStatusError: the server answered with an error (after the retries).
            TransportError: the request could not be sent.
        """
        path = url[len("/v1") :] if url.startswith("/v1/") else url
        request = self._request("POST", path, body=encode_online_body(body), timeout=self._timeout)
        response = await self._send(request, deadline=deadline)
        raw = await response.read()
        return LineResponse(
            status_code=response.status,
            body=decode_json(raw, what=f"the answer of {url}") if raw else None,
            request_id=response.headers.get("x-request-id"),
        )

    async def retrieve_batch(self, batch_id: str) -> Batch:
        """Get a batch (``GET /batches/{id}``)."""
        return await self._call(Batch, "GET", f"/batches/{quote_id(batch_id)}")

    async def cancel_batch(self, batch_id: str) -> Batch:
        """Ask the server to cancel a batch (``POST /batches/{id}/cancel``).

        Returns:
            The batch, normally ``cancelling``; it reaches ``cancelled`` later.
        """
        return await self._call(Batch, "POST", f"/batches/{quote_id(batch_id)}/cancel")

    async def list_batches_page(self, *, after: str | None = None, limit: int = 100) -> BatchPage:
        """One page of ``GET /batches``, newest first.

        Args:
            after: the id of the last batch of the previous page.
            limit: batches per page (1 to 100).
        """
        params = {"limit": str(limit)}
        if after is not None:
            params[self._provider.quirks.list_cursor_param] = after
        return await self._call(BatchPage, "GET", "/batches", params=params)

    async def list_batches(
        self, *, after: str | None = None, page_size: int = 100
    ) -> AsyncGenerator[Batch, None]:
        """Every batch, over all pages (next page ``after`` the last item's id).

        Args:
            after: start after this batch id.
            page_size: batches per request (1 to 100).
        """
        cursor = after
        while True:
            page = await self.list_batches_page(after=cursor, limit=page_size)
            for item in page.data:
                yield item
            if not page.has_more or not page.data:
                return
            cursor = page.data[-1].id

    async def wait(
        self,
        batch: str | Batch,
        *,
        poll_interval: float = 5.0,
        max_interval: float = 60.0,
        timeout: float | None = None,
        jitter: float = 0.1,
        status_aliases: Mapping[str, BatchStatus | str] | None = None,
    ) -> Batch:
        """Poll a batch until it reaches a terminal status, and return it.

        Intervals start at ``poll_interval`` and grow by half each poll up to
        ``max_interval``, on the client's clock; each is shortened by up to ``jitter``
        (a random share) so that waits started together do not poll in step. Every
        observation is checked by a :class:`~aiobatch.BatchLifecycle`. A failed, expired
        or cancelled batch is returned, not raised: inspect ``batch.status``.

        ``timeout`` is a deadline: each poll (its retries included) is cut to the time
        left, and the last poll starts early enough to finish by it.

        Args:
            batch: the batch id, or a Batch just returned by the server (such as the
                answer to :meth:`create_batch`), which then counts as the first poll.
            poll_interval: seconds before the second poll.
            max_interval: the longest pause between polls.
            timeout: seconds to wait in all; None waits as long as it takes.
            jitter: the largest share of an interval taken off at random (0 to 1; 0
                for an exact schedule).
            status_aliases: status strings aiobatch does not know, each mapped to the
                status it stands for (``{"succeeded": "completed"}``); the batch
                returned has the mapped ``status`` and the server's string in
                ``raw_status``.

        Raises:
            WaitTimeoutError: the deadline passed first (after one last poll).
            UnexpectedTransitionError: the server reported an impossible move.
            UnknownStatusError: the server reported a status aiobatch does not know and
                ``status_aliases`` does not map (the error names the batch, the
                server's string and how to map it).
            ValueError: a ``status_aliases`` target is not an aiobatch status.
        """
        aliases = parse_status_aliases(status_aliases or {})
        clock = self._clock
        deadline: float | None = None
        reserve = 0.0
        if timeout is not None:
            deadline = clock.monotonic() + timeout
            reserve = min(timeout * _FINAL_POLL_SHARE, _FINAL_POLL_MAX)
            if self._timeout is not None:
                reserve = min(reserve, self._timeout)
        intervals = poll_intervals(poll_interval, max_interval, jitter=jitter)
        if isinstance(batch, str):
            batch_id = batch
            batch = await self._poll(batch_id, deadline, None)
        else:
            batch_id = batch.id
        batch = alias_status(batch, aliases)
        lifecycle = BatchLifecycle(batch_id=batch_id)
        lifecycle.observe(batch.lifecycle_status)  # every status is reachable from the first
        final = False
        while not batch.is_terminal:
            delay = intervals()
            if deadline is not None:
                room = deadline - clock.monotonic()
                if final or room <= 0:
                    raise self._wait_timeout(batch, timeout)
                if delay >= room - reserve:
                    delay = max(room - reserve, 0.0)
                    final = True
            await clock.sleep(delay)
            batch = alias_status(await self._poll(batch_id, deadline, batch), aliases)
            lifecycle.observe(batch.lifecycle_status)
        return batch

    @staticmethod
    def _wait_timeout(batch: Batch, timeout: float | None) -> WaitTimeoutError:
        return WaitTimeoutError(
            f"batch {batch.id} still {batch.wire_status!r} after {timeout:g}s",
            batch_id=batch.id,
            last_status=batch.wire_status,
        )

    async def _poll(self, batch_id: str, deadline: float | None, last: Batch | None) -> Batch:
        """Retrieve a batch within the wait's deadline; a retryable failure cut short by
        the deadline is the wait's timeout."""
        path = f"/batches/{quote_id(batch_id)}"
        try:
            return await self._call(Batch, "GET", path, deadline=deadline)
        except (TransportError, APIStatusError) as exc:
            if deadline is None or self._clock.monotonic() < deadline or not is_transient(exc):
                raise
            status = last.wire_status if last is not None else "unknown"
            raise WaitTimeoutError(
                f"batch {batch_id} still {status!r} at the deadline; the last poll failed: "
                f"{describe(exc)}",
                batch_id=batch_id,
                last_status=status,
            ) from exc
