"""Volume names and the on-disk layout of a ``backup-dir`` storage.

One backup of one guest is one *volume*, a directory under ``<path>/backup/``::

    <path>/backup/
        vm-100-2026-11-26T09:30:00Z/       volname "backup/vm-100-2026-11-26T09:30:00Z"
            index.json                     what is in here (see BackupIndex), written last
            guest.conf                     the guest configuration
            firewall.fw                    the firewall configuration (optional)
            task.log                       the task log (added after the rename)
            drive-scsi0.qcow2              one image per disk (VMs)
            root.tar.zst | root/           the filesystem (containers)
        .tmp-ct-101-2026-11-26T09:31:12Z/  a backup in progress (invisible to listings)
        .last/qemu-100                     volname of the last successful VM backup

Volume names follow the one scheme of both our providers
(:mod:`pvebackup.kit.volname`): ``backup/<vm|ct>-<vmid>-<ISO 8601 UTC time>``.
The time is the backup's start in UTC, so names sort by time and two hosts never
disagree about them. A volume is written under a ``.tmp-`` name and
renamed into place only when the guest's backup succeeded, so a listed volume is
always complete.

``.last/qemu-<vmid>`` names the guest's last successful backup: the host cleared
the dirty bitmap at that point. Only that volume may be the base of an
incremental backup: if it was removed, an older volume would be missing the
changes it held, so the next backup must be a full one.

Threat: whoever can write the storage can make ``backup/``, a volume, ``.last``
or a file in them a symlink (or swap one in while we run). Below the configured
``path`` (trusted: it may be a symlink to a mounted disk) everything is reached
through directory fds without following symlinks (:mod:`pvebackup.kit.safefs`):
``remove`` refuses a symlinked volume with ``UnsafeStorageError`` and never
deletes through one; listing skips what is not a real directory; backups write
only into directories they hold open.

``.last`` alone is not trusted to name the base: the provider's host state file
holds the SHA-256 of that volume's ``index.json`` (which pins image sizes and
checksums, and through ``parent-index-sha256`` every index below it), and
``.last`` must agree with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pvebackup.api.errors import (
    CorruptIndexError,
    IntegrityError,
    PermanentBackendError,
    UnsafeStorageError,
    VolumeInUseError,
    VolumeNotFoundError,
)
from pvebackup.api.types import GuestType
from pvebackup.kit import safefs
from pvebackup.kit.safefs import owned_fd
from pvebackup.kit.volname import MAX_TIME, TIME_PATTERN, VMID_PATTERN, BackupVolname

__all__ = [
    "INDEX_FORMAT",
    "INDEX_NAME",
    "BackupIndex",
    "DeviceEntry",
    "VolumeLayout",
    "VolumeName",
    "allocated_size",
]

INDEX_NAME = "index.json"
INDEX_FORMAT = "pvebackup-backup-dir-v1"
INDEX_MAX = 1 << 20
"""Largest ``index.json`` read: a hostile one must not make us allocate without bound."""
LAST_DIR = ".last"
TEMP_PREFIX = ".tmp-"
_STAMP_FORMAT = "%Y_%m_%d-%H_%M_%S"
# Candidates only (a well-formed name with an impossible date is reported as a
# damaged volume by VolumeName.parse, never silently skipped).
_VOLNAME_RE = re.compile(rf"^backup/(vm|ct)-{VMID_PATTERN}-{TIME_PATTERN}$", re.ASCII)


@dataclass(frozen=True, slots=True)
class VolumeName:
    """The parts of a volume name ``backup/<vm|ct>-<vmid>-<UTC time>``.

    The scheme is :mod:`pvebackup.kit.volname`, shared with backup-store
    (``backup/vm-100-2026-12-01T20:52:27Z``); the volume's directory below
    ``<path>/backup/`` has the same name without ``backup/``.
    """

    vmtype: GuestType
    vmid: int
    ctime: int
    """Backup start, Unix seconds (whole seconds: the name has no finer time)."""

    @property
    def stamp(self) -> str:
        """The UTC time without separators a bitmap id dislikes: ``2026_11_26-09_30_00``."""
        return datetime.fromtimestamp(self.ctime, UTC).strftime(_STAMP_FORMAT)

    def __str__(self) -> str:
        return str(BackupVolname(self.vmtype, self.vmid, self.ctime))

    @property
    def dirname(self) -> str:
        """The volume's directory name below ``<path>/backup/``."""
        return BackupVolname(self.vmtype, self.vmid, self.ctime).dirname

    @classmethod
    def parse(cls, volname: str) -> VolumeName:
        """Split a volume name; :class:`VolumeNotFoundError` if it is not one of ours.

        Names come from the storage (hostile): an impossible or non-canonical time
        is refused here, so one volume never has two names.
        """
        try:
            name = BackupVolname.parse(volname)
        except ValueError as exc:
            raise VolumeNotFoundError(f"not a backup-dir volume: {exc}") from exc
        return cls(name.guest_type, name.vmid, name.backup_time)


