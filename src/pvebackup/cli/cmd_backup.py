"""``pvebackup backup``: run a backup job (vzdump's role)."""

from __future__ import annotations

import argparse
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pvebackup.api.errors import GuestBackupError, PveBackupError
from pvebackup.api.types import GuestType
from pvebackup.cli.cmd_prune import prune_storage
from pvebackup.cli.common import vmid_arg
from pvebackup.cli.output import add_output_option, human_size, print_json, table
from pvebackup.host.defaults import read_job_defaults
from pvebackup.host.guests import NodeRoot
from pvebackup.host.job import MODES, JobResult, run_backup_job
from pvebackup.host.qemu.liverestore import start_command as vm_start_command
from pvebackup.kit.notestemplate import check_template, render_template
from pvebackup.kit.prune import parse_keep_options
from pvebackup.storage import lookup, parse_volume_id, read_storage_config, storage_config

__all__ = ["BackupOptions", "add_parser", "run"]


@dataclass
class BackupOptions:
    root: Path
    storage: str
    vmids: list[int] | None  # None: every guest (--all)
    bwlimit_kib: int | None = None
    exclude_paths: list[str] = field(default_factory=list)
    output: str = "text"
    mode: str | None = None  # None: ROOT/etc/vzdump.conf, else snapshot
    stop_wait: float | None = None  # None: ROOT/etc/vzdump.conf, else 10 minutes
    start_command: str | None = None  # None: $PVEBACKUP_START_COMMAND, else qm start
    fleecing_storage: str | None = None
    prune_backups: str | None = None  # None: the storage's prune-backups property
    notes_template: str | None = None
    protected: bool = False


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {value}")
    return value


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "backup",
        help="back up guests to a storage with a backup provider",
        description="Back up guests through the backup provider of STORAGE, "
        "like vzdump. Each guest gets a task log in <root>/var/log/vzdump/. "
        "Each guest is locked for the job; a guest that another backup or restore "
        "holds makes the job fail at once with exit status 7 ('locked by PID N'). "
        "What a killed earlier run of a guest left (processes, mounts, temporary "
        "files) is removed first, with a warning for each. "
        "Exit status 0 when every guest was backed up, 11 when some failed, "
        "130 when interrupted (SIGINT/SIGTERM), other codes as listed in "
        "'pvebackup --help'.",
    )
    p.add_argument("vmids", metavar="VMID", nargs="*", type=vmid_arg, help="guests to back up")
    p.add_argument("--all", action="store_true", help="back up every guest on the node")
    p.add_argument("--storage", required=True, metavar="STOREID", help="the backup storage")
    p.add_argument(
        "--bwlimit", type=_positive, metavar="KIB_PER_S", help="bandwidth limit in KiB/s"
    )
    p.add_argument(
        "--exclude-path",
        dest="exclude_paths",
        action="append",
        default=[],
        metavar="PATTERN",
        help="exclude files of containers (rsync-style pattern; repeatable)",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        help="for running VMs, as vzdump: snapshot (fleecing in the VM's QEMU while it runs;"
        " default; 'mode:' in <root>/etc/vzdump.conf changes it), suspend (paused during"
        " the set-up), stop (shut down, backed up offline,"
        " started again with --start-command). Stopped VMs are always backed up offline.",
    )
    p.add_argument(
        "--stop-wait",
        type=_positive,
        metavar="MINUTES",
        help="mode stop: minutes to wait for the guest to shut down"
        " (default: 'stopwait:' in vzdump.conf, else 10)",
    )
    p.add_argument(
        "--start-command",
        metavar="CMD",
        help="mode stop: the node's command starting a VM, the VMID appended"
        " (default: $PVEBACKUP_START_COMMAND, else 'qm start'; as restore --live)",
    )
    p.add_argument(
        "--fleecing",
        metavar="storage=STOREID",
        help="put the fleecing images of running VMs on this storage, any type that holds"
        " disk images; qcow2 where it can, else raw (default:"
        " 'fleecing: storage=ID' in vzdump.conf, else the run's private directory)",
    )
    p.add_argument(
        "--prune-backups",
        metavar="keep-last=N,...",
        help="after the job, prune the backed-up guests' backups on STORAGE with this"
        " retention (Proxmox VE syntax, as 'pvebackup prune'; default: the storage's"
        " prune-backups property, else keep all)",
    )
    p.add_argument(
        "--notes-template",
        metavar="TEMPLATE",
        help="after each guest's backup, set its notes from TEMPLATE, as vzdump:"
        " {{cluster}}, {{guestname}}, {{node}} and {{vmid}} are replaced, \\n is a"
        " newline and \\\\ a backslash; other variables or escapes are refused (exit 2)."
        " A failure to set the notes is a warning",
    )
    p.add_argument(
        "--protected",
        action="store_true",
        help="protect each new backup (as 'pvebackup protect') before any prune",
    )
    add_output_option(p)
    p.set_defaults(command=_from_args, usage_parser=p)


