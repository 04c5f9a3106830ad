"""``zfspool``: VM disks as zvols, container volumes as ZFS file systems.

As Proxmox VE's ``ZFSPoolPlugin``: volname ``[base-X-.../]vm-<vmid>-disk-<n>``
(raw, ``/dev/zvol/<pool>/<name>``) or ``subvol-<vmid>-disk-<n>`` (a dataset
mounted at ``<mountpoint or /pool>/<name>``, a plain directory for containers).
Allocation is ``zfs create [-s] [-b blocksize] -V <size>k POOL/NAME`` (size
rounded up to 1 MiB as PVE does) or ``zfs create -o acltype=posixacl -o xattr=sa
-o refquota=<size>k|none POOL/NAME``; freeing is ``zfs destroy -r POOL/NAME``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import ClassVar

from pvebackup.api.errors import StateError, UsageError
from pvebackup.storage.guestvol import (
    SUBVOL,
    GuestVolume,
    GuestVolumeStorage,
    check_vm_name,
    next_disk_name,
    run_tool,
)
from pvebackup.storage.properties import PropertySpec
from pvebackup.storage.pve import PVE_STORAGE_PROPERTIES

__all__ = ["ZfsPoolPlugin"]

_VOLNAME = re.compile(
    r"^(((base|basevol)-(\d+)-[^\s/]+)/)?((base|basevol|vm|subvol)-(\d+)-[^\s/]+)$"
)
# A dataset path: components of ZFS's allowed characters, no '..' games.
_POOL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*(?:/[A-Za-z0-9][A-Za-z0-9_.:-]*)*$")


class ZfsPoolPlugin(GuestVolumeStorage):
    """``zfspool: ID`` with ``pool`` (and optional ``mountpoint``, ``sparse``, ``blocksize``)."""

    type: ClassVar[str] = "zfspool"
    properties: ClassVar[Mapping[str, PropertySpec]] = PVE_STORAGE_PROPERTIES["zfspool"]
    image_formats: ClassVar[tuple[str, ...]] = ("raw",)
    subvols: ClassVar[bool] = True
    zeroed_images: ClassVar[bool] = True

    def _pool(self, scfg: Mapping[str, str], storeid: str) -> str:
        pool = self.parse_properties(scfg, storeid).text("pool") or ""
        if not _POOL.match(pool) or ".." in pool.split("/"):
            raise UsageError(f"storage '{storeid}': invalid pool {pool!r}")
        return pool

    @staticmethod
    def parse_volname(volname: str) -> tuple[str, int, str]:
        """``(name, vmid, format)``; the name without a linked clone's base part."""
        m = _VOLNAME.match(volname)
        if m is None or ".." in volname:
            raise UsageError(f"unable to parse zfs volume name {volname!r}")
        fmt = SUBVOL if m.group(6) in ("subvol", "basevol") else "raw"
        return m.group(5), int(m.group(7)), fmt

    def guest_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> GuestVolume:
        name, _, fmt = self.parse_volname(volname)
        pool = self._pool(scfg, storeid)
        if fmt == SUBVOL:
            mountpoint = self.parse_properties(scfg, storeid).text("mountpoint") or f"/{pool}"
            return GuestVolume(f"{mountpoint.rstrip('/')}/{name}", SUBVOL, "dir")
        return GuestVolume(f"/dev/zvol/{pool}/{name}", "raw", "host_device")

    def _datasets(self, scfg: Mapping[str, str], storeid: str) -> list[str]:
        pool = self._pool(scfg, storeid)
        out = run_tool(
            ["zfs", "list", "-H", "-o", "name", "-t", "volume,filesystem", "-d", "1", pool],
            f"listing zfs pool {pool}",
        )
        prefix = f"{pool}/"
        return [line[len(prefix):] for line in out.splitlines() if line.startswith(prefix)]

    def volume_exists(self, scfg: Mapping[str, str], storeid: str, volname: str) -> bool:
        name, _, _ = self.parse_volname(volname)
        return name in self._datasets(scfg, storeid)

    def next_volname(self, scfg: Mapping[str, str], storeid: str, vmid: int, fmt: str) -> str:
        self.check_format(storeid, fmt)
        prefix = "subvol" if fmt == SUBVOL else "vm"
        return next_disk_name(self._datasets(scfg, storeid), vmid, prefix)

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
        check_vm_name(storeid, volname, vmid, ("subvol",) if fmt == SUBVOL else ("vm",))
        name, _, _ = self.parse_volname(volname)
        if name in self._datasets(scfg, storeid):
            raise StateError(f"volume {storeid}:{name} exists already")
        run_tool(self.create_argv(scfg, storeid, fmt, name, size), f"zfs create {name}")
        return name

    def create_argv(
        self, scfg: Mapping[str, str], storeid: str, fmt: str, name: str, size: int
    ) -> list[str]:
        """The ``zfs create`` command line PVE's ``zfs_create_zvol``/``_subvol`` runs."""
        props = self.parse_properties(scfg, storeid)
        dataset = f"{self._pool(scfg, storeid)}/{name}"
        kib = -(-size // 1024)
        if fmt == SUBVOL:
            quota = f"{kib}k" if kib else "none"
            return [
                "zfs", "create", "-o", "acltype=posixacl", "-o", "xattr=sa",
                "-o", f"refquota={quota}", dataset,
            ]  # fmt: skip
        if size <= 0:
            raise UsageError(f"invalid image size {size}")
        kib += (1024 - kib % 1024) % 1024  # PVE aligns zvols to 1 MiB (zfs issue 8541)
        argv = ["zfs", "create"]
        if props.flag("sparse"):
            argv.append("-s")
        blocksize = props.text("blocksize")
        if blocksize:
            argv += ["-b", blocksize]
        return [*argv, "-V", f"{kib}k", dataset]

    def free(self, scfg: Mapping[str, str], storeid: str, volname: str) -> None:
        name, _, _ = self.parse_volname(volname)
        dataset = f"{self._pool(scfg, storeid)}/{name}"
        run_tool(["zfs", "destroy", "-r", dataset], f"zfs destroy {dataset}")
