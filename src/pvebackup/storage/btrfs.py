"""``btrfs``: ``dir``'s layout, raw images and container directories as subvolumes.

As Proxmox VE's ``BTRFSPlugin``: the volname of a raw image is
``<vmid>/vm-<vmid>-disk-<n>.raw`` but the file is
``<path>/images/<vmid>/vm-<vmid>-disk-<n>/disk.raw``, inside a btrfs subvolume
named without the ``.raw``; a container volume ``<vmid>/subvol-<vmid>-disk-<n>.subvol``
is a subvolume at that name; qcow2 images are plain files as on ``dir``.
Allocation is ``btrfs subvolume create`` (then a sparse ``disk.raw`` of the size;
``nocow`` is not applied), freeing ``btrfs subvolume delete``. Sized subvols are
refused, as PVE does (btrfs quotas).

Everything below ``path`` is reached through ``kit.safefs`` directory fds, as on
``dir``; ``btrfs`` gets ``/proc/self/fd/<held fd>/<name>`` paths.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from pvebackup.api.errors import (
    StateError,
    UnsafeStorageError,
    VolumeNotFoundError,
)
from pvebackup.kit import safefs
from pvebackup.kit.safefs import owned_fd
from pvebackup.storage.dir import _DIR_PROPERTIES, DirPlugin
from pvebackup.storage.guestvol import SUBVOL, GuestVolume, run_tool
from pvebackup.storage.properties import PropertySpec
from pvebackup.storage.pve import PVE_STORAGE_PROPERTIES

__all__ = ["BtrfsPlugin", "RAW_FILE"]

RAW_FILE = "disk.raw"

_PROPERTIES: Mapping[str, PropertySpec] = {
    **PVE_STORAGE_PROPERTIES["btrfs"],
    **{k: v for k, v in _DIR_PROPERTIES.items() if k in PVE_STORAGE_PROPERTIES["btrfs"]},
}


class BtrfsPlugin(DirPlugin):
    """``btrfs: ID`` with ``path`` on a btrfs file system."""

    type: ClassVar[str] = "btrfs"
    properties: ClassVar[Mapping[str, PropertySpec]] = _PROPERTIES
    image_formats: ClassVar[tuple[str, ...]] = ("raw", "qcow2")

    @staticmethod
    def _subvol_name(name: str) -> str | None:
        """The subvolume holding a raw image ``name``; None for other volumes."""
        return name[: -len(".raw")] if name.endswith(".raw") else None

    def image_path(self, scfg: Mapping[str, str], volname: str) -> Path:
        path = super().image_path(scfg, volname)
        sub = self._subvol_name(path.name)
        return path if sub is None else path.parent / sub / RAW_FILE

    def guest_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> GuestVolume:
        vmid, name = self._split_volname(volname)
        sub = self._subvol_name(name)
        if sub is None:
            return super().guest_volume(scfg, storeid, volname)
        path = self.image_path(scfg, volname)
        # A hostile share could make the subvolume or disk.raw a symlink.
        try:
            with owned_fd(safefs.open_dir(self._base(scfg), ("images", str(vmid), sub))) as fd:
                st = safefs.stat_at(fd, RAW_FILE)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise UnsafeStorageError(f"refusing volume {volname}: {path} is no regular file")
        return GuestVolume(str(path), "raw", "file")

    def volume_exists(self, scfg: Mapping[str, str], storeid: str, volname: str) -> bool:
        vmid, name = self._split_volname(volname)
        entry = self._subvol_name(name) or name
        try:
            with owned_fd(safefs.open_dir(self._base(scfg), ("images", str(vmid)))) as fd:
                return safefs.stat_at(fd, entry) is not None
        except (FileNotFoundError, NotADirectoryError):
            return False

    def alloc_image(
        self,
        scfg: Mapping[str, str],
        storeid: str,
        vmid: int,
        fmt: str,
        size: int,
        name: str | None = None,
    ) -> str:
        if fmt != "raw":
            return super().alloc_image(scfg, storeid, vmid, fmt, size, name=name)
        if name is None:
            name = self.free_name(scfg, vmid, "raw")
        sub = self._subvol_name(name)
        if sub is None or size <= 0:
            return super().alloc_image(scfg, storeid, vmid, fmt, size, name=name)  # refuses
        self._activate(scfg, storeid)
        with owned_fd(self._vm_dir(scfg, vmid)) as vm_fd:
            if safefs.stat_at(vm_fd, sub) is not None:
                raise StateError(f"volume {vmid}/{name} exists already")
            run_tool(
                ["btrfs", "-q", "subvolume", "create", "--", safefs.fd_path(vm_fd, sub)],
                f"creating btrfs subvolume for {vmid}/{name}",
            )
            try:
                with owned_fd(safefs.open_dir(vm_fd, (sub,))) as sub_fd:
                    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                    with owned_fd(os.open(RAW_FILE, flags, 0o600, dir_fd=sub_fd)) as fd:
                        os.ftruncate(fd, size)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._delete_subvol(vm_fd, sub)
                raise
        return f"{vmid}/{name}"

    def alloc_subvol(
        self, scfg: Mapping[str, str], storeid: str, vmid: int, name: str | None = None
    ) -> str:
        if name is None:
            name = self.free_name(scfg, vmid, SUBVOL)
        self._activate(scfg, storeid)
        with owned_fd(self._vm_dir(scfg, vmid)) as vm_fd:
            if safefs.stat_at(vm_fd, name) is not None:
                raise StateError(f"volume {vmid}/{name} exists already")
            run_tool(
                ["btrfs", "-q", "subvolume", "create", "--", safefs.fd_path(vm_fd, name)],
                f"creating btrfs subvolume {vmid}/{name}",
            )
        return f"{vmid}/{name}"

    @staticmethod
    def _delete_subvol(vm_fd: int, entry: str) -> None:
        st = safefs.stat_at(vm_fd, entry)
        if st is None or not stat.S_ISDIR(st.st_mode):
            # Threat: a planted symlink must not make btrfs delete what it names.
            raise UnsafeStorageError(f"refusing to delete {entry}: not a directory")
        run_tool(
            ["btrfs", "-q", "subvolume", "delete", "--", safefs.fd_path(vm_fd, entry)],
            f"deleting btrfs subvolume {entry}",
        )

    def free_image(self, scfg: Mapping[str, str], volname: str) -> None:
        vmid, name = self._split_volname(volname)
        if not name.endswith((".raw", f".{SUBVOL}")):
            return super().free_image(scfg, volname)
        entry = self._subvol_name(name) or name
        missing = VolumeNotFoundError(f"volume {volname} not found")
        try:
            images_fd = safefs.open_dir(self._base(scfg), ("images",))
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise missing from exc
        with owned_fd(images_fd):
            try:
                vm_fd = safefs.open_dir(images_fd, (str(vmid),))
            except (FileNotFoundError, NotADirectoryError) as exc:
                raise missing from exc
            with owned_fd(vm_fd):
                if safefs.stat_at(vm_fd, entry) is None:
                    raise missing
                self._delete_subvol(vm_fd, entry)
            with contextlib.suppress(OSError):
                os.rmdir(str(vmid), dir_fd=images_fd)  # ENOTEMPTY: other volumes remain