def _from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.all == bool(args.vmids):
        parser.error("give VMIDs or --all (not both)")
    opts = BackupOptions(
        root=args.root,
        storage=args.storage,
        vmids=None if args.all else list(args.vmids),
        bwlimit_kib=args.bwlimit,
        exclude_paths=list(args.exclude_paths),
        output=args.output,
        mode=args.mode,
        stop_wait=None if args.stop_wait is None else float(args.stop_wait),
        start_command=args.start_command,
        prune_backups=args.prune_backups,
        notes_template=args.notes_template,
        protected=args.protected,
    )
    if args.notes_template is not None:
        try:
            check_template(args.notes_template)
        except ValueError as exc:
            parser.error(f"backup: --notes-template: {exc}")
    if args.prune_backups is not None:
        try:
            parse_keep_options(args.prune_backups)
        except ValueError as exc:
            parser.error(f"backup: --prune-backups: {exc}")
    if args.fleecing is not None:
        key, _, value = args.fleecing.partition("=")
        if key != "storage" or not value:
            parser.error("backup: --fleecing wants storage=STOREID")
        opts.fleecing_storage = value
    return run(opts)


def _report(result: JobResult) -> str:
    rows = []
    for g in result.guests:
        status = "ok" if g.ok else "FAILED"
        rows.append(
            [
                str(g.vmid),
                str(g.vmtype or "-"),
                status,
                f"{g.seconds:.1f}s",
                human_size(g.size),
                g.target or "-",
            ]
        )
    return table(["VMID", "TYPE", "STATUS", "TIME", "SIZE", "TARGET"], rows)


def _json_report(result: JobResult) -> dict[str, object]:
    # Schema: docs/cli-json.md ("backup"). Sizes in bytes, never human.
    return {
        "storage": result.storeid,
        "start_time": result.start_time,
        "ok": not result.failed,
        "guests": [
            {
                "vmid": g.vmid,
                "vmtype": None if g.vmtype is None else str(g.vmtype),
                "ok": g.ok,
                "seconds": round(g.seconds, 3),
                "size": g.size,
                "target": g.target,
                "error": None if g.ok else str(g.error),
                "log": None if g.log_path is None else str(g.log_path),
            }
            for g in result.guests
        ],
    }


def run(opts: BackupOptions) -> int:
    """Run the job; print a report on stdout. Returns the exit status."""
    root = NodeRoot(opts.root)
    defaults = read_job_defaults(root)
    result = run_backup_job(
        root,
        opts.storage,
        opts.vmids,
        bwlimit_kib=opts.bwlimit_kib,
        exclude_paths=opts.exclude_paths,
        terminal=sys.stderr,
        mode=opts.mode or defaults.mode or "snapshot",
        stop_wait=opts.stop_wait or defaults.stop_wait or 10.0,
        start_command=vm_start_command(opts.start_command),
        fleecing_storage=opts.fleecing_storage or defaults.fleecing_storage,
    )
    if opts.output == "json":
        print_json(_json_report(result))
    else:
        print(_report(result), flush=True)
    code = _annotate_after(root, opts, result)
    code = _prune_after(root, opts, result) or code
    if result.failed:
        for g in result.failed:
            print(f"error: backup of {g.vmid} failed: {g.error}", file=sys.stderr)
        return GuestBackupError.exit_code
    return code


