"""``BackupDirProvider``: every method of the backup provider API, storing plain files.

Read this file top to bottom next to :mod:`pvebackup.api.provider`: the methods
come in the order the host calls them. The data paths live in their own modules:
:mod:`.vm` (NBD export -> qcow2), :mod:`.archive` (directory -> zstd tar),
:mod:`.tree` (directory -> plain tree), :mod:`.volumes` (names and layout).

State per guest backup is a :class:`_GuestBackup`, keyed by vmid: the host backs
up one guest after the other and names the guest in every call.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pvebackup.api.errors import (
    IntegrityError,
    StorageConfigError,
    UnsafeArchiveError,
    UnsupportedError,
    UsageError,
    VolumeNotFoundError,
)
from pvebackup.api.provider import BackupProvider
from pvebackup.api.types import (
    BackupMechanism,
    BitmapMode,
    DeviceInfo,
    GuestType,
    IdMapEntry,
    LogFunction,
    RestoreMechanism,
)
from pvebackup.kit.crashpoint import crash_point
from pvebackup.kit.lock import lock_directory, try_lock_directory
from pvebackup.providers.directory import archive, images, stored, tree, vm
from pvebackup.providers.directory.transfer import MIB
from pvebackup.providers.directory.volumes import (
    BackupIndex,
    DeviceEntry,
    VolumeLayout,
    VolumeName,
    allocated_size,
)
from pvebackup.storage.basepath import BasePath

__all__ = ["BackupDirProvider", "CT_FORMATS", "parse_flag"]

CT_FORMATS = ("tar", "directory")
GUEST_CONFIG = "guest.conf"
FIREWALL_CONFIG = "firewall.fw"
TASK_LOG = "task.log"
TAR_NAME = "root.tar.zst"
TREE_NAME = "root"
_TRUE = {"1", "yes", "on", "true"}
_FALSE = {"0", "no", "off", "false"}


def parse_flag(value: str | None, default: bool, name: str) -> bool:
    """Read a yes/no storage property; :class:`StorageConfigError` if it is neither."""
    if value is None or value == "":
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise StorageConfigError(f"property {name!r} must be yes or no, not {value!r}")


def _safe_devicename(devicename: str) -> str:
    # The device name becomes a file name inside the volume.
    ok = devicename and not devicename.startswith(".") and "/" not in devicename
    if not ok or devicename in (GUEST_CONFIG, FIREWALL_CONFIG, TASK_LOG):
        raise UsageError(f"device name {devicename!r} cannot be used as a file name")
    return devicename


@dataclass(slots=True)
class _GuestBackup:
    """One guest's backup in progress (or just finished)."""

    index: BackupIndex
    volname: str
    workdir: Path
    """The ``.tmp-`` directory data is written to until ``backup_end``."""
    base: str | None = None
    """Volume an incremental backup builds on (chosen in ``backup_get_mechanism``)."""
    bitmap_id: str | None = None
    """The bitmap id ``backup_get_mechanism`` returned."""
    final: Path | None = None
    """The committed volume directory, set by ``backup_end``."""
    aborted: bool = False
    lock_fd: int = -1
    """flock on ``workdir`` while we write it: a live writer's mark (see job_start)."""

    def unlock(self) -> None:
        fd, self.lock_fd = self.lock_fd, -1
        if fd >= 0:
            os.close(fd)


