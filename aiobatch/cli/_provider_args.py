"""The provider arguments the commands that call a provider share (``run``, ``worker``,
``batches``): ``--provider``, ``--base-url``, ``--create-settle``."""

from __future__ import annotations

import argparse

from .._client import DEFAULT_CREATE_SETTLE
from .._provider import PROVIDER_NAMES, Provider, provider_from_env
from ._args import duration

__all__ = ["provider", "provider_arguments"]


def provider_arguments(group: argparse._ActionsContainer, what: str) -> None:
    """``--provider`` and ``--base-url``, read by :func:`provider`, and ``--create-settle``
    for the client."""
    group.add_argument(
        "--provider",
        choices=PROVIDER_NAMES,
        default="openai",
        help=f"{what}; keys and endpoints come from its environment variables",
    )
    group.add_argument("--base-url", default=None, help="the API root (not for azure)")
    group.add_argument(
        "--create-settle",
        type=duration,
        default=DEFAULT_CREATE_SETTLE,
        metavar="SECONDS",
        help="how long a create that may still be on its way (after a crash or a lost "
        "answer) is given to land before its batch is looked up; shorten it only for a "
        "server that acts at once, such as a local test server",
    )


def provider(args: argparse.Namespace) -> Provider:
    """The provider the arguments name (its key and endpoint from the environment)."""
    return provider_from_env(args.provider, base_url=args.base_url)
