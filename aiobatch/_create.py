"""Safe creates: one ``create_batch`` call makes at most one batch.

:class:`Creator` holds the create machinery of one :class:`~aiobatch.BatchClient`
and what it has learned about the server. It is given the pieces of the client it
uses (the transport, the retrying fetch, the error and body decoders, ``cancel``,
the retry policy, the clock and the logger), so this module never imports the client.

Create keys
-----------
Creating a batch is never blindly re-sent. Each logical create carries a key in its
metadata (:data:`CREATE_KEY_METADATA`, ``aiobatch_create_key``): the caller's, or a
fresh one when the metadata has room (at most 16 pairs). A create without a key can
never be looked up, so any ambiguous failure of it is raised at once.

Ambiguous failures
------------------
A timeout, a connection lost after sending, a 5xx, or a 2xx whose body cannot be
read: the server may have made the batch. After such a failure the create

1. waits for the server to settle: at least the backoff delay, and at least the
   client's ``create_settle`` seconds after a failure the server may still be working
   on (a timeout, a lost connection, a 502/504), since a server keeps running its
   handler after the client has gone and may commit the batch late. When the retry
   budget leaves no time for another attempt, settling is cut to half the time left
   (the lookup must still fit); in the retry testing mode it is skipped;
2. looks the key up in the batch list, newest first (:meth:`Creator._scan`). The walk
   has three outcomes:

   * *found*: the batch is returned and nothing is sent again;
   * *proved absent*: the walk went down, in non-increasing ``created_at`` order, past a
     lower bound on the batch's possible ``created_at``, or to the end of the list, or
     down to the newest batch an earlier lookup of the same create had already proved
     clear. Only then is the create sent again, with the same key;
   * *unknown* (the page limit was reached, the server does not list newest first, no
     ``date`` header to bound the walk): nothing is sent again and
     :class:`~aiobatch.errors.AmbiguousCreateError` is raised with the key.

Server time
-----------
``created_at`` is stamped by the server's clock, which the client's need not match.
The lower bound is therefore taken in *server time*: each list response's ``date``
header, minus the time the client measured (on its monotonic clock) since the first
attempt was sent, minus a margin (:data:`_LOOKUP_MARGIN`) for the ``date`` header and
``created_at`` coming from hosts whose clocks disagree a little, and for ``created_at``
being truncated to whole seconds. Stopping at the bound also needs the list to be
newest first: that is checked on every batch and must be *shown* (some batch older
than the one before it), never assumed, since a list that is oldest first starts with
old batches too.

Errors
------
Every failure after an ambiguous attempt (the lookup failing, attempts running out)
raises :class:`~aiobatch.errors.AmbiguousCreateError` carrying ``create_key``, chained
to its cause. A create cancelled after an ambiguous attempt logs a WARNING naming the
key before the cancellation goes on.

Late duplicates
---------------
When a create succeeds after an ambiguous attempt, the key is looked up once more: if
the server committed an earlier attempt late, every batch with the key but the
earliest created is cancelled (free while ``validating``) with a WARNING, and the
earliest is returned. :meth:`Creator.find` returns that same earliest batch.

Metadata echo
-------------
A server that does not echo ``metadata`` makes lookups impossible. The first create
that succeeds with a key shows whether the server kept it: when it did not, a WARNING
is logged once and from then on every ambiguous failure raises
:class:`~aiobatch.errors.AmbiguousCreateError` at once instead of looking and
re-sending.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Literal, Protocol, TypeVar

import attrs

from ._clock import Clock
from ._lifecycle import BatchStatus
from ._models import Batch, BatchPage
from ._retry import RetryPolicy, RetryState, is_ambiguous, may_commit_late, parse_http_date
from .errors import (
    AiobatchError,
    AmbiguousCreateError,
    APIStatusError,
    LookupIncompleteError,
    TransportError,
    describe,
)
from .transport._base import Request, Response, Transport

__all__ = [
    "CREATE_KEY_METADATA",
    "LOOKUP_MAX_PAGES",
    "Creator",
    "Fetch",
    "keyed_metadata",
]

T = TypeVar("T")

#: The metadata key that tags each logical create with a client-made key.
CREATE_KEY_METADATA = "aiobatch_create_key"

#: OpenAI's metadata limit: pairs.
_METADATA_MAX_PAIRS = 16

#: The most list pages one key lookup reads, and the batches per page.
LOOKUP_MAX_PAGES = 20
_LOOKUP_PAGE_SIZE = 100
#: Seconds taken off the server-time lower bound of a create's ``created_at``: the
#: ``date`` header and ``created_at`` may come from different hosts, whose clocks may
#: disagree a little (``created_at`` is also truncated to whole seconds).
_LOOKUP_MARGIN = 30.0


def keyed_metadata(metadata: Mapping[str, str] | None) -> tuple[dict[str, str], str | None]:
    """A copy of ``metadata`` with a create key, and the key (None when none fits).

    The caller's key is kept; otherwise a fresh one is added if there is room.
    """
    meta = dict(metadata) if metadata else {}
    key = meta.get(CREATE_KEY_METADATA)
    if key is None and len(meta) < _METADATA_MAX_PAIRS:
        key = meta[CREATE_KEY_METADATA] = uuid.uuid4().hex
    return meta, key


def _carries(batch: Batch, key: str) -> bool:
    return bool(batch.metadata) and batch.metadata.get(CREATE_KEY_METADATA) == key  # type: ignore[union-attr]


def _earliest(batches: Iterable[Batch]) -> Batch:
    """The earliest created batch; on a tie the one listed last (lists are newest first)."""
    return min(reversed(list(batches)), key=lambda b: b.created_at)


class Fetch(Protocol):
    """The client's retrying GET: the decoded body and the response (for its headers)."""

    async def __call__(
        self,
        cls: type[T],
        method: str,
        path: str,
        *,
        params: Mapping[str, str] = ...,
        deadline: float | None = ...,
    ) -> tuple[T, Response]: ...


