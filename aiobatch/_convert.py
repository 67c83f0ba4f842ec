"""The one place that knows the wire format: JSON bodies <-> frozen models.

Every quirk of the wire lives here and nowhere else: nulls where the schema says a
value, unknown fields (ignored), the untagged union of result lines (told apart by
``response``/``error`` and the HTTP status), strict scalar types (a string is never
silently turned into a number, except a request count of digits, below).

Provider quirks, absorbed here so that no caller ever sees them:

* timestamps in milliseconds (Vertex AI, Bedrock and Cohere through Portkey) are told
  apart by magnitude: a value of at least 10^11 is milliseconds (10^11 seconds is the
  year 5138, 10^11 milliseconds is March 1973), and is floored to seconds;
* timestamps as ISO-8601 strings (Azure's 2024 preview API versions), with any number
  of fraction digits (Azure sends seven) and a ``Z``, ``+hh:mm``, ``+hhmm`` or ``+hh``
  offset; a time with no offset is read as UTC;
* capitalised or CamelCase statuses (``"Validating"``, ``"InProgress"``), the American
  spellings ``canceling`` / ``canceled``, and the statuses gateways pass through from
  other providers (:data:`STATUS_ALIASES`), mapped onto the state machine with the
  server's string kept in ``Batch.raw_status``; a string that maps to nothing decodes
  as ``BatchStatus.UNKNOWN``, its string kept the same way;
* null ``request_counts`` fields (Azure, while validating) read as 0, and digit
  strings there (Vertex AI's int64 counts through Portkey) as their numbers; a
  missing or null ``completion_window`` (Vertex AI through Portkey) or ``endpoint``
  (Bedrock through Portkey) as None; a numeric ``errors.data[].code`` (Vertex AI's
  ``google.rpc.Status``) as its digits;
* Anthropic's Message Batches (a body with ``"type": "message_batch"``, result lines
  with a ``result``), read by :mod:`aiobatch._convert_anthropic` into the same models;
* error bodies that are not OpenAI's envelope: Portkey's ``{"status": "failure",
  "message": ...}``, Azure API Management's ``{"statusCode": 401, "message": ...}``
  and ``{"detail": ...}`` from small compatible servers (see :func:`parse_error_body`).

The common OpenAI path pays for none of this: a timestamp that is a plain int below
10^11 and a status that is a known wire string take the same single check as before.

Two cattrs converters with the same hooks are kept: a fast one for the common path,
and one with detailed validation that runs only after the fast one failed, to say
exactly which field was wrong. Whatever goes wrong, callers see one
:class:`~aiobatch.errors.DecodeError` that names the field.

The converter is this module and its siblings: :mod:`._convert_core` (the cattrs
converters and their hooks, error envelopes), :mod:`._convert_results` (result lines:
decoded, re-encoded, summarised), :mod:`._convert_encode` (models to wire data, request
lines, create and upload bodies), :mod:`._convert_anthropic` (Anthropic's shapes) and
:mod:`._convert_fast` (the msgspec summary). Callers import from here.
"""

from __future__ import annotations

from ._convert_anthropic import encode_inline_create
from ._convert_core import (
    STATUS_ALIASES,
    decode,
    decode_json,
    map_status,
    parse_error_body,
    structure,
)
from ._convert_encode import (
    encode_create_batch,
    encode_online_body,
    encode_request_line,
    to_wire,
    upload_form_fields,
)
from ._convert_results import (
    decode_batch_output_line,
    decode_result_line,
    result_line_bytes,
    summarize,
    summarize_result,
    summarize_result_line,
    usage_tokens,
)

__all__ = [
    "STATUS_ALIASES",
    "decode",
    "decode_batch_output_line",
    "decode_json",
    "decode_result_line",
    "encode_create_batch",
    "encode_inline_create",
    "encode_online_body",
    "encode_request_line",
    "map_status",
    "parse_error_body",
    "result_line_bytes",
    "structure",
    "summarize",
    "summarize_result",
    "summarize_result_line",
    "to_wire",
    "upload_form_fields",
    "usage_tokens",
]
