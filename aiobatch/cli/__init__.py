"""The ``aiobatch`` command line: thin commands over the library and its fake server.

One module per command group, each registering its subcommands with
:func:`command` when imported: ``_fake`` (fake-server), ``_demo`` (demo), ``_diagram``
(diagram) and ``_run`` (run, status, cancel). They share ``_command`` (the registry,
the parser and :func:`main`) and ``_args`` (argument types and ``out``), and import
nothing else of this package; this module imports them all, in the order ``--help``
lists them.

The everyday toolkit: ``_failures`` (failures), ``_batches`` (batches, files),
``_watch`` (watch).
"""

from __future__ import annotations

# isort: off
from . import _fake, _demo, _diagram, _run, _worker  # noqa: F401  (they register their commands)
from . import _failures, _batches, _watch  # noqa: F401

# isort: on
from ._command import COMMANDS, Command, build_parser, command, main

__all__ = ["COMMANDS", "Command", "build_parser", "command", "main"]