@attrs.frozen
class _Scan:
    """What one walk of the batch list found."""

    outcome: Literal["found", "absent", "unknown"]
    #: Every batch carrying the key that the walk saw, in list order.
    matches: tuple[Batch, ...]
    #: The first batch of a walk that was newest first (a later walk may stop there).
    newest_id: str | None
    #: How the walk ended.
    reason: str


class _Create:
    """The state of one logical create."""

    __slots__ = ("ambiguous", "cause", "key", "lost", "sent", "state", "stop_at")

    def __init__(self, key: str | None, state: RetryState) -> None:
        self.key = key
        self.state = state
        #: Whether an attempt may have made the batch.
        self.ambiguous = False
        #: The last failure that made the create ambiguous, and what it means.
        self.cause: BaseException | None = None
        self.lost = ""
        #: Attempts sent so far (two or more can make twins).
        self.sent = 0
        #: The newest batch of the last walk that proved the key absent: everything
        #: from there down has been checked, so the next walk may stop there.
        self.stop_at: str | None = None


def _ambiguous(create: _Create, why: str) -> AmbiguousCreateError:
    lost = create.lost or "an attempt's answer was lost"
    if create.key is None:
        advice = (
            "the metadata had no room for an aiobatch_create_key, so it cannot be "
            "looked up: check your batch list before creating again"
        )
    else:
        advice = (
            f"look the key up later with find_created_batch({create.key!r}) before creating again"
        )
    return AmbiguousCreateError(
        f"a create may have made a batch: {lost}, {why}. It was never sent again "
        f"without proof that no batch carried its key; {advice}",
        create_key=create.key,
    )


