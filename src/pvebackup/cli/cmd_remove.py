"""``pvebackup remove``: remove one backup volume."""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from pvebackup.cli.output import add_output_option, print_json
from pvebackup.host.guests import NodeRoot
from pvebackup.host.runstate import GuestRun
from pvebackup.kit.volname import BackupVolname
from pvebackup.storage import (
    lookup,
    parse_volume_id,
    read_storage_config,
    remove_backup_volume,
    storage_config,
)

__all__ = ["RemoveOptions", "add_parser", "run"]


@dataclass
class RemoveOptions:
    root: Path
    volid: str
    output: str = "text"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "remove",
        help="remove a backup",
        description="Remove backup STOREID:VOLNAME. On a backup-store, the space of "
        "the data only this backup used is freed by later runs of 'pvebackup gc'. "
        "A protected backup is refused (pvebackup unprotect first). "
        "Exit status 0; 3 when it does not exist; 7 when another backup depends "
        "on it, it is protected, or the guest is being backed up or restored; "
        "8 when the storage holds a symlink "
        "or special file in its place (nothing is removed); other codes as listed in "
        "'pvebackup --help'.",
    )
    p.add_argument("volid", metavar="STOREID:VOLNAME", help="the backup to remove")
    add_output_option(p)
    p.set_defaults(command=_from_args, usage_parser=p)


def _from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    return run(RemoveOptions(args.root, args.volid, args.output))


def run(opts: RemoveOptions) -> int:
    root = NodeRoot(opts.root)
    storeid, volname = parse_volume_id(opts.volid)
    cfg = read_storage_config(root.storage_cfg)
    scfg = storage_config(cfg, storeid)
    plugin = lookup(scfg["type"])
    try:
        vmid: int | None = BackupVolname.parse(volname).vmid
    except ValueError:
        vmid = None  # not one of ours: the plugin names the error
    with ExitStack() as locks:
        if vmid is not None:
            # Never beside a backup or restore of the same guest on this node: the
            # newest backup may be the base a running incremental builds on.
            locks.enter_context(GuestRun(root, vmid, action="remove", log=_stderr_log, cfg=cfg))
        remove_backup_volume(plugin, scfg, storeid, volname)
    if opts.output == "json":
        print_json({"volid": opts.volid, "removed": True})
    else:
        print(f"removed {opts.volid}")
    return 0


def _stderr_log(level: str, msg: str) -> None:
    print(f"{level}: {msg}", file=sys.stderr)