class BackupDirProvider(BackupProvider):
    """The reference provider: each backup is a directory of plain files.

    Storage properties (``scfg``): ``path`` (required), ``bitmap`` (yes/no,
    default yes: incremental VM backups with a dirty bitmap), ``ct-format``
    (``tar``, the default, or ``directory``).
    """

    def __init__(
        self,
        storage_plugin: object,
        scfg: Mapping[str, str],
        storeid: str,
        log_function: LogFunction,
    ) -> None:
        super().__init__(storage_plugin, scfg, storeid, log_function)
        path = scfg.get("path")
        if not path:
            raise StorageConfigError(f"storage {storeid!r}: backup-dir needs 'path'")
        self.layout = VolumeLayout(path)
        self.base = BasePath.from_scfg(scfg, storeid, create_default=False)
        self.use_bitmap = parse_flag(scfg.get("bitmap"), True, "bitmap")
        self.ct_format = scfg.get("ct-format") or "tar"
        if self.ct_format not in CT_FORMATS:
            raise StorageConfigError(
                f"storage {storeid!r}: ct-format must be tar or directory, not {self.ct_format!r}"
            )
        self._guests: dict[int, _GuestBackup] = {}
        self._restores: dict[tuple[str, str], images.ImageChain] = {}
        """Checked image chains, open from ``restore_qemu_img_init`` to its cleanup."""

    def provider_name(self) -> str:
        return "backup-dir"

    # job hooks -------------------------------------------------------------------

    def job_start(self, start_time: int) -> None:
        """Check the storage path (mounted if ``is_mountpoint``; created only with
        ``create-base-path``) and create ``<path>/backup`` (unless ``create-subdirs 0``).

        :raises StorageUnavailableError: not mounted, or a path missing that may
            not be created; nothing was created then.
        """
        self.base.subdir("backup", create=True)
        self._remove_dead_temps()
        self.log("info", f"backup-dir: job started, writing to {self.layout.backup_dir}")

    def _remove_dead_temps(self) -> None:
        """Remove ``.tmp-*`` directories whose writer is gone (killed, crashed).

        A writer holds an flock on its temporary directory until it commits or
        aborts; the kernel drops it when the writer dies. A directory we can lock
        therefore has no live writer, on this node or, with a storage whose file
        system passes flock on (NFSv4, CephFS), on another.
        """
        for entry in sorted(self.layout.backup_dir.glob(".tmp-*")):
            fd = try_lock_directory(entry)
            if fd is None:
                continue  # a live writer, or no directory (a symlink is never followed)
            try:
                shutil.rmtree(entry)
                self.log("warn", f"backup-dir: removed {entry.name} left by a dead backup")
            except OSError as exc:
                self.log("warn", f"backup-dir: cannot remove {entry.name}: {exc.strerror}")
            finally:
                os.close(fd)

    def job_end(self) -> None:
        """Throw away any guest backup that neither ended nor was aborted."""
        self._discard_unfinished("job ended")
        self.log("info", "backup-dir: job finished")

    def job_abort(self, error: str) -> None:
        """Throw away unfinished guest backups; committed volumes stay."""
        self._discard_unfinished(f"job aborted: {error}")
        self.log("info", "backup-dir: job aborted, unfinished backups removed")

    def _discard_unfinished(self, why: str) -> None:
        for vmid, guest in self._guests.items():
            if guest.final is None and not guest.aborted:
                self.backup_abort(vmid, why)

    # guest hooks -----------------------------------------------------------------

    def backup_start(self, vmid: int, vmtype: GuestType) -> None:
        """Pick the volume name and create its temporary directory."""
        vmtype = GuestType(vmtype)
        # checked again per guest: the disk may have been unmounted mid-job
        self.base.subdir("backup", create=True)
        volname = self.layout.new_volname(vmtype, vmid, time.time())
        workdir = self.layout.temp_path(volname)
        workdir.mkdir()
        try:
            # Locked just after mkdir: a job_start of another job that locks it in
            # between removes it, and we fail here loudly instead of writing.
            lock_fd = lock_directory(workdir)
        except BaseException:
            with contextlib.suppress(OSError):
                workdir.rmdir()
            raise
        index = BackupIndex(vmid=vmid, vmtype=vmtype, ctime=VolumeName.parse(volname).ctime)
        self._guests[vmid] = _GuestBackup(
            index=index, volname=volname, workdir=workdir, lock_fd=lock_fd
        )
        self.log("info", f"backup-dir: starting backup of {vmtype.value} {vmid} to {volname}")

    def _guest(self, vmid: int) -> _GuestBackup:
        guest = self._guests.get(vmid)
        if guest is None:
            raise UsageError(f"backup-dir: backup_start was not called for guest {vmid}")
        return guest

    def backup_get_mechanism(
        self, vmid: int, vmtype: GuestType
    ) -> tuple[BackupMechanism, str | None]:
        """``directory`` for containers; ``nbd`` for VMs, with a bitmap id chosen so
        that the host can only ever *reuse* a bitmap we hold the base of.

        An incremental *chain* has one bitmap id, ``backup-dir-<time of its first
        backup>-<6 random hex digits>``, recorded in every ``index.json`` of the chain:

        - the last successful backup exists with every image of its chain: return
          its chain's id (the host reuses the bitmap, or creates it anew when
          it was lost: then this backup is full and the chain goes on);
        - there was no backup yet, or the last one had no bitmap: a fresh id. The
          host cannot hold a bitmap of that name, so it creates one: full backup,
          and the next backup is incremental;
        - the last successful backup is gone or incomplete: ``None``. Its bitmap
          holds changes since a point we no longer have, so it must not be used;
          the host drops our stale bitmaps and makes a full backup, and the
          backup after it starts a new chain.
        """
        vmtype = GuestType(vmtype)
        if vmtype is GuestType.LXC:
            return BackupMechanism.DIRECTORY, None
        if vmtype is not GuestType.QEMU:
            raise UnsupportedError(f"backup-dir cannot back up guests of type {vmtype}")
        base, bitmap_id = self._choose_bitmap(vmid)
        if vmid in self._guests:
            self._guests[vmid].base = base
            self._guests[vmid].bitmap_id = bitmap_id
        return BackupMechanism.NBD, bitmap_id

    def _choose_bitmap(self, vmid: int) -> tuple[str | None, str | None]:
        """``(base volume, bitmap id)`` for a VM backup (see ``backup_get_mechanism``)."""
        if not self.use_bitmap:
            return None, None
        recorded = self.layout.last_recorded(GuestType.QEMU, vmid)
        base = self._usable_base(vmid) if recorded is not None else None
        if recorded is not None and base is None:
            self.log(
                "info",
                f"backup-dir: previous backup {recorded} of {vmid} is gone or incomplete: "
                "full backup without a bitmap",
            )
            return None, None
        chain_id = self.layout.read_index(base).bitmap_id if base is not None else None
        if base is None or chain_id is None:
            guest = self._guests.get(vmid)
            name = VolumeName.parse(guest.volname) if guest else VolumeName(
                GuestType.QEMU, vmid, int(time.time())
            )
            # The random part keeps a new chain's id apart from any earlier one,
            # even from a removed chain started within the same second.
            fresh = f"backup-dir-{name.stamp}-{secrets.token_hex(3)}"
            self.log("info", f"backup-dir: full backup of {vmid}, starting bitmap {fresh}")
            return None, fresh
        self.log("info", f"backup-dir: incremental backup of {vmid} on top of {base}")
        return base, chain_id

    def _usable_base(self, vmid: int) -> str | None:
        """The last successful backup of VM ``vmid`` if every image of its chain exists."""
        base = self.layout.last_successful(GuestType.QEMU, vmid)
        if base is None:
            return None
        try:
            for devicename in self.layout.read_index(base).devices:
                # The full restore-side check: a tampered base means a full backup
                # now, not an incremental that could never be restored.
                with images.open_chain(self.layout, base, devicename) as chain:
                    if len(chain) >= images.MAX_CHAIN_DEPTH:
                        self.log(
                            "info",
                            f"backup-dir: the chain of {base} has {len(chain)} images: "
                            "starting a new chain",
                        )
                        return None
        except (VolumeNotFoundError, IntegrityError, UnsafeArchiveError) as exc:
            self.log("warn", f"backup-dir: previous backup {base} unusable as a base: {exc}")
            return None
        return base

    def backup_get_target(self, vmid: int, vmtype: GuestType) -> str:
        """``backup/<vmtype>-<vmid>-<UTC time>``, chosen in ``backup_start``."""
        return self._guest(vmid).volname

    def backup_get_task_size(self, vmid: int) -> int:
        """Bytes the volume occupies on disk (allocated blocks of all its files)."""
        guest = self._guest(vmid)
        path = guest.final or guest.workdir
        return allocated_size(path) if path.exists() else 0

    # configuration and log -------------------------------------------------------

    def backup_guest_config(self, vmid: int, filename: str) -> None:
        shutil.copyfile(filename, self._guest(vmid).workdir / GUEST_CONFIG)
        self.log("info", f"backup-dir: stored guest configuration {filename}")

    def backup_firewall_config(self, vmid: int, filename: str) -> None:
        shutil.copyfile(filename, self._guest(vmid).workdir / FIREWALL_CONFIG)
        self.log("info", f"backup-dir: stored firewall configuration {filename}")

    def backup_handle_log_file(self, vmid: int, filename: str) -> None:
        """Store the task log in the committed volume; nothing for aborted ones."""
        guest = self._guest(vmid)
        if guest.final is None:
            self.log("info", f"backup-dir: backup of {vmid} did not complete, log not kept")
            return
        shutil.copyfile(filename, guest.final / TASK_LOG)

    # backup mechanisms -----------------------------------------------------------

    def backup_nbd(
        self,
        vmid: int,
        devicename: str,
        nbd_path: str,
        bitmap_mode: BitmapMode,
        bitmap_name: str | None,
        bandwidth_limit: int | None,
    ) -> None:
        """Write the disk as ``<devicename>.qcow2``: full, or on top of the base."""
        guest = self._guest(vmid)
        bitmap_mode = BitmapMode(bitmap_mode)
        image = guest.workdir / f"{_safe_devicename(devicename)}.qcow2"
        backing: Path | None = None
        backing_volname: str | None = None
        if bitmap_mode is BitmapMode.REUSE:
            # Only dirty extents can be read: the rest must come from the base.
            if guest.base is None or bitmap_name is None:
                raise IntegrityError(
                    f"{devicename}: bitmap mode reuse but no base volume was chosen "
                    "(backup_get_mechanism returned no bitmap)"
                )
            chain = self.layout.image_chain(guest.base, devicename)
            backing, backing_volname = chain[0], guest.base
        stats = vm.backup_disk(
            nbd_path=nbd_path,
            devicename=devicename,
            image=image,
            backing=backing,
            bitmap_name=bitmap_name,
            bandwidth_limit=bandwidth_limit,
            log_function=self.log_function,
        )
        guest.index.devices[devicename] = DeviceEntry(
            size=stats.size,
            file=image.name,
            backing=backing_volname,
            bitmap_mode=bitmap_mode.value,
        )
        if backing_volname is not None:
            guest.index.parent = backing_volname
        if bitmap_mode is not BitmapMode.NONE:
            # The host cleared (or created) the bitmap at this backup: the chain goes on.
            guest.index.bitmap_id = guest.bitmap_id
        self.log(
            "info",
            f"backup-dir: {devicename}: read {stats.read / MIB:.1f} MiB, wrote "
            f"{stats.written / MIB:.1f} MiB, {stats.zeroed / MIB:.1f} MiB zero",
        )

    def backup_directory(
        self,
        vmid: int,
        directory: str,
        id_map: Sequence[IdMapEntry],
        exclude_paths: Sequence[str],
        sources: Sequence[str],
        bandwidth_limit: int | None,
    ) -> None:
        """Archive the container as ``root.tar.zst`` or copy it as ``root/``."""
        guest = self._guest(vmid)
        guest.index.ct_format = self.ct_format
        if self.ct_format == "tar":
            target = guest.workdir / TAR_NAME
            stats = archive.write_tar(
                directory, sources, id_map, exclude_paths, target, bandwidth_limit, self.log
            )
        else:
            target = guest.workdir / TREE_NAME
            stats = tree.copy_tree(
                directory, sources, id_map, exclude_paths, target, bandwidth_limit, self.log
            )
        self.log(
            "info",
            f"backup-dir: {stats.entries} entries, {stats.data / MIB:.1f} MiB of file data, "
            f"{stats.excluded} excluded, stored as {target.name}",
        )

    def backup_end(self, vmid: int) -> None:
        """Write ``index.json``, rename the volume into place, remember it as the base."""
        guest = self._guest(vmid)
        guest.index.stored_size = allocated_size(guest.workdir)
        self.layout.write_index(guest.workdir, guest.index)
        crash_point("backup-after-index")
        guest.final = self.layout.commit(guest.volname)
        guest.unlock()
        if guest.index.vmtype is GuestType.QEMU:
            self.layout.set_last_successful(GuestType.QEMU, vmid, guest.volname)
        self.log(
            "info",
            f"backup-dir: committed {guest.volname} "
            f"({guest.index.stored_size / MIB:.1f} MiB stored)",
        )

    def backup_abort(self, vmid: int, error: str) -> None:
        """Remove everything this guest's backup wrote."""
        guest = self._guests.get(vmid)
        if guest is None or guest.aborted:
            return
        guest.aborted = True
        shutil.rmtree(guest.workdir, ignore_errors=True)
        guest.unlock()
        self.log("info", f"backup-dir: backup of {vmid} aborted, removed {guest.workdir.name}")

    # restore ---------------------------------------------------------------------

    def restore_get_mechanism(
        self, volname: str, storeid: str
    ) -> tuple[RestoreMechanism, GuestType]:
        """``qemu-img`` for VMs; ``tar`` or ``directory`` as the container was stored."""
        self.base.activate()  # an unmounted storage: say so, not "no such backup"
        index = stored.read_index(self.layout, volname)
        if index.vmtype is GuestType.QEMU:
            return RestoreMechanism.QEMU_IMG, GuestType.QEMU
        if index.ct_format == "directory":
            return RestoreMechanism.DIRECTORY, GuestType.LXC
        return RestoreMechanism.TAR, GuestType.LXC

    def extract_guest_config(self, volname: str, storeid: str) -> str:
        text = self._stored_config(volname, GUEST_CONFIG, "guest configuration")
        if text is None:
            raise IntegrityError(f"backup volume {volname!r} has no guest configuration")
        return text

    def extract_firewall_config(self, volname: str, storeid: str) -> str | None:
        return self._stored_config(volname, FIREWALL_CONFIG, "firewall configuration")

    def _stored_config(self, volname: str, name: str, what: str) -> str | None:
        # Through the volume's directory fd: a config symlinked to a host file
        # (/etc/shadow) must not end up in the restored guest's config or a log.
        with stored.VolumeDir(self.layout, volname) as volume:
            volume.read_index()
            data = volume.read(name, what, stored.CONFIG_LIMIT)
        if data is None:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise IntegrityError(f"backup volume {volname!r}: {what} is not UTF-8") from exc

    def restore_qemu_get_device_info(self, volname: str, storeid: str) -> DeviceInfo:
        index = stored.read_index(self.layout, volname)
        return {name: {"size": dev.size} for name, dev in index.devices.items()}

    def restore_qemu_img_init(self, volname: str, storeid: str, devicename: str) -> str:
        """The disk's checked image chain, pinned in a ``json:`` file name (qcow2).

        Every image is opened and checked first (see :mod:`.images`); the name
        returned opens exactly those files, backing files included, and only
        while this provider holds them: until ``restore_qemu_img_cleanup``.

        :raises UnsafeArchiveError: a stored name or image header reaches outside
            the volume's own chain (:class:`UnsafeImageError` for headers).
        """
        old = self._restores.pop((volname, devicename), None)
        if old is not None:
            old.close()
        chain = images.open_chain(self.layout, volname, devicename)
        self._restores[(volname, devicename)] = chain
        self.log(
            "info",
            f"backup-dir: restoring {devicename} from {chain.images[0].name} "
            f"(chain of {len(chain)} checked image(s))",
        )
        return chain.source()

    def restore_qemu_img_cleanup(self, volname: str, storeid: str, devicename: str) -> None:
        """Close the images ``restore_qemu_img_init`` opened.

        :raises UnsafeImageError: an image was written to since it was checked
            (a header rewritten in place under qemu): the restore must fail.
        """
        chain = self._restores.pop((volname, devicename), None)
        if chain is None:
            return
        try:
            chain.check_unchanged()
        finally:
            chain.close()

    def restore_tar_init(self, volname: str, storeid: str) -> str:
        return str(self._stored_ct_data(volname, "tar", TAR_NAME))

    def restore_tar_cleanup(self, volname: str, storeid: str) -> None:
        """Nothing to clean up: the host reads the stored archive directly."""

    def restore_directory_init(self, volname: str, storeid: str) -> str:
        return str(self._stored_ct_data(volname, "directory", TREE_NAME))

    def restore_directory_cleanup(self, volname: str, storeid: str) -> None:
        """Nothing to clean up: the host copies from the stored tree directly."""

    def _stored_ct_data(self, volname: str, ct_format: str, name: str) -> Path:
        index = self.layout.read_index(volname)
        if index.vmtype is not GuestType.LXC or index.ct_format != ct_format:
            raise UnsupportedError(
                f"backup volume {volname!r} is not a container backup stored as {ct_format}"
            )
        path = self.layout.volume_path(volname) / name
        if not path.exists():
            raise IntegrityError(f"backup volume {volname!r} lacks {name}")
        return path

