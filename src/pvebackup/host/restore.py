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
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from pvebackup.api.errors import (
    ExternalToolError,
    GuestConfigError,
    GuestExistsError,
    GuestRunningError,
    IntegrityError,
    PluginError,
    PveBackupError,
    StorageNotFoundError,
    StorageUnavailableError,
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
from pvebackup.host.runstate import GuestRun
from pvebackup.host.signals import abort_on_signals
from pvebackup.host.tasklog import LogRouter
from pvebackup.kit import qemuimg
from pvebackup.kit.crashpoint import crash_point
from pvebackup.kit.pacing import PROGRESS_INTERVAL, progress_text
from pvebackup.storage import (
    GuestVolume,
    GuestVolumeStorage,
    StorageConfig,
    guest_volume_storage,
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
        background copy of a live restore; not applied to containers (logged).
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
                root, cfg, provider, storeid, volname, vmid, target_storage, log, guest_run
            )
            run.keep_host_access = keep_host_access
            run.unique = unique
            run.existing_type = old_type
            run.storage_map = dict(storage_map or {})
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
    ) -> None:
        self.guest_run = guest_run
        self.root = root
        self.cfg = cfg
        self.provider = provider
        self.storeid = storeid
        self.volname = volname
        self.vmid = vmid
        self.target_storage = target_storage
        self.log = log
        self.created: list[str] = []
        self.keep_host_access = False
        self.target_id_map: tuple[IdMapEntry, ...] = ()
        self.live = False
        self.start_command: list[str] = []
        self.live_speed = 0
        self.live_disks: list[liverestore.LiveDisk] = []
        self.live_sources: list[str] = []  # devicenames whose restore source is open
        self.unique = False
        self.existing_type: GuestType | None = None
        self.storage_map: dict[str, str] = {}
        self.rate = 0  # bytes/s per disk, 0: unlimited
        if target_storage is not None:
            guest_volume_storage(cfg, target_storage)  # fail early on a bad --storage

    # -- storages ------------------------------------------------------------------

    def _storage(self, storeid: str) -> tuple[dict[str, str], GuestVolumeStorage]:
        return guest_volume_storage(self.cfg, storeid)

    @staticmethod
    def _holds(plugin: GuestVolumeStorage, content: str) -> bool:
        return plugin.subvols if content == "rootdir" else bool(plugin.image_formats)

    def _target_for(self, original: str | None, content: str, key: str | None = None) -> str:
        if key is not None and key in self.storage_map:
            return self.storage_map[key]
        if self.target_storage is not None:
            return self.target_storage
        if original is not None:
            try:
                _, plugin = self._storage(original)
            except (StorageNotFoundError, StorageUnavailableError, UnsupportedError):
                pass  # gone, disabled or unreachable since the backup: another one below
            else:
                if self._holds(plugin, content):
                    return original
                self.log.warn(
                    f"storage '{original}' (type {plugin.type}) cannot hold {content}"
                    " volumes for pvebackup; restoring onto another storage"
                )
        candidates: list[str] = []
        for sid in self.cfg:
            if self.cfg.disabled(sid):
                continue
            try:
                scfg, plugin = self._storage(sid)
            except UnsupportedError:
                continue
            if not self._holds(plugin, content):
                continue
            contents = scfg.get("content")
            if contents is None or content in contents.split(","):
                candidates.append(sid)
        if not candidates:
            raise UnsupportedError(
                f"no storage that pvebackup can allocate {content} volumes on;"
                " give one with --storage"
            )
        return candidates[0]

    # -- the restore -----------------------------------------------------------------

    def restore(self) -> RestoreResult:
        written: Path | None = None
        live_done = False
        try:
            mechanism, vmtype = _restore_mechanism(
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
            for name in self.storage_map:
                self._storage(self.storage_map[name])  # fail before any data moves
            text = self.provider.extract_guest_config(self.volname, self.storeid)
            where = f"{self.storeid}:{self.volname} (guest config)"
            config = restrict_config(
                parse_guest_config(text, self.vmid, vmtype, where=where),
                keep_host_access=self.keep_host_access,
                target_id_map=self.target_id_map,
                log=self.log,
            )
            self._check_map(config)
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
            self.log.err(f"restore failed: {_describe(exc)}")
            if live_done:
                raise
            if written is not None:
                # The VM that used it is stopped (liverestore stops it on failure).
                written.unlink(missing_ok=True)
            self._close_live_sources()
            self._free_created()
            raise
        self._write_firewall(firewall)
        return RestoreResult(self.vmid, vmtype, path, list(self.created))

    def _check_map(self, config: GuestConfig) -> None:
        keys = (
            [d.key for d in config.disks] if isinstance(config, VmConfig)
            else [m.key for m in config.mountpoints] if isinstance(config, CtConfig) else []
        )
        unknown = sorted(set(self.storage_map) - set(keys))
        if unknown:
            raise UsageError(
                f"--map {', '.join(unknown)}: not a disk of this backup"
                f" (it has {', '.join(keys) or 'none'})"
            )

    def _warn_shared_macs(self, config: GuestConfig) -> None:
        for other, macs in sorted(shared_macs(self.root, self.vmid, mac_addresses(config)).items()):
            self.log.warn(
                f"guest {other} uses the same MAC address{'es' if len(macs) > 1 else ''}"
                f" ({', '.join(sorted(macs))}): running both on one network breaks it;"
                " restore with --unique for new ones"
            )

    def _alloc(self, target: str, fmt: str, size: int) -> tuple[str, GuestVolume]:
        """Allocate with the storage's own tool; recorded first, freed on failure."""
        scfg, plugin = self._storage(target)
        volname = plugin.next_volname(scfg, target, self.vmid, fmt)
        # Recorded before it exists: if we are killed now, the next run frees it.
        self.guest_run.add_volume(f"{target}:{volname}")
        volname = plugin.allocate(scfg, target, self.vmid, fmt, size, volname)
        volid = f"{target}:{volname}"
        self.created.append(volid)
        crash_point("restore-after-alloc")
        plugin.activate_volume(scfg, target, volname)
        return volid, plugin.guest_volume(scfg, target, volname)

    def _alloc_image(
        self, original: str | None, size: int, key: str | None = None
    ) -> tuple[str, GuestVolume, bool]:
        """A new disk image: qcow2 where the storage has files, else its raw volume.

        The flag tells whether the new image reads as zeroes (a thick LV does not).
        """
        target = self._target_for(original, "images", key)
        _, plugin = self._storage(target)
        if self.live:
            # The read-through target is a qcow2 whose backing file is the backup.
            fmt = "qcow2"
            if fmt not in plugin.image_formats:
                raise UnsupportedError(
                    f"live restore needs a qcow2 image; storage '{target}' (type"
                    f" {plugin.type}) allocates {', '.join(plugin.image_formats)} only:"
                    " restore without --live or onto a dir-like storage"
                )
        else:
            if not plugin.image_formats:
                plugin.check_format(target, "raw")  # raises, saying what it holds
            fmt = plugin.image_formats[0]
        volid, volume = self._alloc(target, fmt, size)
        return volid, volume, plugin.zeroed_images

    def _alloc_subvol(self, original: str | None, key: str | None = None) -> tuple[str, Path]:
        target = self._target_for(original, "rootdir", key)
        _, plugin = self._storage(target)
        plugin.check_format(target, "subvol")
        volid, volume = self._alloc(target, "subvol", 0)
        return volid, Path(volume.path)

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
            size = _device_size(info[disk.devicename], disk.devicename)
            volid, volume, zeroed = self._alloc_image(disk.spec.storeid, size, disk.key)
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
            with self._paired("restore_qemu_img", init, cleanup) as source:
                _qemu_img_convert(
                    str(source),
                    volume.qemu_name(),
                    self._progress(disk.devicename, size),
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
                self.log.err(f"{devicename}: restore cleanup failed: {_describe(exc)}")

    def _progress(self, devicename: str, size: int) -> Callable[[float], None]:
        """qemu-img's percentages as the backup's progress: a bar on a terminal, a
        line every few seconds and one at the end, both from one formula."""
        start = time.monotonic()
        next_line = start + PROGRESS_INTERVAL
        finished = False

        def report(percent: float) -> None:
            nonlocal next_line, finished
            if finished:
                return
            now = time.monotonic()
            done, final = int(size * min(percent, 100.0) / 100), percent >= 100.0
            line = None
            if final or now >= next_line:
                next_line = now + PROGRESS_INTERVAL
                line = progress_text(devicename, done, size, now - start, final=final)
            finished = final
            self.log.progress(devicename, done, size, now - start, line, final)

        return report

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
            volid, path = self._alloc_subvol(mp.spec.storeid, mp.key)
            targets[mp.ct_path] = path
            replace[mp.key] = mp.spec.render(volume=volid)
            self.log.info(f"{mp.key} ({mp.ct_path}): restoring into {volid}")
        id_map = config.id_map()
        vol, sid = self.volname, self.storeid
        if self.rate:
            self.log.warn(
                "the bandwidth limit applies to VM disks; a container restore is not paced"
            )
        if mechanism == RestoreMechanism.TAR:
            with self._paired(
                "restore_tar",
                lambda: self.provider.restore_tar_init(vol, sid),
                lambda: self.provider.restore_tar_cleanup(vol, sid),
            ) as archive:
                extract_tar(Path(archive), targets, id_map, log=self.log)
        else:
            with self._paired(
                "restore_directory",
                lambda: self.provider.restore_directory_init(vol, sid),
                lambda: self.provider.restore_directory_cleanup(vol, sid),
            ) as source:
                copy_directory(Path(source), targets, id_map, log=self.log)
        return replace

    @contextmanager
    def _paired(
        self, method: str, init: Callable[[], str], cleanup: Callable[[], None]
    ) -> Iterator[str]:
        """``<method>_init``, the body, and ``<method>_cleanup`` always after it.

        The seed calls the cleanup "in both, success and failure scenarios", and a
        provider may fail half-way through its init (an nbdkit started, a temporary
        directory made): so the cleanup also runs when the init raised. Its own
        failure then is logged and the init's error is the one raised (a provider
        may have nothing to clean). After a successful init a failing cleanup is
        raised (chained to the body's error, if any): backup-store's cleanup
        names the corrupt chunk that qemu-img only saw as EIO (exit 5).
        """
        try:
            value = init()
        except BaseException:
            try:
                cleanup()
            except Exception as exc:
                self.log.err(f"{method}_cleanup after a failed init: {_describe(exc)}")
            raise
        try:
            if not isinstance(value, str | os.PathLike) or not str(value):
                raise PluginError(f"{method}_init returned {value!r:.80}, not a path or URI")
            yield str(value)
        finally:
            cleanup()

    # -- cleanup and replacement ---------------------------------------------------

    def _free(self, volid: str) -> None:
        storeid, volname = parse_volume_id(volid)
        scfg, plugin = self._storage(storeid)
        plugin.free(scfg, storeid, volname)

    def _free_created(self) -> None:
        for volid in reversed(self.created):
            try:
                self._free(volid)
                self.log.info(f"removed {volid}")
            except Exception as exc:
                self.log.err(f"could not remove {volid}: {_describe(exc)}")
        self.created.clear()

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
        for volid in old.volume_ids():
            if volid in result.volumes:
                continue
            _, volname = volid.split(":", 1)
            if not _owned_by(volname, self.vmid):
                continue  # not the guest's own (an ISO, another guest's base image)
            try:
                self._free(volid)
                result.removed.append(volid)
                self.log.info(f"removed volume {volid} of the replaced guest")
            except Exception as exc:
                self.log.warn(f"could not remove old volume {volid}: {_describe(exc)}")


def _owned_by(volname: str, vmid: int) -> bool:
    """A volume of the guest itself: ``<vmid>/...`` (dir-like) or ``vm-<vmid>-...``
    (an LV, zvol or rbd image); not an ISO or another guest's base image."""
    return volname.startswith(f"{vmid}/") or re.match(
        rf"^(?:vm|subvol)-{vmid}-", volname
    ) is not None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PveBackupError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _restore_mechanism(answer: object) -> tuple[RestoreMechanism, GuestType]:
    """Check ``restore_get_mechanism``'s answer: a typed error, never a ValueError.

    :raises UnsupportedError: a mechanism or guest type this host does not know.
    :raises PluginError: not a ``(mechanism, vmtype)`` pair.
    """
    if not isinstance(answer, tuple | list) or len(answer) != 2:
        raise PluginError(
            f"restore_get_mechanism returned {answer!r:.80}, not (mechanism, vmtype)"
        )
    mechanism, vmtype = answer
    try:
        mech = RestoreMechanism(mechanism)
    except ValueError as exc:
        known = ", ".join(m.value for m in RestoreMechanism)
        raise UnsupportedError(
            f"restore_get_mechanism: unknown restore mechanism {mechanism!r:.40} ({known})"
        ) from exc
    try:
        kind = GuestType(vmtype)
    except ValueError as exc:
        known = ", ".join(t.value for t in GuestType)
        raise UnsupportedError(
            f"restore_get_mechanism: unknown guest type {vmtype!r:.40} ({known})"
        ) from exc
    return mech, kind


_FORMAT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def _source_format(source: str) -> str:
    """The format ``qemu-img convert`` reads ``source`` as: always explicit, never probed.

    What a provider hands over is untrusted raw disk data, as in Proxmox VE: a
    path or an NBD URI is read as ``raw``. Probing would let the first bytes of a
    guest's raw disk (a qcow2 header naming ``/etc/shadow`` as its backing file)
    decide what qemu opens. A provider that stores another format says so in a
    ``json:`` pseudo-file name whose top-level ``driver`` is the format (and whose
    options pin every file qemu may open: see backup-dir's images module).

    :raises PluginError: a ``json:`` name without a plain top-level driver.
    """
    if not source.startswith("json:"):
        return "raw"
    try:
        spec = json.loads(source[len("json:") :])
    except ValueError as exc:
        raise PluginError(f"restore source is not a valid json: file name: {exc}") from exc
    driver = spec.get("driver") if isinstance(spec, dict) else None
    if not isinstance(driver, str) or not _FORMAT_NAME.match(driver):
        raise PluginError(
            f"restore source json: file name names no format driver (got {driver!r})"
        )
    return driver


_MAX_DISK_SIZE = 1 << 63


def _device_size(entry: object, devicename: str) -> int:
    """The disk size a provider reports, checked: it sizes the volume we allocate.

    It comes from the backup (a manifest, an ``index.json``), so a wrong type or a
    size no disk can have is an ``IntegrityError``, not a traceback or a 1 EiB volume.
    """
    size = entry.get("size") if isinstance(entry, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size < _MAX_DISK_SIZE:
        raise IntegrityError(f"{devicename}: the backup gives no valid disk size ({size!r:.40})")
    return size


def _qemu_img_convert(
    source: str,
    target: str | os.PathLike[str],
    progress: Callable[[float], None] | None = None,
    *,
    interval: float = 5.0,
    target_fmt: str = "qcow2",
    target_is_zero: bool = True,
    rate: int = 0,
) -> None:
    """``qemu-img convert`` ``source`` into the existing ``target`` of ``target_fmt``.

    ``target_is_zero``: the new volume reads as zeroes, so zero areas are not
    written; a thick LV holds old data and gets every block written.

    ``source`` is read as raw unless it is a ``json:`` name with a driver
    (:func:`_source_format`). ``progress(percent)`` is called at most every
    ``interval`` seconds while it runs and once with 100 at the end.
    """
    report = qemuimg.throttled(progress, interval) if progress is not None else None

    def on_progress(percent: float) -> None:
        crash_point("restore-mid-convert")
        if report is not None:
            report(percent)

    # Both formats explicit: the source as the provider declared it (raw unless
    # it said otherwise), the target as allocated.
    qemuimg.convert(
        source,
        target,
        source_fmt=_source_format(source),
        target_fmt=target_fmt,
        target_exists=True,
        target_is_zero=target_is_zero,
        progress=on_progress,
        rate_limit=rate or None,
    )
