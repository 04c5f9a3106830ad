"""``pvebackup``: the command line. One module per command (``cmd_<verb>.py``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pvebackup import __version__
from pvebackup.api.errors import AbortedError, PveBackupError
from pvebackup.cli import cmd_backup, cmd_key, cmd_list, cmd_remove, cmd_restore
from pvebackup.kit.hoststate import STATE_DIR_ENV

__all__ = ["build_parser", "main"]

EXIT_CODES = """\
exit status:
  0    success
  1    other error
  2    bad command line or malformed configuration file
  3    something named does not exist (storage, guest, backup volume)
  4    storage plugin or backup provider problem (no provider, unsupported)
  5    stored data failed an integrity check
  6    key problem (missing, wrong, unreadable key)
  7    refused because of existing state (guest exists or runs, volume in use, locked)
  8    hostile archive entry or storage content refused (e.g. a symlink in the storage)
  9    external tool failed (qemu-img, qemu-storage-daemon, tar, ...)
  10   storage backend I/O failed
  11   backup job finished, but one or more guests failed
  130  interrupted (SIGINT/SIGTERM)
"""

_COMMANDS = (cmd_backup, cmd_restore, cmd_list, cmd_remove, cmd_key)


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
    try:
        return command(args, parser)
    except PveBackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return AbortedError.exit_code


if __name__ == "__main__":
    sys.exit(main())
