"""``BackupDirProvider``: every method of the backup provider API, storing plain files.

Read this file top to bottom next to :mod:`pvebackup.api.provider`: the methods
come in the order the host calls them. The data paths live in their own modules:
:mod:`.vm` (NBD export -> qcow2), :mod:`.archive` (directory -> zstd tar),
:mod:`.tree` (directory -> plain tree), :mod:`.volumes` (names and layout).

State per guest backup is a :class:`_GuestBackup`, keyed by vmid: the host backs
up one guest after the other and names the guest in every call.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pvebackup.api.errors import (
    BaseUnusableError,
    IntegrityError,
    LockedError,
    UnsafeArchiveError,
    UnsafeStorageError,
    UnsupportedError,
    UsageError,
    VolumeNotFoundError,
)
from pvebackup.api.provider import BackupProvider, no_backup_started
from pvebackup.api.types import (
    BackupMechanism,
    BitmapMode,
    DeviceInfo,
    GuestType,
    LogFunction,
    RestoreMechanism,
)
from pvebackup.kit import paxtar, safefs
from pvebackup.kit.crashpoint import crash_point
from pvebackup.kit.hoststate import HostState
from pvebackup.kit.lock import lock_descriptor
from pvebackup.kit.nbdsource import SourceFactory, connect
from pvebackup.kit.oserrors import os_error
from pvebackup.kit.safefs import MAX_CONFIG_FILE_SIZE, owned_fd
from pvebackup.kit.units import format_bytes
from pvebackup.providers.directory import images, stored, tree, vm
from pvebackup.providers.directory.settings import BackupDirSettings
from pvebackup.providers.directory.volumes import (
    BackupIndex,
    DeviceEntry,
    VolumeLayout,
    VolumeName,
    allocated_size,
)

__all__ = ["BackupDirProvider"]

GUEST_CONFIG = "guest.conf"
FIREWALL_CONFIG = "firewall.fw"
TASK_LOG = "task.log"
TAR_NAME = "root.tar.zst"
TREE_NAME = "root"
"""Largest stored configuration file read back (guest configs are a few KiB)."""


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
    """The ``.tmp-`` directory data is written to until ``backup_end`` (for messages)."""
    workdir_fd: int
    """An fd of ``workdir``, held until the guest's backup ends: every write goes
    through it, never through the path (which a storage writer could swap for a
    symlink out of the storage meanwhile). It holds an flock, the mark of a live
    writer (see ``_remove_dead_temps``). -1 once closed."""
    base: str | None = None
    """Volume an incremental backup builds on (chosen in ``backup_get_mechanism``)."""
    base_index_sha256: str | None = None
    """SHA-256 of the base's ``index.json``, as this host's state proved it."""
    bitmap_id: str | None = None
    """The bitmap id ``backup_get_mechanism`` returned."""
    modes: set[BitmapMode] = field(default_factory=set)
    """Bitmap modes the host reported, including for disks that failed."""
    final: Path | None = None
    """The committed volume directory, set by ``backup_end``."""
    aborted: bool = False


class BackupDirProvider(BackupProvider):
    """The reference provider: each backup is a directory of plain files.

    Storage properties (``scfg``): ``path`` (required), ``bitmap`` (yes/no,
    default yes: incremental VM backups with a dirty bitmap), ``ct-format``
    (``tar``, the default, or ``directory``).
    """

    source_factory: SourceFactory | None = None
    """Opens a disk's NBD export (default: the real one); tests (the contract suite)
    set an in-memory one on the instance."""

    def __init__(
        self,
        storage_plugin: object,
        scfg: Mapping[str, str],
        storeid: str,
        log_function: LogFunction,
        *,
        state_dir: Path | str | None = None,
    ) -> None:
        """``state_dir``: where the host-side base proof lives (default: see
        :func:`pvebackup.kit.hoststate.default_state_dir`)."""
        super().__init__(storage_plugin, scfg, storeid, log_function)
        self.hoststate = HostState("backup-dir", storeid, state_dir)
        settings = BackupDirSettings.from_scfg(scfg, storeid)
        self.layout = VolumeLayout(settings.path)
        self.base = settings.base
        self.use_bitmap = settings.use_bitmap
        self.max_chain_length = settings.max_chain_length
        self.ct_format = settings.ct_format
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
        try:
            backup_fd = self.layout.open_backup_dir()
        except FileNotFoundError:
            return
        with owned_fd(backup_fd):
            for entry in sorted(safefs.listdir_at(backup_fd), key=lambda e: e.name):
                if not entry.name.startswith(".tmp-"):
                    continue
                try:
                    # O_NOFOLLOW: a symlink planted here is neither locked nor followed
                    fd = safefs.open_dir(backup_fd, (entry.name,))
                except (OSError, UnsafeStorageError):
                    continue
                with owned_fd(fd):
                    try:
                        lock_descriptor(fd, what=entry.name)
                    except LockedError:
                        continue  # a live writer
                    try:
                        safefs.rmtree_at(backup_fd, entry.name, missing_ok=True)
                    except (OSError, UnsafeStorageError) as exc:
                        self.log("warn", f"backup-dir: cannot remove {entry.name}: {exc}")
                        continue
                self.log("warn", f"backup-dir: removed {entry.name} left by a dead backup")

    def job_end(self) -> None:
        """Throw away any guest backup that neither ended nor was aborted."""
        self._discard_unfinished("job ended")
        self._close_workdirs()
        self.log("info", "backup-dir: job finished")

    def job_abort(self, error: str) -> None:
        """Throw away unfinished guest backups; committed volumes stay."""
        self._discard_unfinished(f"job aborted: {error}")
        self._close_workdirs()
        self.log("info", "backup-dir: job aborted, unfinished backups removed")

    def _discard_unfinished(self, why: str) -> None:
        for vmid, guest in self._guests.items():
            if guest.final is None and not guest.aborted:
                self.backup_abort(vmid, why)

    def _close_workdirs(self) -> None:
        for guest in self._guests.values():
            _close_workdir(guest)

    # guest hooks -----------------------------------------------------------------

    def backup_start(self, vmid: int, vmtype: GuestType) -> None:
        """Pick the volume name and create its temporary directory."""
        vmtype = GuestType(vmtype)
        # checked again per guest: the disk may have been unmounted mid-job
        self.base.subdir("backup", create=True)
        volname = self.layout.new_volname(vmtype, vmid, time.time())
        workdir_fd = self.layout.create_temp(volname)
        try:
            # The mark of a live writer (see _remove_dead_temps), on the fd we write
            # through, so that closing it ends both. Taken just after the mkdir: had
            # another job's job_start locked it in between, we fail here loudly.
            lock_descriptor(workdir_fd, what=self.layout.temp_path(volname).name)
        except BaseException:
            os.close(workdir_fd)
            raise
        index = BackupIndex(vmid=vmid, vmtype=vmtype, ctime=VolumeName.parse(volname).ctime)
        self._guests[vmid] = _GuestBackup(
            index=index,
            volname=volname,
            workdir=self.layout.temp_path(volname),
            workdir_fd=workdir_fd,
        )
        self.log("info", f"backup-dir: starting backup of {vmtype.value} {vmid} to {volname}")

    def _guest(self, vmid: int) -> _GuestBackup:
        guest = self._guests.get(vmid)
        if guest is None:
            raise UsageError(no_backup_started(vmid))
        return guest

    def _workdir_fd(self, vmid: int) -> int:
        guest = self._guest(vmid)
        if guest.workdir_fd < 0:
            raise UsageError(f"backup-dir: the backup of guest {vmid} has ended already")
        return guest.workdir_fd

    def backup_get_mechanism(
        self, vmid: int, vmtype: GuestType
    ) -> tuple[BackupMechanism, str | None]:
        """``directory`` for containers; ``nbd`` for VMs, with a bitmap id chosen so
        that the host can only ever *reuse* a bitmap whose base we can prove.

        An incremental *chain* has one bitmap id, ``backup-dir-<time of its first
        backup>-<6 random hex digits>``, recorded in every ``index.json`` of the
        chain and in this host's state file (see :meth:`_choose_bitmap`).
        """
        vmtype = GuestType(vmtype)
        if vmtype is GuestType.LXC:
            return BackupMechanism.DIRECTORY, None
        if vmtype is not GuestType.QEMU:
            raise UnsupportedError(f"backup-dir cannot back up guests of type {vmtype}")
        base, base_sha, bitmap_id = self._choose_bitmap(vmid)
        if vmid in self._guests:
            self._guests[vmid].base = base
            self._guests[vmid].base_index_sha256 = base_sha
            self._guests[vmid].bitmap_id = bitmap_id
        return BackupMechanism.NBD, bitmap_id

    def _fresh_chain(self, vmid: int) -> str:
        guest = self._guests.get(vmid)
        name = VolumeName.parse(guest.volname) if guest else VolumeName(
            GuestType.QEMU, vmid, int(time.time())
        )
        # The random part keeps a new chain's id apart from any earlier one, even
        # from a removed chain started within the same second, and from a chain
        # another host started: only the host that holds the state can reuse it.
        return f"backup-dir-{name.stamp}-{secrets.token_hex(3)}"

    def _choose_bitmap(self, vmid: int) -> tuple[str | None, str | None, str | None]:
        """``(base volume, its index checksum, bitmap id)`` for a VM backup.

        The proof that a base is the one the bitmap was cleared at is this host's
        state file (outside the storage): the volume and the SHA-256 of its
        ``index.json``, which pins the image sizes and checksums and, through
        ``parent-index-sha256``, every index below it. ``.last/qemu-<vmid>`` in
        the storage must agree with it, but is never trusted alone. Anything
        unproven gives ``None`` (the host drops this storage's bitmaps and reads
        the whole disk) and a warning; the backup after it starts a new chain.
        """
        if not self.use_bitmap:
            return None, None, None
        name = f"qemu-{vmid}"
        loaded = self.hoststate.read(name)
        recorded = self.layout.last_recorded(GuestType.QEMU, vmid)

        def full(level: str, why: str) -> tuple[None, None, None]:
            self.log(level, f"backup-dir: full backup of {vmid} without a bitmap: {why}")
            return None, None, None

        if loaded.missing:
            if recorded is None and not self._has_volumes(vmid):
                fresh = self._fresh_chain(vmid)
                self.log("info", f"backup-dir: first backup of {vmid}, starting bitmap {fresh}")
                return None, None, fresh
            return full(
                "warn",
                f"this host holds no record of the last backup ({self.hoststate.path(name)} "
                "is missing), so no base can be proven",
            )
        doc = loaded.doc
        if doc is None:
            return full("warn", loaded.problem or "the host state file is damaged")
        volname, sha, chain_id = doc.get("volume"), doc.get("index-sha256"), doc.get("bitmap-id")
        if not (
            isinstance(volname, str | None)
            and isinstance(sha, str | None)
            and isinstance(chain_id, str | None)
        ):
            return full("warn", f"the host state file {self.hoststate.path(name)} is damaged")
        if doc.get("path") != str(self.layout.root):
            return full("warn", f"the storage's path is no longer {doc.get('path')!r}")
        if volname is None or sha is None:
            # Reset by a failed backup: no volume is a base, a fresh chain is safe.
            fresh = self._fresh_chain(vmid)
            reason = str(doc.get("reason") or "no usable base")
            self.log(
                "info", f"backup-dir: full backup of {vmid}, starting bitmap {fresh} ({reason})"
            )
            return None, None, fresh
        if recorded != volname:
            return full(
                "warn",
                f"the storage's record .last/{name} names {recorded or 'nothing'}, this host "
                f"committed {volname} last (record edited, storage rolled back, or written "
                "by another host)",
            )
        why = self._base_problem(volname, sha)
        if why is not None:
            return full("warn", f"the previous backup {volname} {why}")
        if chain_id is None:
            fresh = self._fresh_chain(vmid)
            self.log("info", f"backup-dir: full backup of {vmid}, starting bitmap {fresh}")
            return None, None, fresh
        depth = self._chain_depth(volname)
        if self.max_chain_length and depth >= self.max_chain_length:
            # A new chain, so that retention can remove the old one whole: a base
            # stays while a child needs it (see docs/design.md, "Chains and retention").
            fresh = self._fresh_chain(vmid)
            self.log(
                "info",
                f"backup-dir: full backup of {vmid}, starting bitmap {fresh}: the chain "
                f"has {depth} incremental backups (max-chain-length {self.max_chain_length})",
            )
            return None, None, fresh
        self.log("info", f"backup-dir: incremental backup of {vmid} on top of {volname}")
        return volname, sha, chain_id

    def _chain_depth(self, volname: str) -> int:
        """Incremental backups from the chain's full backup up to ``volname``
        (checked just before by ``_base_problem``; bounded like a restore's walk)."""
        depth = 0
        current = self.layout.read_index_checked(volname)[0].parent
        while current is not None and depth < images.MAX_CHAIN_DEPTH:
            depth += 1
            current = self.layout.read_index_checked(current)[0].parent
        return depth

    def _has_volumes(self, vmid: int) -> bool:
        prefix = f"backup/{GuestType.QEMU.value}-{vmid}-"
        return any(v.startswith(prefix) for v in self.layout.volnames())

    def _base_problem(self, volname: str, sha: str) -> str | None:
        """Why ``volname`` is not, byte for byte, the volume this host committed."""
        # Threat: a rolled-back or edited storage. The index chain is checked against
        # the host's checksum; image files against the sizes the indexes pin.
        expected: str | None = sha
        current: str | None = volname
        while current is not None:
            try:
                index, actual = self.layout.read_index_checked(current)
            except VolumeNotFoundError:
                return "is gone (removed or storage rolled back)" if current == volname else (
                    f"depends on {current}, which is gone"
                )
            except (IntegrityError, UnsafeArchiveError) as exc:
                return f"is unreadable ({exc})"
            if expected is None or actual != expected:
                what = "its index" if current == volname else f"the index of {current}"
                return (
                    f"is not what this host committed: {what} changed "
                    "(storage rolled back or edited)"
                )
            for devicename, dev in index.devices.items():
                image = self.layout.volume_path(current) / dev.file
                try:
                    st = os.lstat(image)
                except OSError:
                    return f"lacks the image {current}/{dev.file}"
                if dev.image_size is None or st.st_size != dev.image_size:
                    return f"has an image {current}/{dev.file} of another size than committed"
                if dev.backing is not None and dev.backing != index.parent:
                    return f"has a disk {devicename} outside its chain"
            expected, current = index.parent_index_sha256, index.parent
        return self._chain_problem(volname)

    def _chain_problem(self, volname: str) -> str | None:
        """Why the image chains of ``volname`` fail the restore-side checks, if they do.

        A tampered base (see :mod:`.images`) means a full backup now, not an
        incremental that could never be restored; a chain at its depth bound
        starts anew.
        """
        try:
            for devicename in self.layout.read_index(volname).devices:
                with images.open_chain(self.layout, volname, devicename) as chain:
                    if len(chain) >= images.MAX_CHAIN_DEPTH:
                        return f"ends a chain of {len(chain)} images, the most we build on"
        except (VolumeNotFoundError, IntegrityError, UnsafeArchiveError) as exc:
            return f"is unusable as a base ({exc})"
        return None

    def backup_get_target(self, vmid: int, vmtype: GuestType) -> str:
        """``backup/<vmtype>-<vmid>-<UTC time>``, chosen in ``backup_start``."""
        return self._guest(vmid).volname

    def backup_get_task_size(self, vmid: int) -> int:
        """Bytes the volume occupies on disk (allocated blocks of all its files).

        After ``backup_end`` this is the ``stored-size`` of its ``index.json``, the
        ``size`` that ``list`` shows for the volume (the task log is not counted).
        """
        guest = self._guest(vmid)
        if guest.workdir_fd >= 0:
            return allocated_size(guest.workdir_fd)
        if guest.final is None:
            return 0
        return guest.index.stored_size

    # configuration and log -------------------------------------------------------

    def backup_guest_config(self, vmid: int, filename: str) -> None:
        _store_host_file(filename, self._workdir_fd(vmid), GUEST_CONFIG)
        # The name it has in the backup: the host's copy is a temporary file.
        self.log("info", f"backup-dir: stored guest configuration as {GUEST_CONFIG}")

    def backup_firewall_config(self, vmid: int, filename: str) -> None:
        _store_host_file(filename, self._workdir_fd(vmid), FIREWALL_CONFIG)
        self.log("info", f"backup-dir: stored firewall configuration as {FIREWALL_CONFIG}")

    def backup_handle_log_file(self, vmid: int, filename: str) -> None:
        """Store the task log in the committed volume; nothing for aborted ones."""
        guest = self._guests.get(vmid)
        if guest is None:
            return  # backup_start failed: nothing was kept, so neither is its log
        if guest.final is None:
            self.log("info", f"backup-dir: backup of {vmid} did not complete, log not kept")
            return
        with owned_fd(self.layout.open_volume(guest.volname)) as volume_fd:
            _store_host_file(filename, volume_fd, TASK_LOG)

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
        # qemu-img and qemu-nbd take paths: hand them the directory we hold
        # (/proc/<pid>/fd/<fd>/<name>), not a path a storage writer could redirect.
        image_name = f"{_safe_devicename(devicename)}.qcow2"
        image = Path(safefs.fd_path(self._workdir_fd(vmid), image_name))
        guest.modes.add(bitmap_mode)
        backing: Path | None = None
        backing_name: str | None = None
        backing_volname: str | None = None
        if bitmap_mode is BitmapMode.REUSE:
            # Only dirty extents can be read: the rest must come from the base.
            if guest.base is None or bitmap_name is None:
                raise BaseUnusableError(
                    f"{devicename}: bitmap mode reuse but there is no previous backup to "
                    "apply it to; the next backup will be full"
                )
            # Threat: the storage changed since backup_get_mechanism proved the base.
            if guest.base_index_sha256 is None or (
                why := self._base_problem(guest.base, guest.base_index_sha256)
            ):
                # The next backup_get_mechanism finds the changed base again: full.
                raise BaseUnusableError(
                    f"{devicename}: the base {guest.base} changed during the backup"
                    f"{f' ({why})' if guest.base_index_sha256 else ''}; "
                    "the next backup will be full"
                )
            chain = self.layout.image_chain(guest.base, devicename)
            backing, backing_volname = chain[0], guest.base
            # Recorded relative to the image's directory, so that the storage can move.
            backing_name = f"../{VolumeName.parse(guest.base).dirname}/{chain[0].name}"
        stats = vm.backup_disk(
            nbd_path=nbd_path,
            devicename=devicename,
            image=image,
            backing=backing,
            backing_name=backing_name,
            bitmap_name=bitmap_name,
            bandwidth_limit=bandwidth_limit,
            log_function=self.log_function,
            connect_source=self.source_factory or connect,
        )
        image_size, image_sha256 = _file_digest(image)
        guest.index.devices[devicename] = DeviceEntry(
            size=stats.size,
            file=image.name,
            backing=backing_volname,
            bitmap_mode=bitmap_mode.value,
            image_size=image_size,
            image_sha256=image_sha256,
        )
        if backing_volname is not None:
            guest.index.parent = backing_volname
            guest.index.parent_index_sha256 = guest.base_index_sha256
        if bitmap_mode is not BitmapMode.NONE:
            # The host cleared (or created) the bitmap at this backup: the chain goes on.
            guest.index.bitmap_id = guest.bitmap_id
        self.log(
            "info",
            f"backup-dir: {devicename}: read {format_bytes(stats.read)}, wrote "
            f"{format_bytes(stats.written)}, {format_bytes(stats.zeroed)} zero",
        )

    def backup_directory(
        self,
        vmid: int,
        directory: str,
        id_map: Sequence[Sequence[str]],
        exclude_paths: Sequence[str],
        sources: Sequence[str],
        bandwidth_limit: int | None,
    ) -> None:
        """Archive the container as ``root.tar.zst`` or copy it as ``root/``."""
        guest = self._guest(vmid)
        guest.index.ct_format = self.ct_format
        workdir_fd = self._workdir_fd(vmid)
        if self.ct_format == "tar":
            name = TAR_NAME
            stats = paxtar.write_tar(
                directory,
                sources,
                id_map,
                exclude_paths,
                Path(safefs.fd_path(workdir_fd, name)),
                bandwidth_limit,
                self.log,
            )
        else:
            name = TREE_NAME
            stats = tree.copy_tree(
                directory, sources, id_map, exclude_paths, workdir_fd, name,
                bandwidth_limit, self.log,
            )
        self.log(
            "info",
            f"backup-dir: {stats.entries} entries, {format_bytes(stats.data)} of file data, "
            f"{stats.excluded} excluded, stored as {name}",
        )

    def backup_end(self, vmid: int) -> None:
        """Write ``index.json``, rename the volume into place, remember it as the base."""
        guest = self._guest(vmid)
        workdir_fd = self._workdir_fd(vmid)
        guest.index.stored_size = allocated_size(workdir_fd)
        index_sha256 = self.layout.write_index(workdir_fd, guest.index)
        crash_point("backup-after-index")
        guest.final = self.layout.commit(guest.volname, workdir_fd)
        _close_workdir(guest)
        if guest.index.vmtype is GuestType.QEMU:
            self.layout.set_last_successful(GuestType.QEMU, vmid, guest.volname)
            # The proof for the next incremental, kept outside the storage; the host
            # clears the bitmap only after we return.
            self._write_state(vmid, guest.volname, index_sha256, guest.index.bitmap_id)
        self.log(
            "info",
            f"backup-dir: committed {guest.volname} "
            f"({format_bytes(guest.index.stored_size)} stored)",
        )

    def backup_abort(self, vmid: int, error: str) -> None:
        """Remove everything this guest's backup wrote."""
        guest = self._guests.get(vmid)
        if guest is None or guest.aborted:
            return
        guest.aborted = True
        _close_workdir(guest)
        if BitmapMode.NEW in guest.modes and guest.final is None:
            # The new bitmap started after every committed volume: none of them may
            # be its base (should the host fail to drop it).
            self._write_state(vmid, None, None, None, "a backup that created a new bitmap failed")
        try:
            with owned_fd(self.layout.open_backup_dir()) as backup_fd:
                safefs.rmtree_at(backup_fd, guest.workdir.name, missing_ok=True)
        except (OSError, UnsafeStorageError) as exc:
            self.log("warn", f"backup-dir: cannot remove {guest.workdir}: {exc}")
            return
        self.log("info", f"backup-dir: backup of {vmid} aborted, removed {guest.workdir.name}")

    def _write_state(
        self,
        vmid: int,
        volname: str | None,
        index_sha256: str | None,
        bitmap_id: str | None,
        reason: str = "",
    ) -> None:
        self.hoststate.write(
            f"qemu-{vmid}",
            {
                "path": str(self.layout.root),
                "volume": volname,
                "index-sha256": index_sha256,
                "bitmap-id": bitmap_id,
                "reason": reason,
            },
        )

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
        # The host opens the returned path; a symlink planted here would hand it a
        # host file or directory as the archive: refused (the host's reader still
        # opens it without following, against a later swap).
        with owned_fd(self.layout.open_volume(volname)) as volume_fd:
            st = safefs.stat_at(volume_fd, name)
        if st is None:
            raise IntegrityError(f"backup volume {volname!r} lacks {name}")
        wanted = stat.S_ISREG if ct_format == "tar" else stat.S_ISDIR
        if not wanted(st.st_mode):
            raise UnsafeStorageError(
                f"backup volume {volname!r}: {name} is not a "
                f"{'regular file' if ct_format == 'tar' else 'directory'} (a symlink?)"
            )
        return self.layout.volume_path(volname) / name


def _close_workdir(guest: _GuestBackup) -> None:
    if guest.workdir_fd >= 0:
        os.close(guest.workdir_fd)
        guest.workdir_fd = -1


def _store_host_file(filename: str, dir_fd: int, name: str) -> None:
    """Copy the host file ``filename`` (trusted, small) as ``name`` into ``dir_fd``."""
    try:
        # The restore refuses a larger config: better to fail the backup now.
        data = safefs.read_file_path(filename, limit=MAX_CONFIG_FILE_SIZE)
    except OSError as exc:
        raise os_error(exc, f"cannot read {filename}") from exc
    try:
        safefs.atomic_write_at(dir_fd, name, data)
    except OSError as exc:  # ENOSPC above all: StorageFullError, exit 12
        raise os_error(exc, f"cannot store {name}") from exc


def _file_digest(path: Path) -> tuple[int, str]:
    """Size and SHA-256 of a file just written (pins the image in ``index.json``)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()
