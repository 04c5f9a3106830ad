"""``pvebackup remove``: remove one backup volume."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from pvebackup.cli.output import add_output_option, print_json
from pvebackup.host.guests import NodeRoot
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
        "on it or it is protected; 8 when the storage holds a symlink "
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
    remove_backup_volume(lookup(scfg["type"]), scfg, storeid, volname)
    if opts.output == "json":
        print_json({"volid": opts.volid, "removed": True})
    else:
        print(f"removed {opts.volid}")
    return 0
