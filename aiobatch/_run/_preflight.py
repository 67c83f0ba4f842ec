"""Checks of batch input lines, run before anything is uploaded.

A server checks a batch's input file only after the upload, while the batch is
``validating``, and then fails the whole batch for one bad line. :class:`Preflight`
runs the same checks locally, line by line and in constant memory per line, and keeps
going to the end of the source so that the caller sees every problem at once. To find
duplicates it remembers the ``custom_id`` of every line; a run instead asks its journal,
which holds the accepted requests, in batches (:meth:`Preflight.inspect_line`,
:meth:`Preflight.resolve`), so that it remembers only the ids of rejected lines and the
ids it generated. Each accepted line
comes out as a :class:`PreparedRequest`: the exact bytes to upload, the fields the
sharder groups by (``url``, ``body.model``) and an estimate of its prompt tokens.

What is checked, one :class:`LineProblem` per violation:

* the line is UTF-8 (``invalid_utf8``) and JSON (``invalid_json``; ``NaN`` and
  ``Infinity`` are not JSON) and an object (``not_an_object``);
* its fields ``custom_id``, ``method``, ``url`` and ``body``, each as
  :func:`~aiobatch._run._line_checks.check_fields` says (:mod:`aiobatch._run._line_checks`
  holds the checks of one line that need nothing but the line);
* its ``custom_id`` is used by no other line of the source (``duplicate_custom_id``,
  naming the first line; a line rejected for another reason still holds its id, since
  every id must end with exactly one result); when it is absent or null one is made
  from the request's content (see
  :func:`~aiobatch._run._line_checks.generated_custom_id`), and the n-th identical
  request's id ends in ``-n``;
* the line, as uploaded and with its newline, fits ``max_line_bytes``
  (``line_too_large``): a longer line could never be part of a batch.

Lines of different ``url`` or ``model`` are not a problem here: the sharder puts them
in different batches. No IO: the caller reads the source and feeds the lines in.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from ..errors import PreflightError
from ._line_checks import (
    _ABSENT,
    _cut,
    _encode,
    _json_type,
    _needs_encoding,
    _Problem,
    _read_json,
    _strip_line_end,
    _UnencodableError,
    _without_id,
    check_fields,
    count_inputs,
    estimate_tokens,
    generated_custom_id,
    text_problem,
)
from ._records import PreparedRequest, RequestRow

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "ITERABLE_SOURCE",
    "Inspected",
    "LineProblem",
    "PreparedRequest",
    "Preflight",
]

#: The largest batch input file (200 MB): no single line can be longer.
DEFAULT_MAX_LINE_BYTES = 200 * 1024 * 1024

#: The ``source`` of problems found in an iterable of requests (not a file).
ITERABLE_SOURCE = "<requests>"

#: How many problems the message of a :class:`~aiobatch.errors.PreflightError` lists.
_LISTED_PROBLEMS = 10

_BOM = b"\xef\xbb\xbf"


#: How many good urls a :class:`Preflight` remembers (see ``Preflight._known_url``).
_KNOWN_URLS = 64


@attrs.frozen(slots=True)
class LineProblem:
    """One thing wrong with one input line.

    Attributes:
        source: the file path as given, or ``"<requests>"`` for an iterable source.
        line: the 1-based line number (or item index); 0 for a problem of the whole
            source (``empty_input``).
        custom_id: the line's ``custom_id``, when it had a usable one.
        field: the dotted path of the offending field (``"custom_id"``, ``"method"``,
            ``"url"``, ``"body"``, ``"body.model"``, ``"body.stream"``), or None when the
            whole line is at fault.
        code: what kind of problem: ``invalid_utf8``, ``invalid_json``,
            ``not_an_object``, ``missing_field``, ``invalid_type``, ``invalid_value``,
            ``duplicate_custom_id``, ``stream_not_supported``, ``line_too_large``, or
            ``empty_input`` (an input file that holds no request at all).
        message: what was wrong, for a human.
    """

    source: str
    line: int
    custom_id: str | None
    field: str | None
    code: str
    message: str

    def __str__(self) -> str:
        """``source:line: custom_id 'id': field: message``, leaving out what is unknown."""
        parts = [f"{self.source}:{self.line}"]
        if self.custom_id is not None:
            parts.append(f"custom_id {_cut(self.custom_id)!r}")
        if self.field is not None:
            parts.append(self.field)
        parts.append(self.message)
        return ": ".join(parts)


#: Where a :class:`Preflight` is (see :meth:`Preflight.mark`).
_Mark = tuple[int, int, int, int, int, int]


@attrs.define(slots=True)
class Inspected:
    """A line checked but for duplicates (see :meth:`Preflight.resolve`).

    Attributes:
        line: its 1-based line number (or item index).
        problems: what is wrong with it, duplicates aside.
        claim: the ``custom_id`` it takes (its own, or generated), when it has one.
        generated: ``claim`` was generated (the line had no id).
        unit: ``line`` or ``item``, for messages.
        oversize: its problem when it is too long (reported only if it has no other).
        ready: the line has no problem but perhaps a duplicate id; then the fields
            below are its request's (see :class:`PreparedRequest`).
    """

    line: int
    problems: list[_Problem]
    claim: str | None = None
    generated: bool = False
    unit: str = "line"
    oversize: _Problem | None = None
    ready: bool = False
    url: str = ""
    model: str | None = None
    data: bytes = b""
    size: int = 0
    tokens: int = 0
    inputs: int = 1


class Preflight:
    """Checks the lines of one source, in order, before anything is uploaded.

    Feed every line with :meth:`check_line` (a file) or every item with
    :meth:`check_item` (an iterable of requests), then call :meth:`finish`, which
    raises when there were problems (unless ``skip_invalid``). Each accepted line comes
    back as a :class:`PreparedRequest`; each bad one comes back as None and its problems
    are recorded in :attr:`problems`.

    Args:
        source: the file path as given, or ``"<requests>"`` for an iterable source;
            it names the source in problems.
        max_line_bytes: the longest line (with its newline) that can be uploaded: the
            largest batch input file.
        skip_invalid: do not raise in :meth:`finish`; bad lines are still recorded, so
            the caller can report them.
        token_estimator: estimates a request's prompt tokens from its body;
            :func:`~aiobatch._run._line_checks.estimate_tokens` by default. It must
            return an int >= 0.
        max_kept_problems: how many problems to keep (all are counted).
        custom_id_pattern: a regular expression every ``custom_id`` must match in full
            (the provider's rule, :attr:`Limits.custom_id_pattern
            <aiobatch.Limits.custom_id_pattern>`; ``invalid_value`` naming the line);
            None takes any non-empty string.
        remember_ids: remember the id of every accepted line (to find duplicates);
            False when the caller looks them up elsewhere (see :meth:`resolve`).
    """

    def __init__(
        self,
        *,
        source: str = ITERABLE_SOURCE,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        skip_invalid: bool = False,
        token_estimator: Callable[[Mapping[str, Any]], int] | None = None,
        max_kept_problems: int = 1000,
        custom_id_pattern: str | None = None,
        remember_ids: bool = True,
    ) -> None:
        if not (isinstance(max_line_bytes, int) and max_line_bytes >= 1):
            raise ValueError(f"max_line_bytes must be an int >= 1, got {max_line_bytes!r}")
        if not (isinstance(max_kept_problems, int) and max_kept_problems >= 0):
            raise ValueError(f"max_kept_problems must be an int >= 0, got {max_kept_problems!r}")
        self._source = source
        self._max_line_bytes = max_line_bytes
        self._skip_invalid = skip_invalid
        self._estimate = estimate_tokens if token_estimator is None else token_estimator
        self._max_kept = max_kept_problems
        self._id_pattern = re.compile(custom_id_pattern) if custom_id_pattern else None
        self._problems: list[LineProblem] = []
        self._problem_count = 0
        self._rejected = 0
        self._accepted = 0
        #: custom_id -> the line that used it, of every accepted line (None: the caller
        #: looks them up, see :meth:`resolve`) ...
        self._first_line: dict[str, int] | None = {} if remember_ids else None
        #: ... and of every rejected line that claimed one.
        self._rejected_ids: dict[str, int] = {}
        #: generated id -> how many requests produced it so far.
        self._generated: dict[str, int] = {}
        #: good url -> whether it is an embeddings endpoint.
        self._urls: dict[str, bool] = {}

    @property
    def source(self) -> str:
        """The source named in problems."""
        return self._source

    @property
    def problems(self) -> tuple[LineProblem, ...]:
        """The first ``max_kept_problems`` problems, in source order."""
        return tuple(self._problems)

    @property
    def problem_count(self) -> int:
        """How many problems were found in all."""
        return self._problem_count

    @property
    def accepted(self) -> int:
        """How many lines were accepted."""
        return self._accepted

    @property
    def rejected(self) -> int:
        """How many lines had at least one problem."""
        return self._rejected

    def check_line(self, raw: bytes, line: int) -> PreparedRequest | None:
        """Check one line of a JSONL file.

        A trailing ``\\r`` (a CRLF file) is stripped, and so is a UTF-8 byte-order mark
        on line 1. Blank lines are skipped: None, and no problem.

        Args:
            raw: the line's bytes, without its line end.
            line: its 1-based line number.

        Returns:
            The prepared request, or None when the line is blank or bad (its problems
            are recorded).
        """
        return self._at_once(self.inspect_line(raw, line))

    def inspect_line(self, raw: bytes, line: int) -> Inspected | None:
        """:meth:`check_line` but for duplicates: what the line is, for :meth:`resolve`
        (None when it is blank). Lines are inspected and resolved in source order."""
        if raw.endswith((b"\n", b"\r")):
            raw = _strip_line_end(raw)
        if line == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        if not raw or raw.isspace():  # blank (ASCII whitespace, what bytes.strip drops)
            return None
        return self._inspect(raw, line, unit="line", encoded=False)

    def _at_once(self, item: Inspected | None) -> PreparedRequest | None:
        if item is None:
            return None
        (prepared,) = self.resolve([item], {})
        return prepared

    def check_item(
        self, item: Mapping[str, Any] | str | bytes, index: int
    ) -> PreparedRequest | None:
        """Check one item of an iterable source.

        A mapping is a request object; it is always uploaded re-encoded as compact JSON.
        A string or bytes is one JSON line, checked as :meth:`check_line` checks it
        (blank ones are skipped). Anything else is a ``not_an_object`` problem.

        Args:
            item: the request.
            index: its 1-based position in the source.

        Returns:
            The prepared request, or None when the item is blank or bad (its problems
            are recorded).
        """
        return self._at_once(self.inspect_item(item, index))

    def inspect_item(self, item: Mapping[str, Any] | str | bytes, index: int) -> Inspected | None:
        """:meth:`check_item` but for duplicates (see :meth:`inspect_line`). A
        :class:`PreparedRequest` (a line this class checked before) is taken as it is."""
        if isinstance(item, PreparedRequest):
            return Inspected(
                index,
                [],
                claim=item.custom_id,
                generated=item.generated_id,
                unit="item",
                ready=True,
                url=item.url,
                model=item.model,
                data=item.data,
                size=item.size,
                tokens=item.tokens,
                inputs=item.inputs,
            )
        if isinstance(item, Mapping):
            try:
                raw = _encode(item)
            except _UnencodableError as exc:
                message = f"the request cannot be encoded: {exc}"
                return Inspected(index, [(None, None, "invalid_json", message)])
            return self._inspect(raw, index, unit="item", encoded=True)
        value: object = item  # callers without type checks pass anything
        if isinstance(value, str):
            try:
                value = value.encode("utf-8")
            except UnicodeEncodeError as exc:
                message = f"not valid UTF-8 text: {exc.reason} at character {exc.start}"
                return Inspected(index, [(None, None, "invalid_utf8", message)])
        if isinstance(value, (bytes, bytearray, memoryview)):
            return self.inspect_line(bytes(value), index)
        message = f"expected a request object or a JSON line, got {type(value).__name__}"
        return Inspected(index, [(None, None, "not_an_object", message)])

    @staticmethod
    def claims(items: Iterable[Inspected], *, rejected: bool = False) -> list[str]:
        """The ids that inspected lines claim (for the caller to look up, see
        :meth:`resolve`); ``rejected``: only those of the lines rejected whatever their
        id (the caller finds the duplicates among the others otherwise, see
        :meth:`mark`)."""
        if rejected:
            return [item.claim for item in items if item.claim is not None and not item.ready]
        return [item.claim for item in items if item.claim is not None]

    def mark(self) -> _Mark:
        """Where the check is, for :meth:`undo`: a caller may resolve lines with only
        some of the ids looked up (see :meth:`claims`), try to store the requests where
        an id can be used only once, and when one was used before, undo and resolve them
        again with every id looked up."""
        return (
            self._accepted,
            self._rejected,
            self._problem_count,
            len(self._problems),
            len(self._rejected_ids),
            -1 if self._first_line is None else len(self._first_line),
        )

    def undo(self, mark: _Mark) -> None:
        """Forget the lines resolved since :meth:`mark` gave ``mark``."""
        accepted, rejected, count, kept, rejected_ids, remembered = mark
        self._accepted = accepted
        self._rejected = rejected
        self._problem_count = count
        del self._problems[kept:]
        for _ in range(len(self._rejected_ids) - rejected_ids):  # ids added since, last
            self._rejected_ids.popitem()
        if self._first_line is not None:
            for _ in range(len(self._first_line) - remembered):
                self._first_line.popitem()

    def resolve(
        self, items: Sequence[Inspected], earlier: Mapping[str, int]
    ) -> list[PreparedRequest | None]:
        """Finish the check of inspected lines, in source order: each claimed id is a
        duplicate when a line before it used it; each line is then accepted (as a
        :class:`PreparedRequest`, numbered) or rejected (None, its problems recorded).

        Args:
            items: the next lines of the source, inspected in order.
            earlier: the ids among their claims (:meth:`claims`) that an accepted line
                before these used, and that line; unless the ids are remembered here
                (``remember_ids``), the caller looks them up where it keeps the accepted
                requests.

        Returns:
            For each item, its request, or None when it was rejected.
        """
        return [
            None
            if row is None
            else PreparedRequest(
                seq=row.seq,
                url=row.url,
                model=row.model,
                tokens=row.tokens,
                inputs=row.inputs,
                line=row.line,
                custom_id=row.custom_id,
                data=row.data,
                size=item.size,
                generated_id=item.generated,
            )
            for item, row in zip(items, self._settle(items, earlier), strict=True)
        ]

    def resolve_rows(
        self, items: Sequence[Inspected], earlier: Mapping[str, int]
    ) -> list[RequestRow]:
        """:meth:`resolve`, the accepted requests as the journal's rows (the rejected
        lines left out)."""
        return [row for row in self._settle(items, earlier) if row is not None]

    def _settle(
        self, items: Sequence[Inspected], earlier: Mapping[str, int]
    ) -> list[RequestRow | None]:
        """What :meth:`resolve` does, each accepted line as its journal row."""
        remembered = self._first_line
        known = earlier if remembered is None else remembered
        rejected_ids = self._rejected_ids
        batch: dict[str, int] = {}  # the ids claimed by the lines accepted here
        taken = batch if remembered is None else remembered
        seq = self._accepted
        out: list[RequestRow | None] = []
        for item in items:
            claim = item.claim
            first = None
            if claim is not None:
                first = known.get(claim) or rejected_ids.get(claim) or batch.get(claim)
            problems = item.problems
            if first is not None:
                assert claim is not None
                if item.generated:
                    message = (
                        f"duplicate: the line had no custom_id and the one generated for it "
                        f"is already used by {item.unit} {first}"
                    )
                    problems = [(claim, "custom_id", "duplicate_custom_id", message)]
                else:
                    message = f"duplicate: {item.unit} {first} already uses this custom_id"
                    problems = [(claim, "custom_id", "duplicate_custom_id", message), *problems]
            if not problems and item.oversize is not None:
                problems = [item.oversize]
            if problems:
                self._reject(item.line, problems)
                if claim is not None and first is None:
                    rejected_ids[claim] = item.line
                out.append(None)
                continue
            assert item.ready
            assert claim is not None
            taken[claim] = item.line
            out.append(
                RequestRow(
                    seq,
                    claim,
                    item.line,
                    item.url,
                    item.model,
                    item.tokens,
                    item.inputs,
                    item.data,
                )
            )
            seq += 1
        self._accepted = seq
        return out

    def finish(self) -> None:
        """End the source: raise when any line had a problem, unless ``skip_invalid``.

        Raises:
            PreflightError: there were problems; it carries them, their count and the
                source, and its message lists the first few.
        """
        if self._problem_count and not self._skip_invalid:
            raise PreflightError(
                self._summary(),
                problems=self.problems,
                count=self._problem_count,
                source=self._source,
            )

    def _summary(self) -> str:
        count = self._problem_count
        lines = [
            f"{self._source}: {count:,} problem{'s' if count != 1 else ''} in "
            f"{self._rejected:,} input line{'s' if self._rejected != 1 else ''}; "
            "nothing was uploaded"
        ]
        listed = self._problems[:_LISTED_PROBLEMS]
        lines.extend(f"  {problem}" for problem in listed)
        if count > len(listed):
            lines.append(f"  ... and {count - len(listed):,} more")
        return "\n".join(lines)

    def _reject(self, line: int, found: list[_Problem]) -> None:
        """Record the problems ``(custom_id, field, code, message)`` of one line."""
        self._rejected += 1
        for custom_id, field, code, message in found:
            self._problem_count += 1
            if len(self._problems) < self._max_kept:
                self._problems.append(
                    LineProblem(self._source, line, custom_id, field, code, message)
                )

    def _inspect(self, raw: bytes, line: int, *, unit: str, encoded: bool) -> Inspected:
        """Check one line's bytes but for duplicates (``encoded``: they are our own
        compact encoding)."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            message = f"not valid UTF-8: byte 0x{raw[exc.start]:02x} at offset {exc.start}"
            return Inspected(line, [(None, None, "invalid_utf8", message)])
        try:
            request = _read_json(text)
        except json.JSONDecodeError as exc:
            message = f"not valid JSON: {exc.msg} (column {exc.colno})"
            return Inspected(line, [(None, None, "invalid_json", message)])
        except (ValueError, RecursionError) as exc:
            return Inspected(line, [(None, None, "invalid_json", f"not valid JSON: {exc}")])
        if not isinstance(request, dict):
            message = f"a request must be a JSON object, not {_json_type(request)}"
            return Inspected(line, [(None, None, "not_an_object", message)])

        custom_id = request.get("custom_id")
        method = request.get("method", _ABSENT)
        url = request.get("url")
        body = request.get("body")
        # The common line (its own id, POST, a url seen before, a body with a model) is
        # known good after these few tests; any other goes through every check.
        id_pattern = self._id_pattern
        embeddings = self._urls.get(url) if type(url) is str else None
        if (
            embeddings is not None
            and type(custom_id) is str
            and custom_id
            and text_problem(custom_id) is None
            and method == "POST"
            and type(body) is dict
            and type(model := body.get("model")) is str
            and model
            and text_problem(model) is None
            and body.get("stream") is not True
            and (id_pattern is None or id_pattern.fullmatch(custom_id))
        ):
            generated = False
        else:
            found, problem_id, model = check_fields(
                request, custom_id, method, url, body, id_pattern
            )
            if found:
                return Inspected(line, found, claim=problem_id, unit=unit)
            assert isinstance(url, str)
            assert isinstance(body, dict)
            embeddings = self._known_url(url)
            generated = custom_id is None
            if generated:
                custom_id = self._generate("POST", url, body)
        assert isinstance(custom_id, str)
        assert isinstance(url, str)

        if generated or method is _ABSENT:
            data = _encode({"custom_id": custom_id, "method": "POST", **_without_id(request)})
        elif not encoded and (
            b"\r" in raw or b"\n" in raw or (not raw.isascii() and _needs_encoding(raw))
        ):
            data = _encode(request)
        else:
            data = raw
        size = len(data) + 1
        if size > self._max_line_bytes:
            message = (
                f"the line is {size:,} bytes with its newline; a batch input file "
                f"may be at most {self._max_line_bytes:,} bytes"
            )
            return Inspected(
                line,
                [],
                claim=custom_id,
                generated=generated,
                unit=unit,
                oversize=(custom_id, None, "line_too_large", message),
            )

        tokens = self._estimate(body)
        if not (isinstance(tokens, int) and tokens >= 0):
            raise ValueError(f"the token estimator must return an int >= 0, got {tokens!r}")
        return Inspected(
            line,
            [],
            custom_id,
            generated,
            unit,
            None,
            True,
            url,
            model,
            data,
            size,
            tokens,
            count_inputs(url, body) if embeddings else 1,
        )

    def _known_url(self, url: str) -> bool:
        """Whether a good ``url`` is an embeddings endpoint (see
        :func:`~aiobatch._run._line_checks.count_inputs`); remembered (for the first
        :data:`_KNOWN_URLS` urls) so that the next line of the same url is known good at
        once."""
        embeddings = url.rstrip("/").endswith("/embeddings")
        if len(self._urls) < _KNOWN_URLS:
            self._urls[url] = embeddings
        return embeddings

    def _generate(self, method: str, url: str, body: Mapping[str, Any]) -> str:
        """The generated id of a request: the n-th identical request gets ``-n``."""
        base = generated_custom_id(method, url, body)
        occurrence = self._generated.get(base, 0) + 1
        self._generated[base] = occurrence
        return base if occurrence == 1 else f"{base}-{occurrence}"