@dataclass(slots=True)
class DeviceEntry:
    """One disk of a VM backup, as recorded in ``index.json``."""

    size: int
    """Virtual size of the disk in bytes."""
    file: str
    """Image file name inside the volume, ``<devicename>.qcow2``."""
    backing: str | None = None
    """Volume name whose image of the same device is this image's backing file."""
    bitmap_mode: str = "none"
    """The bitmap mode the host reported for this disk: none, new or reuse."""
    image_size: int | None = None
    """Bytes of the image file when it was committed (pins it cheaply)."""
    image_sha256: str | None = None
    """SHA-256 of the image file when it was committed."""


@dataclass(slots=True)
class BackupIndex:
    """``index.json``: what a volume holds. Written last, just before the rename."""

    vmid: int
    vmtype: GuestType
    ctime: int
    devices: dict[str, DeviceEntry] = field(default_factory=dict)
    bitmap_id: str | None = None
    parent: str | None = None
    """Volume name this backup's images depend on (an incremental chain), if any."""
    ct_format: str | None = None
    """``tar`` or ``directory`` for containers, None for VMs."""
    stored_size: int = 0
    """Bytes the volume occupies on disk (allocated blocks) when it was committed."""
    parent_index_sha256: str | None = None
    """SHA-256 of the parent volume's ``index.json``: a hash chain, so that pinning
    the top index (the host keeps its checksum) pins every index below it."""

    def to_json(self) -> str:
        """Serialise to the stable JSON form stored in ``index.json``."""
        data: dict[str, Any] = {
            "format": INDEX_FORMAT,
            "vmid": self.vmid,
            "vmtype": self.vmtype.value,
            "ctime": self.ctime,
            "devices": {
                name: {
                    "size": dev.size,
                    "file": dev.file,
                    "backing": dev.backing,
                    "bitmap-mode": dev.bitmap_mode,
                    "image-size": dev.image_size,
                    "image-sha256": dev.image_sha256,
                }
                for name, dev in self.devices.items()
            },
            "bitmap-id": self.bitmap_id,
            "parent": self.parent,
            "ct-format": self.ct_format,
            "stored-size": self.stored_size,
            "parent-index-sha256": self.parent_index_sha256,
        }
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str) -> BackupIndex:
        """Parse ``index.json``; :class:`CorruptIndexError` naming ``where`` if malformed.

        Field by field, since the storage may be written by others: a list where a
        dict belongs, a string for a number, ``true`` for 1, negative or huge sizes,
        NaN, unknown enum values and nesting bombs are all refused, never coerced.
        """
        try:
            data = _typed(json.loads(text), dict, "index")
            if data.get("format") != INDEX_FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r:.40}")
            devices: dict[str, DeviceEntry] = {}
            for name, dev in _typed(data.get("devices", {}), dict, "devices").items():
                _typed(dev, dict, f"device {name!r:.40}")
                devices[name] = DeviceEntry(
                    size=_ranged(dev["size"], 0, _MAX_SIZE, "size"),
                    file=_typed(dev["file"], str, "file"),
                    backing=_typed(dev.get("backing"), (str, type(None)), "backing"),
                    bitmap_mode=_choice(dev.get("bitmap-mode", "none"), _BITMAP_MODES, "mode"),
                    image_size=_opt_int(dev.get("image-size")),
                    image_sha256=_opt_str(dev.get("image-sha256")),
                )
            return cls(
                vmid=_ranged(data["vmid"], 1, 999_999_999, "vmid"),
                vmtype=GuestType(_typed(data["vmtype"], str, "vmtype")),
                ctime=_ranged(data["ctime"], 0, _MAX_TIME, "ctime"),
                devices=devices,
                bitmap_id=_typed(data.get("bitmap-id"), (str, type(None)), "bitmap-id"),
                parent=_typed(data.get("parent"), (str, type(None)), "parent"),
                ct_format=_choice(data.get("ct-format"), _CT_FORMATS, "ct-format"),
                stored_size=_ranged(data.get("stored-size", 0), 0, _MAX_SIZE, "stored-size"),
                parent_index_sha256=_opt_str(data.get("parent-index-sha256")),
            )
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise CorruptIndexError(f"{where}: malformed {INDEX_NAME}: {exc}") from exc


