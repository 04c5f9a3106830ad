"""``pvebackup restore``: restore a backup as a guest (qmrestore/pct restore's role)."""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pvebackup.cli.common import vmid_arg
from pvebackup.cli.output import add_output_option, print_json
from pvebackup.host.guests import NodeRoot
from pvebackup.host.qemu import liverestore
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
    live: bool = False
    start_command: str | None = None
    bwlimit: int | None = None
    output: str = "text"
    unique: bool = False
    storage_map: dict[str, str] = field(default_factory=dict)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "restore",
        help="restore a backup as a new guest",
        description="Restore backup STOREID:VOLNAME as guest VMID. New volumes are "
        "allocated on the --storage storage with its own tool (default: where each "
        "volume was): dir, nfs, cifs and btrfs (VM disks as qcow2, btrfs raw), "
        "lvmthin, lvm, zfspool and rbd (raw; containers only on dir-like, btrfs and "
        "zfspool storages). "
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
        "A running VM VMID (its var/run/qemu-server/VMID.pid names a live process) is "
        "always refused (exit 7), also with --force; a restore never starts a VM, "
        "except with --live: then the new disks read through from the backup's NBD "
        "export, the VM is started at once with the node's start command "
        "(--start-command, else $PVEBACKUP_START_COMMAND, else 'qm start'; the VMID is "
        "appended) and the data is copied into the new disks in the background "
        "(QEMU block-stream); the restore returns when the VM no longer needs the "
        "backup. If the export fails during the copy, the VM is paused and stopped, "
        "and its config and new volumes removed. --live needs a provider whose restore "
        "source is a NBD URI (backup-store; others are refused, exit 4) and a new VMID. "
        "Exit status 0 on success, codes as listed in 'pvebackup --help'.",
    )
    p.add_argument("volid", metavar="STOREID:VOLNAME", help="the backup to restore")
    p.add_argument("vmid", metavar="VMID", type=vmid_arg, help="id of the restored guest")
    p.add_argument(
        "--storage",
        metavar="STOREID",
        help="storage for the new volumes (dir, nfs, cifs, btrfs, lvm, lvmthin, zfspool, rbd)",
    )
    p.add_argument(
        "--map",
        dest="storage_map",
        action="append",
        type=_map_arg,
        default=[],
        metavar="DISK=STOREID",
        help="put the new volume of one disk or mount point (scsi0, efidisk0, rootfs, "
        "mp0...) on this storage (repeatable; others: --storage, else their own)",
    )
    p.add_argument(
        "--unique",
        action="store_true",
        help="new MAC addresses (and SMBIOS uuid) as qmrestore --unique; without it a "
        "warning names other guests using the same MACs",
    )
    p.add_argument("--force", action="store_true", help="replace an existing guest VMID")
    p.add_argument(
        "--keep-host-access",
        action="store_true",
        help="keep the backed-up config's keys that grant host access (only for a backup "
        "you trust as much as root on this host); lxc.idmap is dropped even then",
    )
    p.add_argument(
        "--live",
        action="store_true",
        help="start the VM at once and copy its disks from the backup while it runs",
    )
    p.add_argument(
        "--start-command",
        metavar="CMD",
        help="command that starts a VM, the VMID appended (--live; default: "
        "$PVEBACKUP_START_COMMAND, else 'qm start')",
    )
    p.add_argument(
        "--bwlimit",
        metavar="KIB_PER_S",
        type=int,
        help="bandwidth limit per VM disk in KiB/s (also the background copy of --live)",
    )
    add_output_option(p)
    p.set_defaults(command=_from_args, usage_parser=p)


_MAP_KEY = re.compile(r"^(?:(?:ide|sata|scsi|virtio|efidisk|tpmstate|mp)\d+|rootfs)$")


def _map_arg(text: str) -> tuple[str, str]:
    key, sep, storeid = text.partition("=")
    if not sep or not _MAP_KEY.match(key) or not storeid:
        raise argparse.ArgumentTypeError(
            f"{text!r}: want DISK=STOREID, e.g. scsi0=local-lvm or mp0=local"
        )
    return key, storeid


def _from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    storage_map: dict[str, str] = {}
    for key, storeid in args.storage_map:
        if key in storage_map:
            parser.error(f"restore: --map {key} given twice")
        storage_map[key] = storeid
    return run(
        RestoreOptions(
            args.root,
            args.volid,
            args.vmid,
            args.storage,
            args.force,
            args.keep_host_access,
            args.live,
            args.start_command,
            args.bwlimit,
            args.output,
            args.unique,
            storage_map,
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
        live=opts.live,
        start_command=liverestore.start_command(opts.start_command) if opts.live else None,
        bwlimit_kib=opts.bwlimit,
        terminal=sys.stderr,
        unique=opts.unique,
        storage_map=opts.storage_map,
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
                "live": opts.live,
            }
        )
        return 0
    print(f"restored {opts.volid} as {result.vmtype} guest {result.vmid}")
    for volid in result.volumes:
        print(f"  volume {volid}")
    print(f"  config {result.config_path}")
    return 0
