"""The registry of subcommands, the parser built from it, and :func:`main`.

Every subcommand is one :class:`Command` in :data:`COMMANDS`: a function that adds its
arguments to a parser and a function that runs it and returns the exit status. To add
a subcommand, write those two functions and register them with :func:`command`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import attrs

from ._args import duration, duration_text, rate

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
        epilog: text printed after the arguments (examples, exit statuses); its lines
            are kept as written.
    """

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None
    epilog: str | None = None


#: Every subcommand, by name, in the order ``--help`` lists them.
COMMANDS: dict[str, Command] = {}


def command(
    name: str,
    help: str,
    configure: Callable[[argparse.ArgumentParser], None],
    *,
    description: str | None = None,
    epilog: str | None = None,
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register the decorated function as the ``run`` of subcommand ``name``.

    Args:
        name: the subcommand.
        help: one line for ``aiobatch --help``.
        configure: adds the subcommand's arguments.
        description: longer text for the subcommand's own ``--help``.
        epilog: text after the arguments in its ``--help`` (lines kept as written).

    Returns:
        A decorator that registers and returns the function unchanged.
    """

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(name, help, configure, run, description, epilog)
        return run

    return register


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once, as the value it is; keeps the lines of a text that has
    several (an epilog of examples) and wraps the others."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "default:" in text
            or default is None
            or default is argparse.SUPPRESS
            or isinstance(default, bool)
            or default in ((), [], {})
            or not action.option_strings
        ):
            return text
        if isinstance(default, (list, tuple)):
            shown = ",".join(str(v) for v in default)
        elif isinstance(default, float) and action.type is duration:
            shown = duration_text(default)
        else:
            shown = str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


def _version() -> str:
    from .. import __version__

    return str(__version__)


def _name_units(parser: argparse.ArgumentParser) -> None:
    """Options that take a duration or a fraction say so in their metavar."""
    for action in parser._actions:
        if action.metavar is None and action.option_strings:
            if action.type is duration:
                action.metavar = "DURATION"
            elif action.type is rate:
                action.metavar = "0-1"


def build_parser() -> argparse.ArgumentParser:
    """The parser for ``aiobatch`` with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="aiobatch",
        description="Drive OpenAI-compatible Batch APIs, or serve a fake one for testing.",
    )
    parser.add_argument("--version", action="version", version=f"aiobatch {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        sub = subparsers.add_parser(
            cmd.name,
            help=cmd.help,
            description=cmd.description or cmd.help,
            epilog=cmd.epilog,
            formatter_class=HelpFormatter,
        )
        cmd.configure(sub)
        _name_units(sub)
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
