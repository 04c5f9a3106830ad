"""``pvebackup backup``: run a backup job (vzdump's role)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pvebackup.api.errors import GuestBackupError, PveBackupError, UsageError
from pvebackup.api.types import GuestType
from pvebackup.cli.cmd_prune import prune_storage
from pvebackup.cli.common import vmid_arg
from pvebackup.cli.output import add_output_option, human_size, print_json, table
from pvebackup.host.defaults import (
    MAIL_POLICIES,
    STD_EXCLUDES,
    JobDefaults,
    read_job_defaults,
)
from pvebackup.host.guests import NodeRoot
from pvebackup.host.job import MODES, JobResult, run_backup_job
from pvebackup.host.mail import MailSettings, send_job_mail
from pvebackup.host.qemu.liverestore import start_command as vm_start_command
from pvebackup.kit.notestemplate import check_template, render_template
from pvebackup.kit.prune import parse_keep_options
from pvebackup.storage import lookup, parse_volume_id, read_storage_config, storage_config

__all__ = ["BackupOptions", "add_parser", "run"]


@dataclass
class BackupOptions:
    root: Path
    storage: str | None  # None: 'storage:' of ROOT/etc/vzdump.conf
    vmids: list[int] | None  # None: every guest (--all)
    bwlimit_kib: int | None = None  # None: vzdump.conf; 0: unlimited
    exclude_paths: list[str] = field(default_factory=list)
    stdexcludes: bool | None = None  # None: vzdump.conf, else on
    output: str = "text"
    mode: str | None = None  # None: ROOT/etc/vzdump.conf, else snapshot
    stop_wait: float | None = None  # None: ROOT/etc/vzdump.conf, else 10 minutes
    start_command: str | None = None  # None: $PVEBACKUP_START_COMMAND, else qm start
    fleecing_storage: str | None = None
    prune_backups: str | None = None  # None: the storage's prune-backups, else vzdump.conf's
    mailto: list[str] | None = None  # None: vzdump.conf
    mail_policy: str | None = None  # None: vzdump.conf, else always
    notes_template: str | None = None  # None: vzdump.conf's notes-template
    protected: bool = False


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {value}")
    return value


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean (0 or 1): {text!r}")


def _kib_per_s(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {value}")
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
        "Defaults come from <root>/etc/vzdump.conf, as vzdump's (storage, mode, "
        "stopwait, bwlimit, exclude-path, prune-backups, notes-template, mailto, "
        "mailnotification, fleecing, performance); options given here win. "
        "With mailto set, the job summary is mailed through the local sendmail "
        "(mailnotification failure: only when something failed). "
        "Exit status 0 when every guest was backed up, 11 when some failed, "
        "130 when interrupted (SIGINT/SIGTERM), other codes as listed in "
        "'pvebackup --help'.",
    )
    p.add_argument("vmids", metavar="VMID", nargs="*", type=vmid_arg, help="guests to back up")
    p.add_argument("--all", action="store_true", help="back up every guest on the node")
    p.add_argument(
        "--storage",
        metavar="STOREID",
        help="the backup storage (default: 'storage:' in vzdump.conf)",
    )
    p.add_argument(
        "--bwlimit",
        type=_kib_per_s,
        metavar="KIB_PER_S",
        help="bandwidth limit in KiB/s, 0 for none (default: 'bwlimit:' in vzdump.conf)",
    )
    p.add_argument(
        "--exclude-path",
        dest="exclude_paths",
        action="append",
        default=[],
        metavar="PATTERN",
        help="exclude files of containers (rsync-style pattern; repeatable; added to"
        " 'exclude-path:' of vzdump.conf, as vzdump does)",
    )
    p.add_argument(
        "--stdexcludes",
        type=_boolean,
        metavar="0|1",
        help="leave /tmp/?*, /var/tmp/?* and /var/run/?*.pid out of containers"
        " (default: 'stdexcludes:' in vzdump.conf, else 1, as vzdump)",
    )
    p.add_argument(
        "--mailto",
        action="append",
        metavar="ADDRESS",
        help="mail the job summary here through sendmail (repeatable; default:"
        " 'mailto:' in vzdump.conf)",
    )
    p.add_argument(
        "--mailnotification",
        choices=MAIL_POLICIES,
        help="when to mail: always (default) or on failure only",
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
        " prune-backups property, else vzdump.conf's, else keep all)",
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
        stdexcludes=args.stdexcludes,
        output=args.output,
        mode=args.mode,
        stop_wait=None if args.stop_wait is None else float(args.stop_wait),
        start_command=args.start_command,
        prune_backups=args.prune_backups,
        mailto=args.mailto,
        mail_policy=args.mailnotification,
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


def apply_defaults(opts: BackupOptions, defaults: JobDefaults) -> BackupOptions:
    """``opts`` completed from vzdump.conf: what the command line left unset.

    As vzdump: exclude paths of both are used (the file's first); ``prune-backups``
    of the file ranks below the storage's own property (see :func:`_prune_after`).

    :raises UsageError: neither ``--storage`` nor ``storage:`` names a storage.
    """
    storage = opts.storage or defaults.storage
    if storage is None:
        raise UsageError(
            "backup: no --storage given and no 'storage:' in vzdump.conf"
        )
    bwlimit = opts.bwlimit_kib if opts.bwlimit_kib is not None else defaults.bwlimit_kib
    stdexcludes = next(
        (v for v in (opts.stdexcludes, defaults.stdexcludes) if v is not None), True
    )
    return dataclasses.replace(
        opts,
        storage=storage,
        bwlimit_kib=bwlimit or None,  # 0: unlimited, as vzdump
        # vzdump's order: the file's, the command line's, then the standard ones.
        exclude_paths=[
            *defaults.exclude_paths,
            *opts.exclude_paths,
            *(STD_EXCLUDES if stdexcludes else ()),
        ],
        mode=opts.mode or defaults.mode or "snapshot",
        stop_wait=opts.stop_wait or defaults.stop_wait or 10.0,
        fleecing_storage=opts.fleecing_storage or defaults.fleecing_storage,
        mailto=opts.mailto if opts.mailto is not None else list(defaults.mailto),
        mail_policy=opts.mail_policy or defaults.mail_policy or "always",
        notes_template=(
            opts.notes_template if opts.notes_template is not None else defaults.notes_template
        ),
    )


def _cmdline(opts: BackupOptions) -> str:
    guests = " ".join(map(str, opts.vmids)) if opts.vmids is not None else "--all"
    return f"pvebackup backup {guests} --storage {opts.storage}"


def run(opts: BackupOptions) -> int:
    """Run the job; print a report on stdout. Returns the exit status."""
    root = NodeRoot(opts.root)
    defaults = read_job_defaults(root)
    for warning in defaults.warnings:
        print(f"WARN: {warning}", file=sys.stderr)
    for note in defaults.notes:
        print(f"INFO: {note}", file=sys.stderr)
    opts = apply_defaults(opts, defaults)
    assert opts.storage is not None
    mail = MailSettings(
        tuple(opts.mailto or ()), opts.mail_policy or "always",
        defaults.notification_mode or "auto",
    )
    started = time.monotonic()
    try:
        result = run_backup_job(
            root,
            opts.storage,
            opts.vmids,
            bwlimit_kib=opts.bwlimit_kib,
            exclude_paths=opts.exclude_paths,
            terminal=sys.stderr,
            mode=opts.mode or "snapshot",
            stop_wait=opts.stop_wait or 10.0,
            start_command=vm_start_command(opts.start_command),
            fleecing_storage=opts.fleecing_storage,
        )
    except PveBackupError as exc:
        # vzdump mails a job that failed as a whole too (mailnotification failure).
        empty = JobResult(opts.storage, "", int(time.time()))
        send_job_mail(mail, empty, total_seconds=time.monotonic() - started,
                      cmdline=_cmdline(opts), log=_stderr_log, error=str(exc), root=root)
        raise
    send_job_mail(mail, result, total_seconds=time.monotonic() - started,
                  cmdline=_cmdline(opts), log=_stderr_log, root=root)
    if opts.output == "json":
        print_json(_json_report(result))
    else:
        print(_report(result), flush=True)
    code = _annotate_after(root, opts, result)
    code = _prune_after(root, opts, result, defaults.prune_backups) or code
    if result.failed:
        for g in result.failed:
            print(f"error: backup of {g.vmid} failed: {g.error}", file=sys.stderr)
        return GuestBackupError.exit_code
    return code


def _stderr_log(level: str, message: str) -> None:
    label = {"info": "INFO", "warn": "WARN", "err": "ERROR"}.get(level, level.upper())
    print(f"{label}: {message}", file=sys.stderr, flush=True)


def _annotate_after(root: NodeRoot, opts: BackupOptions, result: JobResult) -> int:
    """Notes and protection of each new backup, before the prune (as vzdump).

    A note that cannot be set is a warning (vzdump's "unable to add notes"); a
    backup that cannot be protected is an error (vzdump fails the guest): a prune
    could remove what the operator asked to keep.
    """
    if opts.notes_template is None and not opts.protected:
        return 0
    assert opts.storage is not None  # apply_defaults made sure
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


def _prune_after(
    root: NodeRoot, opts: BackupOptions, result: JobResult, fallback: str | None = None
) -> int:
    """Prune the guests backed up successfully, as vzdump does (a failed guest's old
    backups are all it has). On stderr, so that --output json stays the job's report.
    """
    done = [g.vmid for g in result.guests if g.ok]
    if not done:
        return 0
    given = None if opts.prune_backups is None else parse_keep_options(opts.prune_backups)
    default = None if fallback is None else parse_keep_options(fallback)
    assert opts.storage is not None
    try:
        _, pruned = prune_storage(root, opts.storage, given, vmids=done, default=default)
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
