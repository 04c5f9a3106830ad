"""``pvebackup restore``: restore a backup as a guest (qmrestore/pct restore's role)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from pvebackup.cli.common import vmid_arg
from pvebackup.cli.output import add_output_option, print_json
from pvebackup.host.guests import NodeRoot
from pvebackup.host.restore import run_restore

__all__ = ["RestoreOptions", "add_parser", "run"]


@dataclass
class RestoreOptions:
    root: Path
    volid: str
    vmid: int
    storage: str | None = None
    force: bool = False
    keep_host_access: bool = False
    output: str = "text"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "restore",
        help="restore a backup as a new guest",
        description="Restore backup STOREID:VOLNAME as guest VMID. New volumes are "
        "created on the --storage dir storage (default: where each volume was). "
        "An existing guest VMID is refused (exit 7) unless --force is given; it is "
        "replaced only after the restore succeeded. A failed restore removes what it "
        "created; volumes a killed restore of VMID left are freed by the next one. "
        "A VMID that another backup or restore holds is refused at once (exit 7, "
        "'locked by PID N'). Keys of the backed-up config that give the guest access "
        "to the host (hookscript, args, host devices and paths as disks, "
        "PCI/USB/serial/parallel passthrough, bind mount points, container devices, "
        "raw lxc.* keys, root-only container features) are dropped with a warning each "
        "unless --keep-host-access is given; lxc.idmap is never taken from a backup "
        "(the target's map is used). "
        "Exit status 0 on success, codes as listed in 'pvebackup --help'.",
    )
    p.add_argument("volid", metavar="STOREID:VOLNAME", help="the backup to restore")
    p.add_argument("vmid", metavar="VMID", type=vmid_arg, help="id of the restored guest")
    p.add_argument("--storage", metavar="STOREID", help="dir storage for the new volumes")
    p.add_argument("--force", action="store_true", help="replace an existing guest VMID")
    p.add_argument(
        "--keep-host-access",
        action="store_true",
        help="keep the backed-up config's keys that grant host access (only for a backup "
        "you trust as much as root on this host); lxc.idmap is dropped even then",
    )
    add_output_option(p)
    p.set_defaults(command=_from_args, usage_parser=p)


def _from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    return run(
        RestoreOptions(
            args.root,
            args.volid,
            args.vmid,
            args.storage,
            args.force,
            args.keep_host_access,
            args.output,
        )
    )


def run(opts: RestoreOptions) -> int:
    result = run_restore(
        NodeRoot(opts.root),
        opts.volid,
        opts.vmid,
        target_storage=opts.storage,
        force=opts.force,
        keep_host_access=opts.keep_host_access,
        terminal=sys.stderr,
    )
    if opts.output == "json":
        print_json(
            {
                "volid": opts.volid,
                "vmid": result.vmid,
                "vmtype": str(result.vmtype),
                "volumes": list(result.volumes),
                "config": str(result.config_path),
                "removed": list(result.removed),
            }
        )
        return 0
    print(f"restored {opts.volid} as {result.vmtype} guest {result.vmid}")
    for volid in result.volumes:
        print(f"  volume {volid}")
    print(f"  config {result.config_path}")
    return 0
