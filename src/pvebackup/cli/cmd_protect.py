"""``pvebackup protect|unprotect``: keep a backup from being removed or pruned."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from pvebackup.cli.output import add_output_option, print_json
from pvebackup.host.guests import NodeRoot
from pvebackup.storage import lookup, parse_volume_id, read_storage_config, storage_config

__all__ = ["ProtectOptions", "add_parser", "run"]


@dataclass
class ProtectOptions:
    root: Path
    volid: str
    protected: bool
    output: str = "text"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for verb, protected in (("protect", True), ("unprotect", False)):
        p = sub.add_parser(
            verb,
            help="protect a backup from remove and prune"
            if protected
            else "let a protected backup be removed or pruned again",
            description=(
                "Protect backup STOREID:VOLNAME: 'pvebackup remove' refuses it (exit 7) "
                "and prune keeps it, using no keep slot. "
                if protected
                else "Remove the protection of backup STOREID:VOLNAME. "
            )
            + "The mark lives beside the backup, outside its signed part (as on "
            "Proxmox Backup Server): whoever can write the storage can change it. "
            "Exit status 0; 3 when the backup does not exist; 4 when the storage's "
            "plugin does not support protection; other codes as listed in "
            "'pvebackup --help'.",
        )
        p.add_argument("volid", metavar="STOREID:VOLNAME", help="the backup")
        add_output_option(p)
        p.set_defaults(command=_from_args, usage_parser=p, protected=protected)


def _from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    return run(ProtectOptions(args.root, args.volid, args.protected, args.output))


def run(opts: ProtectOptions) -> int:
    storeid, volname = parse_volume_id(opts.volid)
    scfg = storage_config(read_storage_config(NodeRoot(opts.root).storage_cfg), storeid)
    lookup(scfg["type"]).update_volume_attribute(
        scfg, storeid, volname, "protected", opts.protected
    )
    if opts.output == "json":
        print_json({"volid": opts.volid, "protected": opts.protected})
    else:
        print(f"{'protected' if opts.protected else 'unprotected'} {opts.volid}")
    return 0
