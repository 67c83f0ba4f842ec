"""The exit statuses of ``aiobatch``: one small table, what a script can test.

===  ==================================================================================
0    the run finished and every request succeeded
1    the run finished, and some requests failed (their error lines are in the output);
     ``--allow-failures`` makes this 0
2    usage error: bad arguments, a missing key, an input file that fails the checks
3    the provider refused the batches or the credentials (configuration: a key, a
     model, an endpoint, a quota or metadata it does not accept); refused batches end
     their requests with ``batch_create_rejected``
4    the run stopped on an error (a step kept failing, the journal or a file could not
     be used); the journal is intact: the same command resumes it
130  interrupted (Ctrl-C, ``aiobatch cancel``): open batches were cancelled; resumable
143  stopped (SIGTERM): the batches keep running; the same command collects them
===  ==================================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from ..errors import AuthenticationError, PermissionDeniedError

__all__ = [
    "ERROR",
    "EXIT_CODES_HELP",
    "FAILURES",
    "INTERRUPTED",
    "OK",
    "REFUSAL_CODES",
    "REFUSED",
    "STOPPED",
    "USAGE",
    "error_code",
    "finished_code",
]

OK: Final = 0
FAILURES: Final = 1
USAGE: Final = 2
REFUSED: Final = 3
ERROR: Final = 4
INTERRUPTED: Final = 130
STOPPED: Final = 143

#: Error codes that say the provider refused a batch (its configuration, not a request).
REFUSAL_CODES: Final = frozenset({"batch_create_rejected"})

#: The table as ``--help`` and the README print it.
EXIT_CODES_HELP: Final = """\
exit status:
  0    every request succeeded
  1    finished, some requests failed (0 with --allow-failures)
  2    usage error (arguments, a missing key, an input file that fails the checks)
  3    the provider refused the batches or the key (configuration: the key, model,
       endpoint, quota or metadata)
  4    the run stopped on an error; the journal is intact (run again to resume)
  130  interrupted (Ctrl-C or 'aiobatch cancel'); run again to resume
  143  stopped (SIGTERM); the batches keep running; run again to collect them"""


def finished_code(
    *, failed: int, skipped: int, errors: Mapping[str, int], allow_failures: bool = False
) -> int:
    """The exit status of a run that finished (state ``done``).

    Args:
        failed: requests whose final result is an error.
        skipped: input lines skipped as invalid.
        errors: final errors by code.
        allow_failures: a finished run exits 0 even with failed requests (not when the
            provider refused batches: that is a configuration to fix).

    Returns:
        :data:`OK`, :data:`FAILURES` or :data:`REFUSED`.
    """
    if any(errors.get(code) for code in REFUSAL_CODES):
        return REFUSED
    if (failed or skipped) and not allow_failures:
        return FAILURES
    return OK


def error_code(exc: BaseException) -> int:
    """The exit status of a run that stopped on ``exc``: :data:`REFUSED` when the
    server refused the credentials (also as the cause of a run error), else
    :data:`ERROR`."""
    refused = (AuthenticationError, PermissionDeniedError)
    if isinstance(exc, refused) or isinstance(exc.__cause__, refused):
        return REFUSED
    return ERROR
