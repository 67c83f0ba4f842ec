"""The registry of subcommands, the parser built from it, and :func:`main`.

Every subcommand is one :class:`Command` in :data:`COMMANDS`: a function that adds its
arguments to a parser and a function that runs it and returns the exit status. To add
a subcommand, write those two functions and register them with :func:`command`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import attrs

__all__ = ["COMMANDS", "Command", "build_parser", "command", "main"]


@attrs.frozen
class Command:
    """One subcommand.

    Attributes:
        name: what the user types (``fake-server``).
        help: one line for ``aiobatch --help``.
        configure: adds the subcommand's arguments to its parser.
        run: runs it with the parsed arguments; returns the exit status.
        description: the longer text for ``aiobatch <name> --help``.
    """

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None


#: Every subcommand, by name, in the order ``--help`` lists them.
COMMANDS: dict[str, Command] = {}


def command(
    name: str,
    help: str,
    configure: Callable[[argparse.ArgumentParser], None],
    *,
    description: str | None = None,
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register the decorated function as the ``run`` of subcommand ``name``.

    Args:
        name: the subcommand.
        help: one line for ``aiobatch --help``.
        configure: adds the subcommand's arguments.
        description: longer text for the subcommand's own ``--help``.

    Returns:
        A decorator that registers and returns the function unchanged.
    """

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(name, help, configure, run, description)
        return run

    return register


def build_parser() -> argparse.ArgumentParser:
    """The parser for ``aiobatch`` with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="aiobatch",
        description="Drive OpenAI-compatible Batch APIs, or serve a fake one for testing.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        sub = subparsers.add_parser(
            cmd.name,
            help=cmd.help,
            description=cmd.description or cmd.help,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        cmd.configure(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``aiobatch`` with ``argv`` (default: ``sys.argv[1:]``).

    Args:
        argv: the arguments after the program name.

    Returns:
        The exit status: 0 on success, 2 on a usage error.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return COMMANDS[args.command].run(args)
