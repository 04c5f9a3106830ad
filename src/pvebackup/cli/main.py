"""``pvebackup``: the command line. One module per command (``cmd_<verb>.py``)."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

from pvebackup import __version__
from pvebackup.api.errors import AbortedError, PveBackupError, exit_codes
from pvebackup.cli import (
    cmd_backup,
    cmd_files,
    cmd_gc,
    cmd_key,
    cmd_list,
    cmd_notes,
    cmd_protect,
    cmd_prune,
    cmd_remove,
    cmd_restore,
    cmd_verify,
    cmd_vmfiles,
)
from pvebackup.kit.hoststate import STATE_DIR_ENV

__all__ = ["EXIT_CODES", "build_parser", "exit_status_help", "main"]


def exit_status_help() -> str:
    """The "exit status" table of ``--help``, generated from :mod:`pvebackup.api.errors`.

    Generated, not written out, so that a new error class with its own code shows
    up here (and in the README, which copies this) without anyone remembering to.
    """
    rows = [(0, "success"), *exit_codes()]
    width = max(len(str(code)) for code, _ in rows) + 2
    lines = ["exit status:"]
    for code, meaning in rows:
        wrapped = textwrap.wrap(meaning, 76 - width) or [""]
        lines.append(f"  {code:<{width}}{wrapped[0]}")
        lines.extend(f"  {'':<{width}}{more}" for more in wrapped[1:])
    return "\n".join(lines) + "\n"


EXIT_CODES = exit_status_help()


_COMMANDS = (
    cmd_backup, cmd_restore, cmd_list, cmd_remove, cmd_prune, cmd_gc, cmd_verify,
    cmd_protect, cmd_notes, cmd_key, cmd_vmfiles, cmd_files,
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pvebackup",
        description="Back up and restore Proxmox VE guests through backup providers.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pvebackup {__version__}")
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("/"),
        metavar="DIR",
        help="the node root holding etc/pve (default: /)",
    )
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND", required=True)
    for module in _COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pvebackup`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Providers keep their host-side state (the incremental base proof) below the
    # node root, so that a --root test node never touches the real /var/lib. An
    # explicit PVEBACKUP_STATE_DIR wins.
    if not os.environ.get(STATE_DIR_ENV):
        os.environ[STATE_DIR_ENV] = str(Path(args.root) / "var/lib/pvebackup")
    command: Callable[[argparse.Namespace, argparse.ArgumentParser], int] = args.command
    # A command's own usage errors print that command's usage, not the top level's.
    usage_parser: argparse.ArgumentParser = getattr(args, "usage_parser", None) or parser
    try:
        return command(args, usage_parser)
    except PveBackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return AbortedError.exit_code


if __name__ == "__main__":
    sys.exit(main())
