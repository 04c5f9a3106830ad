"""Restores: qmrestore's and ``pct restore``'s role.

::

    restore_get_mechanism(volname, storeid)      -> (mechanism, vmtype)
    extract_guest_config, extract_firewall_config
    qemu-img:  restore_qemu_get_device_info; per disk in the backed-up config that
               the backup holds: allocate a qcow2 image of at least that size,
               restore_qemu_img_init -> path/URI, qemu-img convert -n,
               restore_qemu_img_cleanup (always)
    tar:       allocate subvols, restore_tar_init, extract, restore_tar_cleanup (always)
    directory: allocate subvols, restore_directory_init, copy,
               restore_directory_cleanup (always)
    write the new config (new vmid, new volume ids), then the firewall config

    --live (VMs): per disk the target's backing file is the provider's NBD URI
               (restore_qemu_img_init); the config is written, the node's start
               command starts the VM, block-stream copies every disk in the
               background (:mod:`pvebackup.host.qemu.liverestore`), then
               restore_qemu_img_cleanup

The backed-up config is hostile input: keys that grant host access (hookscript,
args, passthrough devices, host paths, raw ``lxc.*`` keys) are dropped with a
warning unless ``keep_host_access``, and a container's id map always comes from
the target, never from the backup (see :mod:`pvebackup.host.hostaccess`).

Guarantees: a running VM with the vmid is always refused (as qmrestore does); a
restore never starts a VM, except ``live``. An existing guest with the vmid is
refused without ``force``. The
restore fills *new* volumes; only when everything succeeded is the config written
(atomically, the commit point) and, with ``force``, the old guest's volumes
removed. A failed or interrupted restore frees every volume it allocated and
leaves existing guests untouched. A failed live restore stops the VM it started,
removes the config it wrote and frees its volumes.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from pvebackup.api.errors import (
    ExternalToolError,
    GuestConfigError,
    GuestExistsError,
    GuestRunningError,
    UnsupportedError,
    UsageError,
)
from pvebackup.api.provider import BackupProvider
from pvebackup.api.types import GuestType, IdMapEntry, RestoreMechanism
from pvebackup.host.guests import (
    CtConfig,
    GuestConfig,
    NodeRoot,
    VmConfig,
    format_size,
    parse_guest_config,
    write_config_file,
)
from pvebackup.host.hostaccess import restrict_config
from pvebackup.host.lxc.restore import copy_directory, extract_tar
from pvebackup.host.netident import (
    identity_replacements,
    mac_addresses,
    mac_prefix,
    shared_macs,
)
from pvebackup.host.progress import ProgressDisplay, wants_bar
from pvebackup.host.qemu import liverestore
from pvebackup.host.restoresource import (
    convert_progress,
    describe,
    device_size,
    paired,
    qemu_img_convert,
    restore_mechanism,
)
from pvebackup.host.restoretarget import RestoreTargets
from pvebackup.host.runstate import GuestRun
from pvebackup.host.signals import abort_on_signals
from pvebackup.host.tasklog import LogRouter
from pvebackup.kit.crashpoint import crash_point
from pvebackup.storage import (
    StorageConfig,
    new_backup_provider,
    parse_volume_id,
    read_storage_config,
    storage_config,
)

__all__ = ["RestoreResult", "run_restore"]

_VMTYPE_OF = {
    RestoreMechanism.QEMU_IMG: GuestType.QEMU,
    RestoreMechanism.TAR: GuestType.LXC,
    RestoreMechanism.DIRECTORY: GuestType.LXC,
}
_DROP_KEYS = ("parent", "lock")


@dataclass
class RestoreResult:
    """What a successful restore created."""

    vmid: int
    vmtype: GuestType
    config_path: Path
    volumes: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def run_restore(
    root: NodeRoot,
    volid: str,
    vmid: int,
    *,
    target_storage: str | None = None,
    force: bool = False,
    keep_host_access: bool = False,
    live: bool = False,
    start_command: Sequence[str] | None = None,
    bwlimit_kib: int | None = None,
    terminal: TextIO | None = sys.stderr,
    unique: bool = False,
    storage_map: Mapping[str, str] | None = None,
) -> RestoreResult:
    """Restore backup ``volid`` (``STOREID:VOLNAME``) as guest ``vmid``.

    :param target_storage: a ``dir`` storage for the new volumes (default: the
        storage each volume had, if it is a ``dir`` storage, else the first one).
    :param force: replace an existing guest ``vmid`` (after the restore succeeded).
    :param live: (VMs) start the VM at once, reading through from the backup while
        the data is copied in the background; needs a provider whose restore
        source is a NBD URI, and a new ``vmid`` (not with ``force``).
    :param start_command: argv that starts a VM when the VMID is appended
        (default :func:`liverestore.start_command`: ``qm start``).
    :param bwlimit_kib: KiB/s per disk: ``qemu-img convert -r`` (VMs), the
        background copy of a live restore; for containers the bytes read from the
        archive or directory.
    :param unique: new MAC addresses (and a new SMBIOS uuid for VMs), as
        ``qmrestore --unique``; without it a warning names other guests of the node
        that use the restored MACs. ``vmgenid`` is always new (qmrestore's rule).
    :param storage_map: disk or mount point key -> dir storage for its new volume
        (``--map scsi0=STORE``); others go to ``target_storage`` or their own.
    :param keep_host_access: keep the backed-up config's keys that grant host
        access (each logged); without it they are dropped with a warning.
        ``lxc.idmap`` is never restored from a backup.
    :raises GuestExistsError: guest ``vmid`` exists and ``force`` is not set, or
        it is a guest of the other type (never replaced, also with ``force``).
    :raises LockedError: another backup or restore of ``vmid`` runs (exit 7).
    :raises GuestRunningError: ``vmid`` is a running VM (exit 7), also with ``force``.
    :raises UnsupportedError: the storage has no provider, or the mechanism does
        not fit the guest type.
    :raises AbortedError: SIGINT/SIGTERM; everything created was removed.
    :raises PveBackupError: anything else that failed; everything created was removed.
    """
    if bwlimit_kib is not None and bwlimit_kib <= 0:
        raise UsageError(f"bandwidth limit must be positive, not {bwlimit_kib}")
    if live and force:
        raise UsageError("a live restore needs a new VMID; it cannot be combined with --force")
    log = LogRouter(terminal)
    if wants_bar(terminal):
        assert terminal is not None
        log.display = ProgressDisplay(terminal)
    try:
        if log.display is not None:
            log.display.start()
        return _run_restore(
            root, volid, vmid, log,
            target_storage=target_storage, force=force, keep_host_access=keep_host_access,
            live=live, start_command=start_command, bwlimit_kib=bwlimit_kib,
            unique=unique, storage_map=storage_map,
        )
    finally:
        display, log.display = log.display, None
        if display is not None:
            display.stop()


def _run_restore(
    root: NodeRoot,
    volid: str,
    vmid: int,
    log: LogRouter,
    *,
    target_storage: str | None,
    force: bool,
    keep_host_access: bool,
    live: bool,
    start_command: Sequence[str] | None,
    bwlimit_kib: int | None,
    unique: bool,
    storage_map: Mapping[str, str] | None,
) -> RestoreResult:
    cfg = read_storage_config(root.storage_cfg)
    storeid, volname = parse_volume_id(volid)
    scfg = storage_config(cfg, storeid)
    # The guest lock first: it also frees what a killed restore of vmid allocated.
    with GuestRun(root, vmid, action="restore", log=log, cfg=cfg) as guest_run:
        pid = liverestore.running_vm_pid(root, vmid)
        if pid is not None:
            # Its disks are in use by a live QEMU: replacing them under it (or next
            # to it) would corrupt the guest, as qmrestore knows.
            raise GuestRunningError(f"VM {vmid} is running (PID {pid}); stop it first")
        old_type = root.guest_type(vmid)
        if old_type is not None and not force:
            raise GuestExistsError(
                f"guest {vmid} exists already ({old_type}); use --force to replace it"
            )
        old_config = root.load_guest(vmid, old_type) if old_type is not None else None
        provider = new_backup_provider(cfg, storeid, log)
        if provider is None:
            raise UnsupportedError(
                f"storage '{storeid}' (type {scfg.get('type')}) has no backup provider"
            )
        with abort_on_signals(), guest_run.recording():
            run = _Restore(
                root, cfg, provider, storeid, volname, vmid, target_storage, log, guest_run,
                storage_map=storage_map,
            )
            run.keep_host_access = keep_host_access
            run.unique = unique
            run.existing_type = old_type
            run.rate = (bwlimit_kib or 0) * 1024
            if live:
                run.live = True
                run.start_command = list(start_command or liverestore.start_command())
                run.live_speed = (bwlimit_kib or 0) * 1024
            if isinstance(old_config, CtConfig):
                run.target_id_map = old_config.explicit_id_map
            result = run.restore()
            if old_config is not None:
                run.remove_old_guest(old_config, result)
    return result


class _Restore:
    def __init__(
        self,
        root: NodeRoot,
        cfg: StorageConfig,
        provider: BackupProvider,
        storeid: str,
        volname: str,
        vmid: int,
        target_storage: str | None,
        log: LogRouter,
        guest_run: GuestRun,
        *,
        storage_map: Mapping[str, str] | None = None,
    ) -> None:
        self.guest_run = guest_run
        self.root = root
        self.cfg = cfg
        self.provider = provider
        self.storeid = storeid
        self.volname = volname
        self.vmid = vmid
        self.log = log
        self.keep_host_access = False
        self.target_id_map: tuple[IdMapEntry, ...] = ()
        self.live = False
        self.start_command: list[str] = []
        self.live_speed = 0
        self.live_disks: list[liverestore.LiveDisk] = []
        self.live_sources: list[str] = []  # devicenames whose restore source is open
        self.unique = False
        self.existing_type: GuestType | None = None
        self.rate = 0  # bytes/s per disk, 0: unlimited
        self.targets = RestoreTargets(
            cfg, vmid, log, guest_run, target_storage, dict(storage_map or {})
        )

    # -- the restore -----------------------------------------------------------------

    def restore(self) -> RestoreResult:
        written: Path | None = None
        live_done = False
        try:
            mechanism, vmtype = restore_mechanism(
                self.provider.restore_get_mechanism(self.volname, self.storeid)
            )
            if _VMTYPE_OF[mechanism] != vmtype:
                raise UnsupportedError(
                    f"restore mechanism '{mechanism}' does not fit guest type '{vmtype}'"
                )
            if self.existing_type is not None and self.existing_type != vmtype:
                # As Proxmox VE: --force replaces a guest, never turns a VM into a
                # container (its disks, HA and firewall settings mean another thing).
                kinds = {GuestType.QEMU: "VM", GuestType.LXC: "CT"}
                raise GuestExistsError(
                    f"unable to restore {kinds[vmtype]} {self.vmid} -"
                    f" {kinds[self.existing_type]} {self.vmid} already exists"
                    " (--force does not replace a guest of the other type)"
                )
            if self.live and vmtype != GuestType.QEMU:
                raise UnsupportedError("live restore is for VMs; this backup is a container")
            self.targets.check_storages()  # fail before any data moves
            text = self.provider.extract_guest_config(self.volname, self.storeid)
            where = f"{self.storeid}:{self.volname} (guest config)"
            config = restrict_config(
                parse_guest_config(text, self.vmid, vmtype, where=where),
                keep_host_access=self.keep_host_access,
                target_id_map=self.target_id_map,
                log=self.log,
            )
            self.targets.check_map(
                [d.key for d in config.disks] if isinstance(config, VmConfig)
                else [m.key for m in config.mountpoints] if isinstance(config, CtConfig)
                else []
            )
            firewall = self.provider.extract_firewall_config(self.volname, self.storeid)
            identity = identity_replacements(
                config,
                unique=self.unique,
                prefix=mac_prefix(self.root, self.log.warn) if self.unique else "",
            )
            if not self.unique:
                self._warn_shared_macs(config)
            if isinstance(config, VmConfig):
                replace = self._restore_vm(config)
            elif isinstance(config, CtConfig):
                replace = self._restore_ct(config, mechanism)
            else:  # pragma: no cover
                raise GuestConfigError("unexpected guest config", path=where)
            for entry in config.entries:
                if entry.key in _DROP_KEYS or entry.key.startswith("unused"):
                    replace[entry.key] = None
            replace.update(identity)
            path = self.root.config_path(self.vmid, vmtype)
            crash_point("restore-before-config")
            if self.live:
                written = path
                self.guest_run.add_config(path)
            write_config_file(path, config.render(replace))
            if self.live:
                self._go_live()
                # Committed: the VM runs on complete disks; from here on nothing is
                # taken away from it (a signal now only skips the source clean-up).
                live_done = True
                self.guest_run.drop_config(path)
                self._close_live_sources()
        except BaseException as exc:
            self.log.err(f"restore failed: {describe(exc)}")
            if live_done:
                raise
            if written is not None:
                # The VM that used it is stopped (liverestore stops it on failure).
                written.unlink(missing_ok=True)
            self._close_live_sources()
            self.targets.free_created()
            raise
        self._write_firewall(firewall)
        return RestoreResult(self.vmid, vmtype, path, list(self.targets.created))

    def _warn_shared_macs(self, config: GuestConfig) -> None:
        for other, macs in sorted(shared_macs(self.root, self.vmid, mac_addresses(config)).items()):
            self.log.warn(
                f"guest {other} uses the same MAC address{'es' if len(macs) > 1 else ''}"
                f" ({', '.join(sorted(macs))}): running both on one network breaks it;"
                " restore with --unique for new ones"
            )

    def _restore_vm(self, config: VmConfig) -> dict[str, str | None]:
        info = self.provider.restore_qemu_get_device_info(self.volname, self.storeid)
        replace: dict[str, str | None] = {}
        known = {d.devicename for d in config.disks}
        for devicename in info:
            if devicename not in known:
                self.log.warn(f"{devicename} is in the backup but not in its config; skipped")
        for disk in config.disks:
            if disk.devicename not in info:
                if disk.spec.volid is None or disk.reason == "CD-ROM drive":
                    continue  # none, CD-ROMs and passthrough devices stay as they are
                why = f" ({disk.reason})" if disk.reason else ""
                self.log.warn(
                    f"{disk.key} ({disk.spec.volume}) is not in the backup{why};"
                    " dropped from the restored config"
                )
                replace[disk.key] = None
                continue
            size = device_size(info[disk.devicename], disk.devicename)
            volid, volume, zeroed = self.targets.alloc_image(
                disk.spec.storeid, size, disk.key, live=self.live
            )
            self.log.info(f"{disk.devicename}: restoring {format_size(size)} into {volid}")
            init = functools.partial(
                self.provider.restore_qemu_img_init, self.volname, self.storeid, disk.devicename
            )
            cleanup = functools.partial(
                self.provider.restore_qemu_img_cleanup, self.volname, self.storeid,
                disk.devicename,
            )
            if self.live:
                # Listed before the init: _close_live_sources then runs the cleanup
                # also when the init itself fails (the seed: "in both" scenarios).
                self.live_sources.append(disk.devicename)
                source = init()
                path = Path(volume.path)
                liverestore.set_backing(path, str(source))
                self.live_disks.append(liverestore.LiveDisk(disk.devicename, path))
                replace[disk.key] = disk.spec.render(volume=volid, size=format_size(size))
                continue
            with paired(self.log, "restore_qemu_img", init, cleanup) as source:
                qemu_img_convert(
                    str(source),
                    volume.qemu_name(),
                    convert_progress(self.log, disk.devicename, size),
                    target_fmt=volume.format,
                    target_is_zero=zeroed,
                    interval=0.0,
                    rate=self.rate,
                )
            replace[disk.key] = disk.spec.render(volume=volid, size=format_size(size))
        return replace

    def _go_live(self) -> None:
        """Start the VM on the read-through targets and copy everything (the sources
        are closed by the caller only then: until the copy ended, the VM reads them)."""
        liverestore.live_restore(
            self.root,
            self.vmid,
            self.live_disks,
            self.start_command,
            speed=self.live_speed,
            log=self.log,
            observer=self.guest_run,
        )

    def _close_live_sources(self) -> None:
        while self.live_sources:
            devicename = self.live_sources.pop()
            try:
                self.provider.restore_qemu_img_cleanup(self.volname, self.storeid, devicename)
            except Exception as exc:
                self.log.err(f"{devicename}: restore cleanup failed: {describe(exc)}")

    def _restore_ct(self, config: CtConfig, mechanism: RestoreMechanism) -> dict[str, str | None]:
        replace: dict[str, str | None] = {}
        targets: dict[str, Path] = {}
        for mp in config.mountpoints:
            if not mp.included:
                if mp.spec.volid is not None:
                    self.log.warn(
                        f"{mp.key} ({mp.ct_path}) was not backed up ({mp.reason});"
                        " dropped from the restored config"
                    )
                    replace[mp.key] = None
                continue
            volid, path = self.targets.alloc_subvol(mp.spec.storeid, mp.key)
            targets[mp.ct_path] = path
            replace[mp.key] = mp.spec.render(volume=volid)
            self.log.info(f"{mp.key} ({mp.ct_path}): restoring into {volid}")
        id_map = config.id_map()
        vol, sid = self.volname, self.storeid
        if mechanism == RestoreMechanism.TAR:
            with paired(
                self.log,
                "restore_tar",
                lambda: self.provider.restore_tar_init(vol, sid),
                lambda: self.provider.restore_tar_cleanup(vol, sid),
            ) as archive:
                extract_tar(Path(archive), targets, id_map, log=self.log, rate=self.rate)
        else:
            with paired(
                self.log,
                "restore_directory",
                lambda: self.provider.restore_directory_init(vol, sid),
                lambda: self.provider.restore_directory_cleanup(vol, sid),
            ) as source:
                copy_directory(Path(source), targets, id_map, log=self.log, rate=self.rate)
        return replace

    # -- cleanup and replacement ---------------------------------------------------

    def _write_firewall(self, firewall: str | None) -> None:
        path = self.root.firewall_path(self.vmid)
        try:
            if firewall is not None:
                write_config_file(path, firewall)
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            raise ExternalToolError(
                f"guest {self.vmid} restored, but its firewall config {path} could not be"
                f" written: {exc}"
            ) from exc

    def remove_old_guest(self, old: GuestConfig, result: RestoreResult) -> None:
        """After a successful restore with --force: drop the replaced guest's leftovers."""
        if old.vmtype != result.vmtype:
            self.root.config_path(self.vmid, old.vmtype).unlink(missing_ok=True)
        assert isinstance(old, VmConfig | CtConfig)
        result.removed.extend(self.targets.free_replaced(old.volume_ids(), result.volumes))
