"""``aiobatch diagram``: the batch and shard lifecycles as Mermaid, from their tables."""

from __future__ import annotations

import argparse

from ._args import out
from ._command import command

__all__: list[str] = []


def _diagram_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shard",
        action="store_true",
        help="the run's shard lifecycle instead of the batch lifecycle",
    )


@command(
    "diagram",
    "print the batch (or, with --shard, the shard) lifecycle as a Mermaid state diagram, "
    "generated from the table",
    _diagram_arguments,
    epilog="""\
examples:
  aiobatch diagram                                      # the batch lifecycle
  aiobatch diagram --shard > shard-states.mmd           # the run's shard lifecycle""",
)
def _diagram(args: argparse.Namespace) -> int:
    if args.shard:
        from .._run._states import mermaid_diagram
    else:
        from .._lifecycle import mermaid_diagram

    out(mermaid_diagram())
    return 0
