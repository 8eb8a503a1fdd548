"""`audiencesync init [PATH]`: write the starter config (``starter.py``) and say what to run next.

It needs no config, so ``cli.main`` runs it before loading one.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from audiencesync.cli.help import add_command
from audiencesync.cli.output import EXIT_OK
from audiencesync.config import starter
from audiencesync.config.loading import ENV_TOKEN, find_config
from audiencesync.errors import ConfigError


def add_init_command(commands: Any) -> None:
    init = add_command(
        commands,
        "init",
        help="write a commented starter config",
        description="Write a starter config: every option with its default and a line saying what it "
        f"does, the Gleap token read from ${ENV_TOKEN}. An existing file is never overwritten. "
        "Then it prints the commands to run next.",
        example=["audiencesync init", "audiencesync init /etc/audiencesync/audiencesync.toml"],
    )
    init.add_argument(
        "path",
        nargs="?",
        metavar="PATH",
        help="where to write it (default: --config, then $AUDIENCESYNC_CONFIG, then ./audiencesync.toml: "
        "the file the other commands read)",
    )
    init.set_defaults(standalone=cmd_init)


def cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.path) if args.path else find_config(args.config)
    try:
        # "x": created only if absent, in one step, so a file made meanwhile is not overwritten either.
        with path.open("x", encoding="utf-8") as file:
            file.write(starter.render())
    except FileExistsError:
        raise ConfigError(
            "the file already exists, and init never overwrites one",
            path=str(path),
            fix="pass another PATH (audiencesync init PATH), or delete the file first",
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot write the file ({exc.strerror})",
            path=str(path),
            fix="pass a PATH in an existing directory you may write to",
        ) from None
    run = f"{program()} --config {shlex.quote(str(path))}"
    print(
        f"Wrote {path}: a starter config, every option with its default.\n"
        "Next:\n"
        f"  1. Edit it: [sources.{starter.SOURCE_NAME}] url (your database) and the [[audiences]] query.\n"
        f"  2. export {ENV_TOKEN}=...   (Gleap: Project > Settings > Security)\n"
        "  3. Create the store once, then check, look, and sync:\n"
        f"     {run} db upgrade\n"
        f"     {run} check\n"
        f"     {run} sync --dry-run\n"
        f"     {run} sync"
    )
    return EXIT_OK


def program() -> str:
    """The command that runs this audiencesync again, as the next steps should print it: plain
    ``audiencesync`` when that name on PATH is this install's, else the path it was run by (a
    venv not activated: ``.venv/bin/audiencesync``), else ``python -m audiencesync``."""
    here = Path(sys.executable).parent
    found = shutil.which("audiencesync")
    if found is not None and Path(found).parent.resolve() == here.resolve():
        return "audiencesync"
    typed = sys.argv[0]
    if Path(typed).name == "audiencesync":
        return shlex.quote(typed)
    return f"{shlex.quote(sys.executable)} -m audiencesync"
