"""``pvebackup``: the command line. One module per command (``cmd_<verb>.py``)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pvebackup import __version__
from pvebackup.api.errors import AbortedError, PveBackupError, exit_codes
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


# verb -> module (``pvebackup.cli.<module>``), in the order of ``--help``. Only the
# module of the verb given is imported when the command line names one: each
# command module pulls in its own layers (host, store, S3...), and building every
# subparser costs more than some whole commands (the fixed cost of a backup).
COMMAND_MODULES: dict[str, str] = {
    "backup": "cmd_backup", "restore": "cmd_restore", "list": "cmd_list",
    "remove": "cmd_remove", "prune": "cmd_prune", "gc": "cmd_gc", "verify": "cmd_verify",
    "protect": "cmd_protect", "unprotect": "cmd_protect", "notes": "cmd_notes",
    "key": "cmd_key", "vm-files": "cmd_vmfiles", "ls": "cmd_files", "extract": "cmd_files",
}  # fmt: skip


def _command_module(name: str) -> Any:
    return importlib.import_module(f"pvebackup.cli.{name}")


def _verb(argv: Sequence[str]) -> str | None:
    """The verb of ``argv`` if it is a known one, found without a parser; else None.

    Only ``--root DIR`` / ``--root=DIR`` may precede it (the top level's only
    option with a value); anything else (``--help``, ``--version``, a typo) gets
    the full parser.
    """
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--root":
            i += 2
        elif arg.startswith("--root="):
            i += 1
        else:
            return arg if arg in COMMAND_MODULES else None
    return None


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The command-line parser: every command, or only ``verb``'s (same parsing)."""
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
    names = [COMMAND_MODULES[verb]] if verb is not None else COMMAND_MODULES.values()
    for name in dict.fromkeys(names):
        _command_module(name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pvebackup`` console script; returns the exit status."""
    parser = build_parser(_verb(sys.argv[1:] if argv is None else argv))
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