def _annotate_after(root: NodeRoot, opts: BackupOptions, result: JobResult) -> int:
    """Notes and protection of each new backup, before the prune (as vzdump).

    A note that cannot be set is a warning (vzdump's "unable to add notes"); a
    backup that cannot be protected is an error (vzdump fails the guest): a prune
    could remove what the operator asked to keep.
    """
    if opts.notes_template is None and not opts.protected:
        return 0
    scfg = storage_config(read_storage_config(root.storage_cfg), opts.storage)
    plugin = lookup(scfg["type"])
    cluster = _cluster_name(root)
    code = 0
    for g in result.guests:
        if not g.ok or g.target is None:
            continue
        storeid, volname = parse_volume_id(g.target)
        if opts.notes_template:
            values = {
                "cluster": cluster,
                "guestname": _guest_name(root, g.vmid, g.vmtype),
                "node": socket.gethostname().split(".", 1)[0],
                "vmid": str(g.vmid),
            }
            try:
                notes = render_template(opts.notes_template, values)
                plugin.update_volume_attribute(scfg, storeid, volname, "notes", notes)
            except (ValueError, PveBackupError) as exc:
                print(f"warning: {g.target}: unable to add notes - {exc}", file=sys.stderr)
        if opts.protected:
            try:
                plugin.update_volume_attribute(scfg, storeid, volname, "protected", True)
            except PveBackupError as exc:
                print(f"error: {g.target}: unable to set protected flag - {exc}", file=sys.stderr)
                code = code or exc.exit_code
    return code


def _guest_name(root: NodeRoot, vmid: int, vmtype: GuestType | None) -> str:
    """vzdump's ``guestname``: a VM's name, else ``VM <vmid>``; a container's
    hostname, else ``CT<vmid>``."""
    try:
        config = root.load_guest(vmid, vmtype)
    except PveBackupError:
        config = None
    if vmtype is GuestType.LXC:
        return (config.get("hostname") if config else None) or f"CT{vmid}"
    return (config.get("name") if config else None) or f"VM {vmid}"


_CLUSTER_NAME = re.compile(r"^\s*cluster_name\s*:\s*(\S+)\s*$", re.M)


def _cluster_name(root: NodeRoot) -> str:
    """The cluster's name from corosync.conf, else vzdump's ``standalone node``."""
    try:
        with (root.pve_dir / "corosync.conf").open("rb") as f:
            text = f.read(1 << 20).decode("utf-8", "replace")
    except OSError:
        return "standalone node"
    m = _CLUSTER_NAME.search(text)
    return m.group(1) if m else "standalone node"


def _prune_after(root: NodeRoot, opts: BackupOptions, result: JobResult) -> int:
    """Prune the guests backed up successfully, as vzdump does (a failed guest's old
    backups are all it has). On stderr, so that --output json stays the job's report.
    """
    done = [g.vmid for g in result.guests if g.ok]
    if not done:
        return 0
    given = None if opts.prune_backups is None else parse_keep_options(opts.prune_backups)
    try:
        _, pruned = prune_storage(root, opts.storage, given, vmids=done)
    except PveBackupError as exc:
        print(f"error: prune after backup failed: {exc}", file=sys.stderr)
        return exc.exit_code
    code = 0
    for r in pruned:
        if r.removed:
            print(f"INFO: prune: removed {r.volume.volid}", file=sys.stderr)
        elif r.reason:
            level = "error" if r.exit_code else "INFO"
            print(f"{level}: prune: kept {r.volume.volid}: {r.reason}", file=sys.stderr)
            code = code or r.exit_code
    return code
