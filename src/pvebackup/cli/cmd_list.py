"""``pvebackup list``: the backups on a storage."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from pvebackup.cli.output import add_output_option, human_size, print_json, table, utc_time
from pvebackup.host.guests import NodeRoot
from pvebackup.kit.annotations import display_text
from pvebackup.storage import (
    VolumeInfo,
    VolumeScan,
    lookup,
    read_storage_config,
    storage_config,
)

__all__ = ["ListOptions", "add_parser", "list_volumes", "run", "scan_volumes"]


@dataclass
class ListOptions:
    root: Path
    storage: str
    output: str = "text"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "list",
        help="list the backups on a storage",
        description="List the backup volumes on STOREID, oldest first. "
        "--output json prints a list of records with the keys volid, vmid, vmtype, "
        "ctime (Unix seconds), size (bytes stored for this backup), virtual-size "
        "(bytes of the guest's disks, null for containers), format, parent (the base "
        "of an incremental, else null), notes (the operator's), comment (the "
        "provider's description), protected (true: never removed or pruned) and "
        "verify (the last 'pvebackup verify': {state: ok|failed, time}, or null). "
        "Text output shows the first line of the notes, control characters "
        "replaced. "
        "A damaged volume (unreadable index or manifest, impossible name) is not "
        "listed: a warning naming it goes to stderr, and the others are listed. "
        "Exit status 0 when the storage could be listed (even with damaged volumes), "
        "or a code as listed in 'pvebackup --help'.",
    )
    p.add_argument("storage", metavar="STOREID", help="the backup storage")
    add_output_option(p)
    p.set_defaults(command=_from_args, usage_parser=p)


def _from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    return run(ListOptions(args.root, args.storage, args.output))


def scan_volumes(root: NodeRoot, storeid: str) -> VolumeScan:
    cfg = read_storage_config(root.storage_cfg)
    scfg = storage_config(cfg, storeid)
    return lookup(scfg["type"]).scan_volumes(scfg, storeid)


def list_volumes(root: NodeRoot, storeid: str) -> list[VolumeInfo]:
    return scan_volumes(root, storeid).volumes


def run(opts: ListOptions) -> int:
    # Exit 0 with damaged volumes: the listing itself worked, and a script reading
    # --output json must still get the good volumes. Each damaged one is named on
    # stderr so that the operator can look at it (and remove it by hand).
    scan = scan_volumes(NodeRoot(opts.root), opts.storage)
    for bad in scan.damaged:
        print(f"warning: {bad.volid}: damaged, not listed: {bad.reason}", file=sys.stderr)
    volumes = scan.volumes
    if opts.output == "json":
        print_json([v.to_json() for v in volumes])
        return 0
    header = ["VOLID", "GUEST", "TYPE", "TIME (UTC)", "SIZE", "VIRTUAL", "PARENT"]
    rows = [
        [
            v.volid,
            str(v.vmid),
            str(v.vmtype),
            utc_time(v.ctime),
            human_size(v.size),
            "-" if v.virtual_size is None else human_size(v.virtual_size),
            v.parent or "-",
        ]
        for v in volumes
    ]
    for title, values in (
        ("PROTECTED", ["yes" if v.protected else "" for v in volumes]),
        ("VERIFIED", [_verified(v) for v in volumes]),
        ("COMMENT", [display_text(v.comment, one_line=True) for v in volumes]),
        # Notes are storage content anyone with write access may have written:
        # no escape sequence of theirs reaches the terminal.
        ("NOTES", [display_text(v.notes, one_line=True) for v in volumes]),
    ):
        if any(values):
            header.append(title)
            for row, value in zip(rows, values, strict=True):
                row.append(value)
    print(table(header, rows))
    return 0


def _verified(v: VolumeInfo) -> str:
    if v.verify_state is None or v.verify_time is None:
        return ""
    return f"{v.verify_state} {utc_time(v.verify_time)}"
