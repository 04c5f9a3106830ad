"""Where a backup's files live, and reading them back (hostile input).

A volume is ``<path>/<vmtype>-<vmid>-<UTC time>`` (``vm-100-20261201T205227Z``),
holding ``meta.json``, ``guest.conf``, ``firewall.fw`` (if any), ``task.log`` and
the data: ``<devicename>.raw`` per VM disk or ``root.tar``. It is written below
``.tmp-<volname>`` and renamed into place when the backup ends, so a listed volume
is always complete.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from pvebackup.api import GuestType
from pvebackup.api.errors import IntegrityError, VolumeNotFoundError

# [snippet:volnames]
# Volume names: letters, digits and "-", nothing that could leave the directory.
VOLNAME = re.compile(r"(vm|ct)-[0-9]{1,9}-[0-9]{8}T[0-9]{6}Z(-[0-9]{1,3})?")
DEVICE = re.compile(r"[a-z][a-z0-9-]{0,63}")
# [end]
META_MAX = 64 * 1024
_VMTYPES = {"vm": GuestType.QEMU, "ct": GuestType.LXC}


@dataclass(frozen=True)
class Meta:
    """``meta.json``: what ``list`` and the restore need."""

    vmid: int
    vmtype: GuestType
    ctime: int
    stored: int
    devices: dict[str, int]  # devicename -> size in bytes (VMs)

    def to_json(self) -> str:
        return json.dumps({"vmid": self.vmid, "vmtype": str(self.vmtype), "ctime": self.ctime,
                           "stored": self.stored, "devices": self.devices})  # fmt: skip


class Store:
    """The backup directory of one storage (``path`` in storage.cfg)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def volnames(self) -> list[str]:
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return []  # before the first backup: nothing stored yet, not an error
        return [n for n in names if VOLNAME.fullmatch(n)]

    def volume(self, volname: str) -> Path:
        """The directory of a committed volume.

        :raises VolumeNotFoundError: no such volume, or a name that is not ours.
        """
        # Threat: a volname is user input ("../../etc"); only our own names are paths.
        if not VOLNAME.fullmatch(volname):
            raise VolumeNotFoundError(f"plain-files: no backup {volname!r}")
        path = self.path / volname
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise VolumeNotFoundError(f"plain-files: no backup {volname}") from None
        if not stat.S_ISDIR(st.st_mode):  # a symlink planted in the storage
            raise IntegrityError(f"plain-files: {volname} is not a directory")
        return path

    def file(self, volname: str, name: str) -> Path:
        """A regular file of a volume (never a symlink: it could point anywhere)."""
        path = self.volume(volname) / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise IntegrityError(f"plain-files: {volname} has no {name}") from None
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"plain-files: {volname}/{name} is not a regular file")
        return path

    def read_text(self, volname: str, name: str) -> str:
        fd = os.open(self.file(volname, name), os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(META_MAX + 1)
        if len(data) > META_MAX:  # Threat: a huge file read into memory
            raise IntegrityError(f"plain-files: {volname}/{name} is over {META_MAX} bytes")
        return data.decode("utf-8", errors="replace")

    def read_meta(self, volname: str) -> Meta:
        try:
            data = json.loads(self.read_text(volname, "meta.json"))
            meta = Meta(
                vmid=int(data["vmid"]),
                vmtype=GuestType(data["vmtype"]),
                ctime=int(data["ctime"]),
                stored=int(data["stored"]),
                devices={str(k): int(v) for k, v in dict(data["devices"]).items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"plain-files: {volname}/meta.json is damaged: {exc}") from exc
        if any(not DEVICE.fullmatch(d) for d in meta.devices):
            raise IntegrityError(f"plain-files: {volname}/meta.json names a bad device")
        return meta


def vmtype_prefix(vmtype: GuestType) -> str:
    return next(k for k, v in _VMTYPES.items() if v == vmtype)
