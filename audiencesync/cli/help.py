"""How every command's --help reads: what it does, its options with their defaults, an example."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence
from typing import Any


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples kept as written; an option's default appended unless its help says it.

    argparse's ArgumentDefaultsHelpFormatter would also print "(default: None)" and
    "(default: False)", which say nothing, and repeat defaults the help already explains.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            not action.option_strings
            or "default" in text
            or action.default in (None, False, argparse.SUPPRESS)
            or isinstance(action, argparse._VersionAction)
        ):
            return text
        return f"{text} (default: %(default)s)"


WIDTH = 78


def describe(text: str) -> str:
    """A description, wrapped: the raw formatter keeps the examples' layout but wraps nothing."""
    return textwrap.fill(text, WIDTH)


def examples(*lines: str) -> str:
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


def add_command(
    commands: Any, name: str, *, help: str, description: str, example: str | Sequence[str]
) -> argparse.ArgumentParser:
    """A subcommand whose --help says what it does and shows how to run it."""
    lines = [example] if isinstance(example, str) else list(example)
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=help,
        description=describe(description),
        epilog=examples(*lines),
        formatter_class=HelpFormatter,
    )
    return parser
