"""The built-in ``dir`` storage: a plain directory holding guest images.

Layout, as in Proxmox VE: ``<path>/images/<vmid>/<name>``, where ``<name>`` is
``vm-<vmid>-disk-<n>.<fmt>`` for a VM disk image (qcow2 or raw) or
``subvol-<vmid>-disk-<n>.subvol`` for a container's root or mount point
directory. The volume name is ``<vmid>/<name>``. The host side uses it for the
guests it backs up and restores; it has no backup provider.

Threat: whoever can write the storage can make ``images``, ``images/<vmid>`` or a
volume a symlink, so that an allocation writes, or ``free_image`` deletes,
outside it. Below the configured ``path`` (trusted, it may be a symlink)
everything is reached through directory fds without following symlinks
(:mod:`pvebackup.kit.safefs`); what is not a real directory or file raises
``UnsafeStorageError``. ``image_path`` hands out a path (the host's tools take
paths): it refuses a symlink met on it at the time of the call.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import ClassVar

from pvebackup.api.errors import (
    ExternalToolError,
    StateError,
    UnsafeStorageError,
    UnsupportedError,
    UsageError,
    VolumeNotFoundError,
)
from pvebackup.kit import qemuimg, safefs
from pvebackup.kit.safefs import owned_fd
from pvebackup.storage.basepath import BASE_PATH_PROPERTIES, CREATE_SUBDIRS, BasePath
from pvebackup.storage.guestvol import SUBVOL, GuestVolume, GuestVolumeStorage
from pvebackup.storage.plugin import COMMON_PROPERTIES
from pvebackup.storage.properties import PropertyKind, PropertySpec
from pvebackup.storage.pve import LEGACY_PROPERTIES

__all__ = ["DirPlugin", "IMAGE_FORMATS"]

IMAGE_FORMATS = ("raw", "qcow2")
"""Disk image formats ``alloc_image`` creates."""

# vm-, base- (templates) and subvol- names share one disk number space per vmid,
# as in Proxmox VE, so that vm-100-disk-0 and subvol-100-disk-0 never coexist.
_DISK_NUMBER = re.compile(r"^(?:vm|base|subvol)-(\d+)-disk-(\d+)(?:\.|$)")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# <vmid>/<name>, or a linked clone's <basevmid>/<basename>/<vmid>/<name>, whose
# image lives at images/<vmid>/<name> like any other (its base is its backing file).
_VOLNAME = re.compile(r"^(?:\d+/[^/]+/)?(\d+)/([^/]+)$")

_DIR_PROPERTIES: dict[str, PropertySpec] = {
    **COMMON_PROPERTIES,
    "path": PropertySpec(
        PropertyKind.PATH, required=True, description="file system path of the storage"
    ),
    "content-dirs": PropertySpec(description="overrides of the default content dirs"),
    **BASE_PATH_PROPERTIES,
    **CREATE_SUBDIRS,
    # Proxmox VE's own value sets, so that a real node's storage.cfg parses.
    "format": PropertySpec(
        PropertyKind.ENUM,
        choices=("raw", "qcow2", "vmdk", "subvol"),
        description="default image format",
    ),
    "preallocation": PropertySpec(
        PropertyKind.ENUM,
        choices=("off", "metadata", "falloc", "full"),
        description="qcow2/raw preallocation mode of new images",
    ),
    "prune-backups": PropertySpec(description="retention options for backups"),
    "max-protected-backups": PropertySpec(
        PropertyKind.INT, minimum=-1, description="limit of protected backups (-1: none)"
    ),
    "bwlimit": PropertySpec(description="bandwidth limits per operation"),
    "snapshot-as-volume-chain": PropertySpec(
        PropertyKind.BOOL, description="snapshots as external qcow2 volume chains (PVE 9)"
    ),
    **LEGACY_PROPERTIES["dir"],
}


class DirPlugin(GuestVolumeStorage):
    """Plain directory storage (``dir: ID`` with ``path``)."""

    type: ClassVar[str] = "dir"
    properties: ClassVar[Mapping[str, PropertySpec]] = _DIR_PROPERTIES
    image_formats: ClassVar[tuple[str, ...]] = IMAGE_FORMATS[::-1]  # qcow2 first
    subvols: ClassVar[bool] = True

    # the guest volume interface (pvebackup.storage.guestvol) ---------------------

    def guest_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> GuestVolume:
        """A file (``.qcow2``/``.raw``) or a subvol directory (``.subvol``)."""
        path = self.image_path(scfg, volname)
        suffix = path.name.rpartition(".")[2] if "." in path.name else ""
        if suffix in IMAGE_FORMATS:
            return GuestVolume(str(path), suffix, "file")
        if suffix == SUBVOL or path.name.startswith("subvol-"):
            return GuestVolume(str(path), SUBVOL, "dir")
        raise UnsupportedError(f"volume {volname}: unsupported image format (qcow2 or raw)")

    def volume_exists(self, scfg: Mapping[str, str], storeid: str, volname: str) -> bool:
        return os.path.lexists(self.image_path(scfg, volname))

    def next_volname(self, scfg: Mapping[str, str], storeid: str, vmid: int, fmt: str) -> str:
        self.check_format(storeid, fmt)
        return f"{vmid}/{self.free_name(scfg, vmid, fmt)}"

    def allocate(
        self,
        scfg: Mapping[str, str],
        storeid: str,
        vmid: int,
        fmt: str,
        size: int,
        volname: str,
    ) -> str:
        self.check_format(storeid, fmt)
        owner, name = self._split_volname(volname)
        if owner != vmid or volname != f"{owner}/{name}":
            raise UsageError(f"illegal volume name {volname!r}: should be '{vmid}/...'")
        if fmt == SUBVOL:
            return self.alloc_subvol(scfg, storeid, vmid, name=name)
        return self.alloc_image(scfg, storeid, vmid, fmt, size, name=name)

    def free(self, scfg: Mapping[str, str], storeid: str, volname: str) -> None:
        self.free_image(scfg, volname)

    # paths -----------------------------------------------------------------------

    def _base(self, scfg: Mapping[str, str]) -> Path:
        # image_path & co. get no storeid (Proxmox VE's signatures); messages say "dir"
        return self.parse_properties(scfg, "dir").path("path")

    def image_path(self, scfg: Mapping[str, str], volname: str) -> Path:
        """``<path>/images/<vmid>/<name>`` for volname ``<vmid>/<name>``.

        A linked clone's volname, ``<basevmid>/<basename>/<vmid>/<name>``, names the
        same path (the base image is the qcow2's backing file).

        :raises UsageError: ``volname`` is not ``<vmid>/<name>`` with a plain name.
        """
        vmid, name = self._split_volname(volname)
        base = self._base(scfg)
        # A symlink below the configured path is refused now; what does not exist
        # yet is fine (the caller may be about to allocate it).
        try:
            with owned_fd(safefs.open_dir(base, ("images", str(vmid)))) as vm_fd:
                st = safefs.stat_at(vm_fd, name)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise UnsafeStorageError(f"refusing volume {volname}: it is a symlink")
        return base / "images" / str(vmid) / name

    @staticmethod
    def _split_volname(volname: str) -> tuple[int, str]:
        m = _VOLNAME.match(volname)
        if m is None or not _NAME.match(m.group(2)):
            raise UsageError(f"invalid dir volume name {volname!r}: expected <vmid>/<name>")
        return int(m.group(1)), m.group(2)

    def _vm_dir(self, scfg: Mapping[str, str], vmid: int) -> int:
        """An fd of ``<path>/images/<vmid>``, created if missing (the caller closes it)."""
        if vmid <= 0:
            raise UsageError(f"invalid vmid {vmid}")
        base = self._base(scfg)
        return safefs.open_dir(base, ("images", str(vmid)), create=True)

    def _activate(self, scfg: Mapping[str, str], storeid: str) -> None:
        # Before an allocation writes: is_mountpoint and create-base-path as in
        # PVE's activate_storage (default: create), so an unmounted disk is refused.
        props = self.parse_properties(scfg, storeid)
        BasePath.from_properties(props, create_default=True).activate(create=True)

    @staticmethod
    def _free_numbers(vm_fd: int, vmid: int) -> list[int]:
        used: set[int] = set()
        for entry in safefs.listdir_at(vm_fd):
            m = _DISK_NUMBER.match(entry.name)
            if m and int(m.group(1)) == vmid:
                used.add(int(m.group(2)))
        # every number up to len(used) is a candidate, so one is always free
        return [n for n in range(len(used) + 1) if n not in used]

    # allocation ------------------------------------------------------------------

    def alloc_image(
        self,
        scfg: Mapping[str, str],
        storeid: str,
        vmid: int,
        fmt: str,
        size: int,
        name: str | None = None,
    ) -> str:
        """Create a disk image with ``qemu-img create`` and return its volname.

        :param fmt: ``qcow2`` or ``raw``.
        :param size: virtual size in bytes (> 0).
        :param name: file name; default ``vm-<vmid>-disk-<n>.<fmt>`` with the
            lowest free ``n``. A given name must end in ``.<fmt>``.
        :returns: ``<vmid>/<name>``.
        :raises UsageError: bad format, size or name.
        :raises StateError: ``name`` exists already.
        :raises StorageUnavailableError: ``is_mountpoint`` not mounted, or the
            path missing and ``create-base-path`` off.
        :raises ExternalToolError: qemu-img failed (nothing is left behind).
        """
        if fmt not in IMAGE_FORMATS:
            raise UsageError(f"unsupported image format {fmt!r}; use one of {IMAGE_FORMATS}")
        if size <= 0:
            raise UsageError(f"invalid image size {size}")
        if name is not None and (not _NAME.match(name) or not name.endswith(f".{fmt}")):
            raise UsageError(f"invalid image name {name!r}: a file name ending in .{fmt}")
        self._activate(scfg, storeid)
        with owned_fd(self._vm_dir(scfg, vmid)) as vm_fd:
            reserved = self._reserve(vm_fd, vmid, name, lambda n: f"vm-{vmid}-disk-{n}.{fmt}")
            path = self._base(scfg) / "images" / str(vmid) / reserved
            options = []
            preallocation = self.parse_properties(scfg, storeid).text("preallocation")
            if preallocation is not None:
                options.append(f"preallocation={preallocation}")
            try:
                # The directory we hold, not a path that could be redirected meanwhile.
                qemuimg.create(safefs.fd_path(vm_fd, reserved), size, fmt=fmt, options=options)
            except BaseException as exc:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(reserved, dir_fd=vm_fd)
                if isinstance(exc, ExternalToolError):
                    raise ExternalToolError(
                        f"qemu-img create {path} failed: {exc.stderr or exc}",
                        returncode=exc.returncode,
                        stderr=exc.stderr,
                    ) from exc
                raise
        return f"{vmid}/{reserved}"

    def free_name(self, scfg: Mapping[str, str], vmid: int, fmt: str) -> str:
        """The name ``alloc_image`` (``fmt`` qcow2/raw) or ``alloc_subvol`` (``fmt``
        ``subvol``) would pick now, so that a caller can record it before allocating.
        """
        if vmid <= 0:
            raise UsageError(f"invalid vmid {vmid}")
        try:  # creates nothing: the allocation does that
            vm_fd = safefs.open_dir(self._base(scfg), ("images", str(vmid)))
        except FileNotFoundError:
            n = 0
        else:
            with owned_fd(vm_fd):
                n = self._free_numbers(vm_fd, vmid)[0]
        if fmt == "subvol":
            return f"subvol-{vmid}-disk-{n}.subvol"
        if fmt not in IMAGE_FORMATS:
            raise UsageError(f"unsupported image format {fmt!r}; use one of {IMAGE_FORMATS}")
        return f"vm-{vmid}-disk-{n}.{fmt}"

    @staticmethod
    def _reserve(
        vm_fd: int, vmid: int, name: str | None, default: Callable[[int], str]
    ) -> str:
        # O_EXCL makes the name ours even if another allocation races with us;
        # qemu-img create then overwrites the empty placeholder. O_EXCL never
        # follows a symlink: one planted at the name counts as taken.
        if name is not None:
            candidates = [name]
        else:
            candidates = [default(n) for n in DirPlugin._free_numbers(vm_fd, vmid)]
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        for candidate in candidates:
            try:
                os.close(os.open(candidate, flags, 0o600, dir_fd=vm_fd))
            except FileExistsError:
                continue
            return candidate
        if name is not None:
            raise StateError(f"volume {vmid}/{name} exists already")
        return DirPlugin._reserve(vm_fd, vmid, None, default)  # lost a race: rescan

    def alloc_subvol(
        self, scfg: Mapping[str, str], storeid: str, vmid: int, name: str | None = None
    ) -> str:
        """Create a container subvol directory and return its volname.

        :param name: directory name; default ``subvol-<vmid>-disk-<n>.subvol``
            with the lowest free ``n``.
        :returns: ``<vmid>/<name>``; the directory is ``<path>/images/<vmid>/<name>``.
        :raises UsageError: bad name.
        :raises StateError: ``name`` exists already.
        """
        if name is not None and not _NAME.match(name):
            raise UsageError(f"invalid subvol name {name!r}")
        self._activate(scfg, storeid)
        with owned_fd(self._vm_dir(scfg, vmid)) as vm_fd:
            while True:
                if name is not None:
                    candidates = [name]
                else:
                    candidates = [
                        f"subvol-{vmid}-disk-{n}.subvol"
                        for n in self._free_numbers(vm_fd, vmid)
                    ]
                for candidate in candidates:
                    try:
                        os.mkdir(candidate, 0o755, dir_fd=vm_fd)
                    except FileExistsError:
                        continue
                    return f"{vmid}/{candidate}"
                if name is not None:
                    raise StateError(f"volume {vmid}/{name} exists already")

    def free_image(self, scfg: Mapping[str, str], volname: str) -> None:
        """Remove an image file or a subvol directory (with its content).

        The guest's ``images/<vmid>`` directory goes too once it is empty, so that
        freeing what an allocation made (a failed restore) leaves nothing behind.

        :raises VolumeNotFoundError: it does not exist.
        """
        vmid, name = self._split_volname(volname)
        path = self._base(scfg) / "images" / str(vmid) / name
        missing = VolumeNotFoundError(f"volume {volname} not found at {path}")
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
                st = safefs.stat_at(vm_fd, name)
                if st is None:
                    raise missing
                if stat.S_ISDIR(st.st_mode):
                    safefs.rmtree_at(vm_fd, name)
                elif stat.S_ISREG(st.st_mode):
                    os.unlink(name, dir_fd=vm_fd)
                else:
                    raise UnsafeStorageError(
                        f"refusing to free {volname}: not a regular file or directory"
                    )
            try:
                os.rmdir(str(vmid), dir_fd=images_fd)
            except OSError:
                pass  # other volumes of the guest are still there (ENOTEMPTY)
