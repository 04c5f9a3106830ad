"""Volume names and the on-disk layout of a ``backup-dir`` storage.

One backup of one guest is one *volume*, a directory under ``<path>/backup/``::

    <path>/backup/
        qemu-100-2026_11_26-09_30_00/      volname "backup/qemu-100-2026_11_26-09_30_00"
            index.json                     what is in here (see BackupIndex), written last
            guest.conf                     the guest configuration
            firewall.fw                    the firewall configuration (optional)
            task.log                       the task log (added after the rename)
            drive-scsi0.qcow2              one image per disk (VMs)
            root.tar.zst | root/           the filesystem (containers)
        .tmp-lxc-101-2026_11_26-09_31_12/  a backup in progress (invisible to listings)
        .last/qemu-100                     volname of the last successful VM backup

The time in the name is the backup's start in UTC, so names sort by time and two
hosts never disagree about them. A volume is written under a ``.tmp-`` name and
renamed into place only when the guest's backup succeeded, so a listed volume is
always complete.

``.last/qemu-<vmid>`` names the guest's last successful backup: the host cleared
the dirty bitmap at that point. Only that volume may be the base of an
incremental backup: if it was removed, an older volume would be missing the
changes it held, so the next backup must be a full one. The storage is not
trusted to say so: the provider's host state file holds the SHA-256 of that
volume's ``index.json`` (which pins image sizes and checksums, and through
``parent-index-sha256`` every index below it), and ``.last`` must agree with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pvebackup.api.errors import (
    CorruptIndexError,
    IntegrityError,
    VolumeInUseError,
    VolumeNotFoundError,
)
from pvebackup.api.types import GuestType

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
_TIME_FORMAT = "%Y_%m_%d-%H_%M_%S"
_VOLNAME_RE = re.compile(
    r"^backup/(?P<vmtype>qemu|lxc)-(?P<vmid>[1-9][0-9]{0,8})-"
    r"(?P<time>[0-9]{4}_[0-9]{2}_[0-9]{2}-[0-9]{2}_[0-9]{2}_[0-9]{2})$"
)


@dataclass(frozen=True, slots=True)
class VolumeName:
    """The parts of a volume name ``backup/<vmtype>-<vmid>-<UTC time>``."""

    vmtype: GuestType
    vmid: int
    ctime: int
    """Backup start, Unix seconds (whole seconds: the name has no finer time)."""

    @property
    def stamp(self) -> str:
        """The UTC time as the name shows it: ``2026_11_26-09_30_00``."""
        return datetime.fromtimestamp(self.ctime, UTC).strftime(_TIME_FORMAT)

    def __str__(self) -> str:
        return f"backup/{self.vmtype.value}-{self.vmid}-{self.stamp}"

    @property
    def dirname(self) -> str:
        """The volume's directory name below ``<path>/backup/``."""
        return str(self).removeprefix("backup/")

    @classmethod
    def parse(cls, volname: str) -> VolumeName:
        """Split a volume name; :class:`VolumeNotFoundError` if it is not one of ours."""
        match = _VOLNAME_RE.match(volname)
        if match is None:
            raise VolumeNotFoundError(
                f"{volname!r} is not a backup-dir volume name "
                "(expected backup/<qemu|lxc>-<vmid>-<YYYY_MM_DD-HH_MM_SS>)"
            )
        stamp = datetime.strptime(match["time"], _TIME_FORMAT).replace(tzinfo=UTC)
        return cls(GuestType(match["vmtype"]), int(match["vmid"]), int(stamp.timestamp()))


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
    def from_json(cls, text: str, where: str) -> BackupIndex:
        """Parse ``index.json``; :class:`CorruptIndexError` naming ``where`` if malformed."""
        try:
            data = json.loads(text)
            if data.get("format") != INDEX_FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            return cls(
                vmid=int(data["vmid"]),
                vmtype=GuestType(data["vmtype"]),
                ctime=int(data["ctime"]),
                devices={
                    str(name): DeviceEntry(
                        size=int(dev["size"]),
                        file=str(dev["file"]),
                        backing=dev.get("backing"),
                        bitmap_mode=str(dev.get("bitmap-mode", "none")),
                        image_size=_opt_int(dev.get("image-size")),
                        image_sha256=_opt_str(dev.get("image-sha256")),
                    )
                    for name, dev in data.get("devices", {}).items()
                },
                bitmap_id=data.get("bitmap-id"),
                parent=data.get("parent"),
                ct_format=data.get("ct-format"),
                stored_size=int(data.get("stored-size", 0)),
                parent_index_sha256=_opt_str(data.get("parent-index-sha256")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptIndexError(f"{where}: malformed {INDEX_NAME}: {exc}") from exc


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


def allocated_size(path: Path) -> int:
    """Bytes ``path`` occupies on disk: allocated blocks of it and everything below it.

    Holes in sparse files (unallocated qcow2 clusters, skipped zero areas) do not
    count, hard links inside the tree count once.
    """
    st = path.lstat()
    if not path.is_dir() or path.is_symlink():
        return st.st_blocks * 512
    total = st.st_blocks * 512
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            entry = os.lstat(os.path.join(dirpath, name))
            if entry.st_nlink > 1 and not os.path.isdir(os.path.join(dirpath, name)):
                key = (entry.st_dev, entry.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            total += entry.st_blocks * 512
    return total


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary name, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames inside it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        return self.backup_dir / f".tmp-{VolumeName.parse(volname).dirname}"

    def new_volname(self, vmtype: GuestType, vmid: int, now: float) -> str:
        """A fresh volume name for a backup starting at ``now``.

        Two backups of one guest within one second get consecutive seconds, so a
        name is never reused while its volume or its temporary directory exists.
        """
        ctime = int(now)
        while True:
            volname = str(VolumeName(vmtype, vmid, ctime))
            if not self.volume_path(volname).exists() and not self.temp_path(volname).exists():
                return volname
            ctime += 1

    # reading -----------------------------------------------------------------------

    def read_index(self, volname: str) -> BackupIndex:
        """The index of a committed volume; :class:`VolumeNotFoundError` if absent."""
        return self.read_index_checked(volname)[0]

    def read_index_checked(self, volname: str) -> tuple[BackupIndex, str]:
        """The index of a committed volume and the SHA-256 of its bytes."""
        index_path = self.volume_path(volname) / INDEX_NAME
        try:
            data = index_path.read_bytes()
        except FileNotFoundError as exc:
            raise VolumeNotFoundError(f"backup volume {volname!r} does not exist") from exc
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptIndexError(f"{index_path}: {INDEX_NAME} is not UTF-8") from exc
        return BackupIndex.from_json(text, str(index_path)), hashlib.sha256(data).hexdigest()

    def volnames(self) -> Iterator[str]:
        """Names of the committed volumes, oldest first (temporary ones are skipped)."""
        if not self.backup_dir.is_dir():
            return
        names = []
        for entry in self.backup_dir.iterdir():
            volname = f"backup/{entry.name}"
            if _VOLNAME_RE.match(volname) and (entry / INDEX_NAME).is_file():
                names.append((VolumeName.parse(volname).ctime, volname))
        yield from (volname for _, volname in sorted(names))

    def dependents(self, volname: str) -> list[str]:
        """Volumes whose images use an image of ``volname`` as a backing file."""
        return [other for other in self.volnames() if self.read_index(other).parent == volname]

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

    def _last_path(self, vmtype: GuestType, vmid: int) -> Path:
        return self.backup_dir / ".last" / f"{vmtype.value}-{vmid}"

    def last_recorded(self, vmtype: GuestType, vmid: int) -> str | None:
        """The volume recorded as the guest's last successful backup, existing or not."""
        try:
            return self._last_path(vmtype, vmid).read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

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
        path = self._last_path(vmtype, vmid)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, volname + "\n")

    # writing -----------------------------------------------------------------------

    def write_index(self, directory: Path, index: BackupIndex) -> str:
        """Write ``index.json`` into a (temporary) volume directory, durably.

        Returns the SHA-256 of the bytes written."""
        text = index.to_json()
        _write_atomic(directory / INDEX_NAME, text)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def commit(self, volname: str) -> Path:
        """Rename the temporary directory of ``volname`` into place; return the new path."""
        final = self.volume_path(volname)
        os.rename(self.temp_path(volname), final)
        fsync_dir(self.backup_dir)
        return final

    def remove(self, volname: str) -> None:
        """Remove a committed volume.

        :raises VolumeNotFoundError: no such volume.
        :raises VolumeInUseError: another volume's image chain depends on it.
        """
        path = self.volume_path(volname)
        if not path.is_dir():
            raise VolumeNotFoundError(f"backup volume {volname!r} does not exist")
        dependents = self.dependents(volname)
        if dependents:
            raise VolumeInUseError(
                f"cannot remove {volname!r}: the incremental backup(s) "
                f"{', '.join(dependents)} depend on it (remove them first)"
            )
        # Move the index away first: a half-removed volume is then no longer listed.
        (path / INDEX_NAME).unlink(missing_ok=True)
        shutil.rmtree(path)