class Creator:
    """The create machinery of one client, and whether its server echoes metadata.

    Args:
        transport: sends each create attempt (the create runs its own retry loop).
        check_open: raises :class:`~aiobatch.errors.ClosedError` once the client is
            closed; called before every attempt.
        fetch: the client's retrying request for the batch list pages.
        status_error: turns an error response into its :class:`APIStatusError`.
        decode: decodes a success body into a Batch (an echoed API key masked).
        cancel: cancels a batch by id (for late duplicates).
        retry: the retry policy each create follows.
        clock: measures time since the first attempt, and sleeps while settling.
        settle: seconds to wait, after a failure the server may still be working on,
            before looking the key up.
        server: the base URL, for the log.
        logger: where warnings go.
    """

    def __init__(
        self,
        *,
        transport: Transport,
        check_open: Callable[[], None],
        fetch: Fetch,
        status_error: Callable[[Response, Request], Awaitable[APIStatusError]],
        decode: Callable[[bytes, type[Batch]], Batch],
        cancel: Callable[[str], Awaitable[Batch]],
        retry: RetryPolicy,
        clock: Clock,
        settle: float,
        server: str,
        logger: logging.Logger,
    ) -> None:
        self._transport = transport
        self._check_open = check_open
        self._fetch = fetch
        self._status_error = status_error
        self._decode = decode
        self._cancel = cancel
        self._retry = retry
        self._clock = clock
        self._settle = settle
        self._server = server
        self._log = logger
        # Whether the server keeps batch metadata (None: not seen yet). When it does
        # not, a create whose answer is lost can never be looked up.
        self._echoes_metadata: bool | None = None

    async def create(self, request: Request, key: str | None) -> Batch:
        """Run one logical create of ``request`` (a ``POST /batches`` tagged ``key``)."""
        create = _Create(key, RetryState(self._retry, self._clock, request.method, request.url))
        try:
            return await self._create(request, create)
        except AmbiguousCreateError:
            raise
        except Exception as exc:
            if not create.ambiguous:
                raise
            raise _ambiguous(create, f"then {describe(exc)}") from exc
        except asyncio.CancelledError:
            if create.ambiguous:
                self._log.warning(
                    "a create was cancelled after an attempt whose answer was lost; a batch "
                    "may exist: look up create key %s with find_created_batch()",
                    key,
                )
            raise

    async def find(self, create_key: str, *, since: float | None, max_pages: int) -> Batch | None:
        """The earliest batch carrying ``create_key``, None when proved absent; else raise
        :class:`~aiobatch.errors.LookupIncompleteError`."""
        scan = await self._scan(create_key, since=since, max_pages=max_pages)
        if scan.outcome == "unknown":
            raise LookupIncompleteError(
                f"no batch with create key {create_key!r} in the part of the list read, but "
                f"one may exist further down: {scan.reason}",
                create_key=create_key,
                reason=scan.reason,
            )
        return _earliest(scan.matches) if scan.matches else None

    async def _create(self, request: Request, create: _Create) -> Batch:
        """The create loop: send, and after an ambiguous failure settle, look, re-send."""
        state = create.state
        clock = self._clock
        while True:
            self._check_open()
            error: TransportError | None = None
            response: Response | None = None
            create.sent += 1
            try:
                response = await self._transport.send(state.bound(request))
            except TransportError as exc:
                error = exc
            else:
                if response.status < 400:
                    return await self._created(response, create)
            status = response.status if response is not None else None
            decision = state.next_delay(error=error, response=response)
            cause: AiobatchError
            if error is not None:
                cause = error
            else:
                assert response is not None
                cause = await self._status_error(response, request)
            if not is_ambiguous(error, status):
                if decision is not None:
                    await state.wait(*decision)
                    continue
                if create.ambiguous:  # an earlier attempt may still have made it
                    found = await self._look_up(create)
                    if found is not None:
                        return found
                    raise _ambiguous(create, f"then {describe(cause)}") from cause
                raise cause
            create.ambiguous = True
            create.cause = cause
            create.lost = f"an attempt's answer was lost ({describe(cause)})"
            if create.key is None:
                raise _ambiguous(create, "and there is no key to look it up by") from cause
            if self._echoes_metadata is False:
                raise _ambiguous(
                    create,
                    "and this server does not keep batch metadata, so the key cannot be found",
                ) from cause
            late = may_commit_late(error, status) and not state.testing
            settle = self._settle if late else 0.0
            left = state.remaining()
            if decision is not None:
                delay = max(decision[0], settle)
                if left is not None and delay >= left:
                    decision = None  # no time left for another attempt after the wait
                else:
                    await state.wait(delay, decision[1])
            if decision is None:
                if left is not None:
                    if left <= 0:
                        raise _ambiguous(create, "and no time was left to look it up") from cause
                    settle = min(settle, left / 2)
                if settle > 0:
                    await clock.sleep(settle)
            found = await self._look_up(create)
            if found is not None:
                return found
            if decision is None:
                raise _ambiguous(
                    create, "no batch carried its key yet, and no attempt or time was left"
                ) from cause

    async def _created(self, response: Response, create: _Create) -> Batch:
        """A 2xx create: decode it (or, if unreadable, find it); check for a late twin."""
        try:
            batch = self._decode(await response.read(), Batch)
        except Exception as exc:  # any failure: the server said 2xx, so a batch exists
            create.ambiguous = True
            create.cause = exc
            create.lost = (
                f"the server answered {response.status}, so a batch exists, but its body "
                f"could not be read ({describe(exc)})"
            )
            if create.key is None:
                raise _ambiguous(create, "and there is no key to look it up by") from exc
            if self._echoes_metadata is False:
                raise _ambiguous(create, "and this server does not keep batch metadata") from exc
            found = await self._look_up(create)
            if found is None:
                raise _ambiguous(create, "yet no listed batch carries its key") from exc
            return found
        key = create.key
        if key is None:
            return batch
        if not _carries(batch, key):
            self._no_metadata()
            return batch
        self._echoes_metadata = True
        if not create.ambiguous:
            return batch
        # An earlier attempt may have been committed after its lookup: look once more.
        try:
            scan = await self._scan(
                key,
                first_send=create.state.started,
                stop_at=create.stop_at,
                deadline=create.state.deadline,
            )
        except AiobatchError as exc:
            self._log.warning(
                "create key %s: batch %s was made after an attempt whose answer was lost, and "
                "checking for a second batch from that attempt failed (%s); look the key up "
                "with find_created_batch() to be sure",
                key,
                batch.id,
                type(exc).__name__,
            )
            return batch
        if scan.outcome == "unknown":
            self._log.warning(
                "create key %s: batch %s was made after an attempt whose answer was lost, and "
                "the check for a second batch was inconclusive (%s)",
                key,
                batch.id,
                scan.reason,
            )
        return await self._keep_one(key, scan.matches, batch)

    def _no_metadata(self) -> None:
        if self._echoes_metadata is not False:
            self._log.warning(
                "the server at %s did not return the metadata of a created batch, so a "
                "create whose answer is lost cannot be looked up: such a create will raise "
                "AmbiguousCreateError instead of being sent again",
                self._server,
            )
        self._echoes_metadata = False

    async def _look_up(self, create: _Create) -> Batch | None:
        """Look the create's key up: the batch, None when proved absent; else raise."""
        assert create.key is not None
        scan = await self._scan(
            create.key,
            first_send=create.state.started,
            stop_at=create.stop_at,
            deadline=create.state.deadline,
            twins=create.sent > 1,  # one attempt cannot have made two batches
        )
        if scan.outcome == "unknown":
            raise _ambiguous(
                create, f"and the lookup could not prove it absent ({scan.reason})"
            ) from create.cause
        if scan.outcome == "absent":
            create.stop_at = scan.newest_id
            return None
        return await self._keep_one(create.key, scan.matches)

    async def _keep_one(
        self, key: str, matches: Iterable[Batch], made: Batch | None = None
    ) -> Batch:
        """Keep the earliest batch carrying the key; cancel the others (late commits)."""
        batches = list(matches)
        if made is not None and all(b.id != made.id for b in batches):
            batches.append(made)
        if len(batches) == 1:
            return batches[0]
        kept = _earliest(batches)
        extras = [b for b in batches if b.id != kept.id]
        self._log.warning(
            "create key %s: the server made %d batches for one create (it finished an "
            "attempt after the client had given up on it); keeping %s, the earliest, and "
            "cancelling %s",
            key,
            len(batches),
            kept.id,
            ", ".join(b.id for b in extras),
        )
        for extra in extras:
            if extra.is_terminal or extra.status is BatchStatus.CANCELLING:
                continue
            try:
                await self._cancel(extra.id)
            except AiobatchError as exc:
                self._log.warning(
                    "could not cancel batch %s, a second batch for create key %s (%s): "
                    "cancel it by hand",
                    extra.id,
                    key,
                    type(exc).__name__,
                )
        return kept

    async def _scan(
        self,
        key: str,
        *,
        since: float | None = None,
        first_send: float | None = None,
        stop_at: str | None = None,
        deadline: float | None = None,
        max_pages: int = LOOKUP_MAX_PAGES,
        twins: bool = True,
    ) -> _Scan:
        """Walk the batch list newest first, collecting the batches that carry ``key``.

        The walk stops (and can prove the key absent) at the end of the list, at
        ``stop_at`` (a batch an earlier walk started from, everything below it checked)
        or at the end of a page holding a batch older than a lower bound on the key's
        ``created_at``: ``since``, or the server's ``date`` minus the time since
        ``first_send`` (``clock.monotonic()`` before the first create was sent) minus a
        margin. Stopping early needs the list to be newest first, which is checked on
        every batch and must be shown (some batch older than the one before it), not
        assumed: a list that is oldest first starts with old batches too. With
        ``twins`` a match does not end the walk: other batches carrying the key are
        looked for down to the same stopping points.
        """
        clock = self._clock
        matches: list[Batch] = []
        newest_id: str | None = None
        newest_first = True  # no batch so far was newer than the one before it
        descended = False  # and at least one was older: the order is shown, not assumed
        previous: int | None = None
        bound = since
        after: str | None = None

        def done(reason: str, *, ordered: bool | None = None) -> _Scan:
            if ordered is None:
                ordered = newest_first and descended
            return _Scan(
                "found" if matches else "absent",
                tuple(matches),
                newest_id if ordered else None,
                reason,
            )

        for _ in range(max_pages):
            params = {"limit": str(_LOOKUP_PAGE_SIZE)}
            if after is not None:
                params["after"] = after
            page, response = await self._fetch(
                BatchPage, "GET", "/batches", params=params, deadline=deadline
            )
            if first_send is not None:
                server_now = parse_http_date(response.headers.get("date"))
                if server_now is not None:
                    elapsed = clock.monotonic() - first_send
                    floor = server_now - elapsed - _LOOKUP_MARGIN
                    bound = floor if bound is None else max(bound, floor)
            passed = False
            for batch in page.data:
                if newest_id is None:
                    newest_id = batch.id
                if previous is not None:
                    if batch.created_at > previous:
                        newest_first = False
                    elif batch.created_at < previous:
                        descended = True
                previous = batch.created_at
                if newest_first and batch.id == stop_at:
                    # The order below was shown by the walk that set stop_at.
                    return done("reached the batches an earlier lookup checked", ordered=True)
                if _carries(batch, key):
                    matches.append(batch)
                    if not twins:
                        return done("found")
                if bound is not None and batch.created_at < bound:
                    passed = True
            if not page.data:
                if page.has_more:
                    return _Scan("unknown", tuple(matches), None, "an empty page claims more")
                return done("read the whole list")
            if not page.has_more:
                return done("read the whole list")
            # Past the bound, with the whole page (and all before) in newest-first order:
            # every batch further down is older still.
            if passed and newest_first and descended:
                return done("passed the earliest time the batch can have been made")
            if matches and bound is None and stop_at is None:
                return done("found, with no bound to look further for twins")
            after = page.data[-1].id
        if matches:
            return done(f"found within the {max_pages}-page limit")
        if not newest_first:
            reason = "the server does not list batches newest first"
        elif bound is None:
            reason = (
                f"read {max_pages} pages; with no server date there is no bound on the "
                "batch's creation time"
            )
        else:
            reason = f"read {max_pages} pages without passing the batch's earliest creation time"
        return _Scan("unknown", (), None, reason)
