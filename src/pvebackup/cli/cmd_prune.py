"""``pvebackup prune``: remove the backups a retention policy no longer keeps, per guest."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvebackup.api.errors import (
    LockedError,
    PveBackupError,
    UsageError,
    VolumeInUseError,
    VolumeProtectedError,
)
from pvebackup.cli.common import vmid_arg
from pvebackup.cli.output import add_output_option, print_json, table, utc_time
from pvebackup.host.guests import NodeRoot
from pvebackup.host.runstate import GuestRun
from pvebackup.kit.prune import (
    KeepOptions,
    Mark,
    PruneCandidate,
    format_keep_options,
    mark_prune,
    parse_keep_options,
)
from pvebackup.storage import (
    VolumeInfo,
    lookup,
    read_storage_config,
    remove_backup_volume,
    storage_config,
)

__all__ = [
    "PruneOptions",
    "PruneResult",
    "add_parser",
    "keep_options",
    "prune_storage",
    "prune_volumes",
    "run",
]

_KEEPS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


@dataclass
class PruneOptions:
    root: Path
    storage: str
    vmid: int | None = None
    keep: dict[str, int] = field(default_factory=dict)
    dry_run: bool = False
    output: str = "text"


@dataclass
class PruneResult:
    """What prune did (or, dry run, would do) with one volume."""

    volume: VolumeInfo
    mark: Mark
    removed: bool = False
    reason: str = ""
    exit_code: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "volid": self.volume.volid,
            "vmid": self.volume.vmid,
            "vmtype": str(self.volume.vmtype),
            "ctime": self.volume.ctime,
            "mark": str(self.mark.value),
            "removed": self.removed,
            "reason": self.reason,
        }


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "prune",
        help="remove backups a retention policy no longer keeps",
        description="Apply a retention policy to the backups on STOREID, per guest, "
        "with Proxmox Backup Server's semantics: newest first, keep-last, then one "
        "backup per hour, day, ISO week, month and year; a period already covered by "
        "an earlier option is skipped, not counted; periods in local time (TZ). "
        "Protected backups (pvebackup protect) are never removed and use no slot. "
        "Without --keep-* options the storage's 'prune-backups' property applies; "
        "with none at all, everything is kept. A backup another backup depends on "
        "(an incremental chain's base on backup-dir; a running backup's base) is kept, "
        "and the reason shown. Each guest is pruned under its lock: while it is being "
        "backed up or restored its backups are kept (exit 7). "
        "Exit status 0; otherwise the code of the first removal that failed, as listed "
        "in 'pvebackup --help' (the others are still tried).",
    )
    p.add_argument("storage", metavar="STOREID", help="the backup storage")
    p.add_argument("--vmid", type=vmid_arg, help="prune this guest's backups only")
    for name in _KEEPS:
        p.add_argument(
            f"--keep-{name}",
            type=_count,
            default=None,
            metavar="N",
            help=f"keep the newest backup of the last N {name} periods"
            if name != "last"
            else "keep the N newest backups",
        )
    p.add_argument("--dry-run", action="store_true", help="only show what would be removed")
    add_output_option(p)
    p.set_defaults(command=_from_args, usage_parser=p)


def _count(text: str) -> int:
    if not text.isdigit() or len(text) > 9:
        raise argparse.ArgumentTypeError(f"invalid count {text[:20]!r}: not a number >= 0")
    return int(text)


def _from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    keep = {
        name: getattr(args, f"keep_{name}")
        for name in _KEEPS
        if getattr(args, f"keep_{name}") is not None
    }
    return run(PruneOptions(args.root, args.storage, args.vmid, keep, args.dry_run, args.output))


def prune_volumes(
    volumes: list[VolumeInfo],
    options: KeepOptions,
    remove: Callable[[str], None],
    *,
    vmids: Collection[int] | None = None,
    dry_run: bool = False,
    children_need_parent: bool = True,
    lock_guest: Callable[[int], AbstractContextManager[object]] | None = None,
) -> list[PruneResult]:
    """Mark each guest's backups and remove those marked (``remove(volid)``), newest first.

    Newest first so that, on an incremental chain, the children go before their base.
    With ``children_need_parent`` (the storage's plugin says so), a base whose
    dependents stay is kept instead of removed: removing it would leave a child
    without its base (``backup-dir`` refuses anyway; this names the reason up front
    so that a dry run says the same as the real run). Elsewhere a refusal of the
    provider (:class:`VolumeInUseError`) keeps the volume, with its message.

    ``lock_guest(vmid)``: taken before the first removal of a guest's backups and held
    until all are done, so a prune never races a backup or restore of that guest
    (the host's per-guest lock); refused (:class:`LockedError`), that guest's
    removals are skipped with the holder named and the lock's exit code.
    """
    groups: dict[tuple[str, int], list[VolumeInfo]] = {}
    for v in volumes:
        if vmids is None or v.vmid in vmids:
            groups.setdefault((str(v.vmtype), v.vmid), []).append(v)
    results: list[PruneResult] = []
    for _, group in sorted(groups.items()):
        marks = mark_prune(
            [PruneCandidate(v.volid, v.ctime, v.protected) for v in group], options, None
        )
        results += [PruneResult(v, marks[v.volid]) for v in group]
    results.sort(key=lambda r: (r.volume.ctime, r.volume.volid), reverse=True)
    gone: set[str] = set()
    locks = ExitStack()
    busy: dict[int, PveBackupError | None] = {}
    with locks:
        for r in results:
            _prune_one(r, results, gone, remove, dry_run, children_need_parent,
                       lambda vmid: _take(locks, busy, lock_guest, vmid))
    return results


def _take(
    locks: ExitStack,
    busy: dict[int, PveBackupError | None],
    lock_guest: Callable[[int], AbstractContextManager[object]] | None,
    vmid: int,
) -> PveBackupError | None:
    """The guest's lock, taken once per prune run; the error if it is held."""
    if lock_guest is None:
        return None
    if vmid not in busy:
        try:
            locks.enter_context(lock_guest(vmid))
            busy[vmid] = None
        except LockedError as exc:
            busy[vmid] = exc
    return busy[vmid]


def _prune_one(
    r: PruneResult,
    results: list[PruneResult],
    gone: set[str],
    remove: Callable[[str], None],
    dry_run: bool,
    children_need_parent: bool,
    take: Callable[[int], PveBackupError | None],
) -> None:
    if r.mark is not Mark.REMOVE:
        return
    volname = r.volume.volid.split(":", 1)[1]
    dependents = sorted(
        o.volume.volid
        for o in results
        # a base is named by volname; only a volume that stays still needs it
        if o.volume.parent == volname and o.volume.volid not in gone
    )
    if dependents and children_need_parent:
        r.reason = "base of " + ", ".join(dependents)
        return
    if dry_run:
        gone.add(r.volume.volid)
        return
    locked = take(r.volume.vmid)
    if locked is not None:
        r.reason = f"not removed: {locked}"
        r.exit_code = locked.exit_code
        return
    try:
        remove(r.volume.volid)
    except (VolumeInUseError, VolumeProtectedError) as exc:  # protected since the scan
        r.reason = str(exc)
        return
    except PveBackupError as exc:
        r.reason = str(exc)
        r.exit_code = exc.exit_code
        return
    r.removed = True
    gone.add(r.volume.volid)


def keep_options(keep: dict[str, int]) -> KeepOptions:
    """``{"last": 3, "daily": 7}`` (the ``--keep-*`` given) as :class:`KeepOptions`."""
    return KeepOptions(
        last=keep.get("last", 0),
        hourly=keep.get("hourly", 0),
        daily=keep.get("daily", 0),
        weekly=keep.get("weekly", 0),
        monthly=keep.get("monthly", 0),
        yearly=keep.get("yearly", 0),
    )


def prune_storage(
    root: NodeRoot,
    storeid: str,
    options: KeepOptions | None,
    *,
    vmids: Collection[int] | None = None,
    dry_run: bool = False,
    default: KeepOptions | None = None,
) -> tuple[KeepOptions, list[PruneResult]]:
    """Prune the guests ``vmids`` (None: all) on ``storeid``.

    ``options`` None: the storage's ``prune-backups`` property, else ``default``
    (vzdump.conf's, for backup jobs), else keep all.
    """
    cfg = read_storage_config(root.storage_cfg)
    scfg = storage_config(cfg, storeid)
    plugin = lookup(scfg["type"])
    if options is None and default is not None and "prune-backups" not in scfg:
        options = default
    if options is None:
        try:
            options = parse_keep_options(scfg.get("prune-backups", ""))
        except ValueError as exc:
            raise UsageError(f"storage {storeid}: prune-backups: {exc}") from exc
    if not options.keeps_something() or options.keep_all:
        # nothing to remove: do not even read the storage
        return options, []
    scan = plugin.scan_volumes(scfg, storeid)
    for bad in scan.damaged:
        print(f"warning: {bad.volid}: damaged, left alone: {bad.reason}", file=sys.stderr)

    def remove(volid: str) -> None:
        remove_backup_volume(plugin, scfg, storeid, volid.split(":", 1)[1])

    def lock_guest(vmid: int) -> GuestRun:
        # The lock of backups and restores of the guest; entering it also cleans up
        # after a killed holder, as any next holder does.
        return GuestRun(root, vmid, action="prune", log=_stderr_log, cfg=cfg)

    return options, prune_volumes(
        scan.volumes,
        options,
        remove,
        vmids=vmids,
        dry_run=dry_run,
        children_need_parent=plugin.children_need_parent,
        lock_guest=lock_guest,
    )


def _stderr_log(level: str, msg: str) -> None:
    print(f"{level}: {msg}", file=sys.stderr)


def run(opts: PruneOptions) -> int:
    options, results = prune_storage(
        NodeRoot(opts.root),
        opts.storage,
        keep_options(opts.keep) if opts.keep else None,
        vmids=None if opts.vmid is None else [opts.vmid],
        dry_run=opts.dry_run,
    )
    code = next((r.exit_code for r in results if r.exit_code), 0)
    if opts.output == "json":
        print_json(
            {
                "dry_run": opts.dry_run,
                "options": format_keep_options(options),
                "volumes": [r.to_json() for r in results],
            }
        )
        return code
    rows = [
        [
            r.volume.volid,
            utc_time(r.volume.ctime),
            _action(r, opts.dry_run),
            r.reason or "",
        ]
        for r in results
    ]
    print(f"prune {opts.storage} ({format_keep_options(options) or 'keep everything'})")
    if rows:
        print(table(["VOLID", "TIME (UTC)", "ACTION", "REASON"], rows))
    return code


def _action(r: PruneResult, dry_run: bool) -> str:
    if r.mark is Mark.REMOVE:
        if r.removed:
            return "removed"
        if r.reason:
            return "kept" if not r.exit_code else "failed"
        return "would remove" if dry_run else "removed"
    return str(r.mark.value)