_MAX_SIZE = (1 << 63) - 1  # what a file system (and qemu) can address
_MAX_TIME = MAX_TIME
_BITMAP_MODES = frozenset({"none", "new", "reuse"})
_CT_FORMATS = frozenset({None, "tar", "directory"})
_MAX_LAST_RECORD = 4096  # one volume name and a newline


def _typed(value: Any, t: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(value, t) or (t is int and isinstance(value, bool)):
        raise TypeError(f"{what}: {value!r:.80} has the wrong type")
    return value


def _ranged(value: Any, lo: int, hi: int, what: str) -> int:
    if not lo <= _typed(value, int, what) <= hi:
        raise ValueError(f"{what}: {value} out of range")
    return int(value)


def _choice(value: Any, allowed: frozenset[str | None], what: str) -> Any:
    if not isinstance(value, str | None) or value not in allowed:
        raise ValueError(f"{what}: {value!r:.40} is not one of {sorted(map(str, allowed))}")
    return value


def _opt_int(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{value!r} is not an integer")
    return value


def _opt_str(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


def allocated_size(dir_fd: int) -> int:
    """Bytes the directory ``dir_fd`` occupies on disk: its blocks and all below it.

    Holes in sparse files (unallocated qcow2 clusters, skipped zero areas) do not
    count, hard links inside the tree count once. Walked by fds: a symlink in
    the tree counts as itself and is never followed.
    """
    total = os.fstat(dir_fd).st_blocks * 512
    seen: set[tuple[int, int]] = set()
    # One frame per level of the current path (fds: the depth, not the width).
    top = os.dup(dir_fd)
    stack: list[tuple[int, list[os.DirEntry[str]]]] = []
    try:
        stack.append((top, safefs.listdir_at(top)))
    except BaseException:
        os.close(top)
        raise
    try:
        while stack:
            fd, entries = stack[-1]
            if not entries:
                os.close(stack.pop()[0])
                continue
            entry = entries.pop()
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                try:
                    child = safefs.open_dir(fd, (entry.name,))
                except (FileNotFoundError, NotADirectoryError, UnsafeStorageError):
                    continue  # changed under us: it is not ours to count
                try:
                    stack.append((child, safefs.listdir_at(child)))
                except BaseException:
                    os.close(child)
                    raise
            elif st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            total += st.st_blocks * 512
    finally:
        for fd, _ in stack:
            os.close(fd)
    return total


class VolumeLayout:
    """The volumes of one ``backup-dir`` storage, rooted at its ``path`` property."""

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)
        self.backup_dir = self.root / "backup"

    # names and paths ---------------------------------------------------------------

    def volume_path(self, volname: str) -> Path:
        """Directory of a committed volume (it may not exist)."""
        return self.backup_dir / VolumeName.parse(volname).dirname

    def temp_path(self, volname: str) -> Path:
        """Directory a volume is written to before it is committed."""
        return self.backup_dir / _temp_name(volname)

    def open_backup_dir(self, *, create: bool = False) -> int:
        """An fd of ``<path>/backup`` (the caller closes it).

        :raises FileNotFoundError: it does not exist (and not ``create``).
        :raises UnsafeStorageError: it is a symlink or special file.
        """
        return safefs.open_dir(self.root, ("backup",), create=create)

    def open_volume(self, volname: str) -> int:
        """An fd of a committed volume's directory (the caller closes it).

        :raises VolumeNotFoundError: no such volume.
        :raises UnsafeStorageError: it, or ``backup/``, is a symlink or special file.
        """
        dirname = VolumeName.parse(volname).dirname
        try:
            return safefs.open_dir(self.root, ("backup", dirname))
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise VolumeNotFoundError(f"backup volume {volname!r} does not exist") from exc

    def new_volname(self, vmtype: GuestType, vmid: int, now: float) -> str:
        """A fresh volume name for a backup starting at ``now``.

        Two backups of one guest within one second get consecutive seconds, so a
        name is never reused while its volume or its temporary directory exists.
        """
        ctime = int(now)
        with owned_fd(self.open_backup_dir(create=True)) as backup_fd:
            while True:
                volname = str(VolumeName(vmtype, vmid, ctime))
                dirname = VolumeName.parse(volname).dirname
                taken = safefs.exists_at(backup_fd, dirname)
                if not taken and not safefs.exists_at(backup_fd, _temp_name(volname)):
                    return volname
                ctime += 1

    def create_temp(self, volname: str) -> int:
        """Create the temporary directory of ``volname`` and return an fd of it.

        Everything a backup writes goes through this fd, so a directory swapped in
        for it at its path later (a symlink out of the storage) is never written.

        :raises FileExistsError: it exists already.
        """
        with owned_fd(self.open_backup_dir(create=True)) as backup_fd:
            return safefs.make_dir_at(backup_fd, _temp_name(volname), 0o755)

    # reading -----------------------------------------------------------------------

    def read_index(self, volname: str) -> BackupIndex:
        """The index of a committed volume; see :meth:`read_index_checked`."""
        return self.read_index_checked(volname)[0]

    def read_index_checked(self, volname: str) -> tuple[BackupIndex, str]:
        """The index of a committed volume and the SHA-256 of its bytes.

        :raises VolumeNotFoundError: no such volume.
        :raises CorruptIndexError: ``index.json`` is unreadable, not a regular file,
            too large, not JSON, of wrong types, or names another guest.
        """
        name = VolumeName.parse(volname)
        index_path = self.volume_path(volname) / INDEX_NAME
        with owned_fd(self.open_volume(volname)) as volume_fd:
            try:
                data = safefs.read_file_at(volume_fd, INDEX_NAME, limit=INDEX_MAX)
            except FileNotFoundError as exc:
                raise VolumeNotFoundError(f"backup volume {volname!r} does not exist") from exc
            except OSError as exc:  # a directory, ELOOP, EIO...: damaged, never followed
                raise CorruptIndexError(f"{index_path}: cannot read: {exc.strerror}") from exc
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptIndexError(f"{index_path}: {INDEX_NAME} is not UTF-8") from exc
        index = BackupIndex.from_json(text, str(index_path))
        if (index.vmtype, index.vmid) != (name.vmtype, name.vmid):
            raise CorruptIndexError(
                f"{index_path}: describes {index.vmtype.value} {index.vmid}, not its volume"
            )
        return index, hashlib.sha256(data).hexdigest()

    def volnames(self) -> Iterator[str]:
        """Names of the committed volumes, oldest first (temporary ones are skipped).

        A directory shaped like a volume whose name is damaged (an impossible
        date) is left out; :meth:`scan` reports it.
        """
        yield from self.scan()[0]

    def scan(self) -> tuple[list[str], list[tuple[str, str]]]:
        """``(volnames oldest first, [(damaged volname, reason)])``.

        One damaged directory never hides the others: what looks like a volume
        (``vm|ct-<vmid>-<time>`` with an ``index.json``) but has an impossible
        time in its name is reported instead of listed. Other names are not ours.
        """
        try:
            backup_fd = self.open_backup_dir()
        except (FileNotFoundError, NotADirectoryError):
            return [], []
        names: list[tuple[int, str]] = []
        damaged: list[tuple[str, str]] = []
        with owned_fd(backup_fd):
            try:
                entries = safefs.listdir_at(backup_fd)
            except OSError as exc:  # the directory itself: no listing at all
                raise PermanentBackendError(
                    f"{self.backup_dir}: cannot list: {exc.strerror}"
                ) from exc
            for entry in entries:
                volname = f"backup/{entry.name}"
                # A symlink is not a volume: never listed, never looked into.
                if not _VOLNAME_RE.match(volname) or not entry.is_dir(follow_symlinks=False):
                    continue
                try:
                    with owned_fd(safefs.open_dir(backup_fd, (entry.name,))) as volume_fd:
                        st = safefs.stat_at(volume_fd, INDEX_NAME)
                except (FileNotFoundError, NotADirectoryError, UnsafeStorageError):
                    continue  # swapped or removed since the listing
                # Any index.json, even a link or a FIFO, makes it a volume: a damaged
                # one is reported by whoever reads it, never silently overlooked.
                if st is None:
                    continue
                try:
                    names.append((VolumeName.parse(volname).ctime, volname))
                except VolumeNotFoundError as exc:
                    damaged.append((volname, str(exc)))
        return [volname for _, volname in sorted(names)], sorted(damaged)

    def dependents(self, volname: str) -> list[str]:
        """Volumes whose images use an image of ``volname`` as a backing file.

        A volume whose index cannot be read is not counted: it cannot be restored
        anyway, and one damaged volume must not block removing the others.
        """
        found = []
        for other in self.volnames():
            try:
                if self.read_index(other).parent == volname:
                    found.append(other)
            except (VolumeNotFoundError, IntegrityError):
                continue
        return found

    def image_chain(self, volname: str, devicename: str) -> list[Path]:
        """The image files of one disk, top first, down to the full image.

        :raises VolumeNotFoundError: the volume, or a volume the chain needs, is
            gone; the message names it.
        :raises IntegrityError: a volume of the chain lacks the disk's image.
        """
        chain: list[Path] = []
        current: str | None = volname
        while current is not None:
            try:
                index = self.read_index(current)
            except VolumeNotFoundError as exc:
                if current == volname:
                    raise
                raise VolumeNotFoundError(
                    f"backup volume {volname!r} is incomplete: it depends on "
                    f"{current!r}, which does not exist"
                ) from exc
            device = index.devices.get(devicename)
            if device is None:
                raise IntegrityError(
                    f"backup volume {current!r} has no disk {devicename!r} "
                    f"(it has: {', '.join(sorted(index.devices)) or 'none'})"
                )
            image = self.volume_path(current) / device.file
            if not image.is_file():
                raise IntegrityError(f"backup volume {current!r} lacks its image {device.file}")
            chain.append(image)
            current = device.backing
        return chain

    # the base of the next incremental backup -----------------------------------------

    def last_recorded(self, vmtype: GuestType, vmid: int) -> str | None:
        """The volume recorded as the guest's last successful backup, existing or not.

        :raises UnsafeStorageError: ``backup/``, ``.last`` or the record is a
            symlink or special file.
        """
        try:
            with owned_fd(safefs.open_dir(self.root, ("backup", LAST_DIR))) as last_fd:
                data = safefs.read_file_at(
                    last_fd, f"{vmtype.value}-{vmid}", limit=_MAX_LAST_RECORD
                )
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        return data.decode("utf-8", "replace").strip() or None

    def last_successful(self, vmtype: GuestType, vmid: int) -> str | None:
        """The volume the guest's last successful backup wrote, if it still exists."""
        volname = self.last_recorded(vmtype, vmid)
        if volname is None:
            return None
        try:
            self.read_index(volname)
        except (VolumeNotFoundError, CorruptIndexError):
            return None
        return volname

    def set_last_successful(self, vmtype: GuestType, vmid: int, volname: str) -> None:
        """Record ``volname`` as the guest's last successful backup."""
        with owned_fd(safefs.open_dir(self.root, ("backup", LAST_DIR), create=True)) as last_fd:
            safefs.atomic_write_at(last_fd, f"{vmtype.value}-{vmid}", f"{volname}\n".encode())

    # writing -----------------------------------------------------------------------

    def write_index(self, dir_fd: int, index: BackupIndex) -> str:
        """Write ``index.json`` into a (temporary) volume directory ``dir_fd``, durably.

        Returns the SHA-256 of the bytes written."""
        data = index.to_json().encode("utf-8")
        safefs.atomic_write_at(dir_fd, INDEX_NAME, data)
        return hashlib.sha256(data).hexdigest()

    def commit(self, volname: str, held_fd: int | None = None) -> Path:
        """Rename the temporary directory of ``volname`` into place; return the new path.

        :param held_fd: the fd the backup wrote through (:meth:`create_temp`):
            the directory renamed must be that one, not whatever a storage writer
            put at the temporary name meanwhile.
        :raises UnsafeStorageError: the temporary name holds something else.
        """
        final = VolumeName.parse(volname).dirname
        temp = _temp_name(volname)
        with owned_fd(self.open_backup_dir()) as backup_fd:
            if held_fd is not None:
                _check_same(backup_fd, temp, held_fd, volname)
            # rename(2) moves a symlink at the temp name as itself and fails on a
            # symlink at the final name (ENOTDIR): nothing is followed. The check
            # above and the one below close the race around it.
            os.rename(temp, final, src_dir_fd=backup_fd, dst_dir_fd=backup_fd)
            if held_fd is not None:
                _check_same(backup_fd, final, held_fd, volname)
            os.fsync(backup_fd)
        return self.volume_path(volname)

    def remove(self, volname: str) -> None:
        """Remove a committed volume.

        :raises VolumeNotFoundError: no such volume.
        :raises VolumeInUseError: another volume's image chain depends on it.
        """
        dirname = VolumeName.parse(volname).dirname
        # Threat: a volume directory that is a symlink to a host directory. It is
        # refused here (UnsafeStorageError) and rmtree_at never follows one either.
        with owned_fd(self.open_volume(volname)) as volume_fd:
            dependents = self.dependents(volname)
            if dependents:
                raise VolumeInUseError(
                    f"cannot remove {volname!r}: the incremental backup(s) "
                    f"{', '.join(dependents)} depend on it (remove them first)"
                )
            # Move the index away first: a half-removed volume is then no longer listed.
            try:
                os.unlink(INDEX_NAME, dir_fd=volume_fd)
            except FileNotFoundError:
                pass
        with owned_fd(self.open_backup_dir()) as backup_fd:
            safefs.rmtree_at(backup_fd, dirname)


def _temp_name(volname: str) -> str:
    """Name of ``volname``'s temporary directory below ``backup/``."""
    return f"{TEMP_PREFIX}{VolumeName.parse(volname).dirname}"


def _check_same(dir_fd: int, name: str, held_fd: int, volname: str) -> None:
    """Raise UnsafeStorageError unless ``name`` in ``dir_fd`` is the directory ``held_fd``."""
    held = os.fstat(held_fd)
    found = safefs.stat_at(dir_fd, name)
    if found is None or (found.st_dev, found.st_ino) != (held.st_dev, held.st_ino):
        raise UnsafeStorageError(
            f"refusing to commit {volname}: {name} was replaced while the backup ran"
        )
