"""``pvebackup ls`` and ``pvebackup extract``: single files of a container backup."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pvebackup.cli.cmd_vmfiles import _json, _line
from pvebackup.cli.output import add_output_option, print_json
from pvebackup.host.backupfiles import extract_backup_files, list_backup_files
from pvebackup.host.guests import NodeRoot
from pvebackup.host.tasklog import LogRouter

__all__ = ["add_parser"]

_OWNERS = (
    "Owners are the container's ids as the archive stores them (numeric, as with tar's "
    "--numeric-owner: the archive holds no user names, and no host id mapping is applied), "
    "set only when run as root; --no-owner (or running as another user) leaves the "
    "files to the caller."
)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ls = sub.add_parser(
        "ls",
        help="list files of a container backup",
        description="List directory PATH (default /) of container backup STOREID:VOLNAME, "
        "or show the one entry PATH. Reads only the backup's catalog. Providers that "
        "cannot list single files exit 4.",
    )
    ls.add_argument("volid", metavar="STOREID:VOLNAME", help="the container backup")
    ls.add_argument("path", nargs="?", default="/", metavar="PATH", help="path in the container")
    add_output_option(ls)
    ls.set_defaults(command=_ls, usage_parser=ls)
    ex = sub.add_parser(
        "extract",
        help="extract files of a container backup",
        description="Write each PATH of container backup STOREID:VOLNAME below --target "
        "under its own name (a directory with its tree; / writes the whole tree), reading "
        "only the chunks of those files, each verified (a damaged chunk exits 5). --target "
        "is created or must be an empty directory (exit 7 otherwise). Names that would "
        "leave it are skipped with a warning, symlinks are written but never followed, "
        "device nodes and sockets are not created, setuid/setgid bits are dropped and "
        "hard links become copies. " + _OWNERS,
    )
    ex.add_argument("volid", metavar="STOREID:VOLNAME", help="the container backup")
    ex.add_argument("paths", nargs="+", metavar="PATH", help="path in the container")
    ex.add_argument("--target", metavar="DIR", type=Path, required=True,
                    help="new or empty directory to write into")  # fmt: skip
    owners = ex.add_mutually_exclusive_group()
    owners.add_argument("--numeric-owner", dest="keep_owner", action="store_true", default=True,
                        help="apply the numeric container ids (default; root only)")  # fmt: skip
    owners.add_argument("--no-owner", dest="keep_owner", action="store_false",
                        help="do not apply owners")  # fmt: skip
    add_output_option(ex)
    ex.set_defaults(command=_extract, usage_parser=ex)


def _ls(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    log = LogRouter(sys.stderr)
    infos = list_backup_files(NodeRoot(args.root), args.volid, args.path, log)
    if args.output == "json":
        print_json([{**_json(i), "mtime_ns": i.mtime_ns} for i in infos])
    else:
        for info in infos:
            print(_line(info))
    return 0


def _extract(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    log = LogRouter(sys.stderr)
    result = extract_backup_files(
        NodeRoot(args.root), args.volid, args.paths, args.target,
        keep_owner=args.keep_owner, log=log,
    )  # fmt: skip
    if args.output == "json":
        print_json(
            {
                "volid": args.volid,
                "paths": args.paths,
                "target": str(args.target),
                "files": result.files,
                "directories": result.directories,
                "symlinks": result.symlinks,
                "bytes": result.bytes,
                "skipped": result.skipped,
            }
        )
    else:
        print(
            f"extracted {result.files} files, {result.directories} directories, "
            f"{result.symlinks} symlinks ({result.bytes} bytes) into {args.target}"
            + (f"; {len(result.skipped)} skipped" if result.skipped else "")
        )
    return 0
