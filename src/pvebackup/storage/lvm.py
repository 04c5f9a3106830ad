"""``lvm`` and ``lvmthin``: VM disks as logical volumes, ``/dev/VG/LV``.

As Proxmox VE's ``LVMPlugin``/``LvmThinPlugin``: the volname is the LV name
(``vm-<vmid>-disk-<n>``; ``base-...`` for a template on lvmthin; on ``lvm`` with
``snapshot-as-volume-chain`` a ``.qcow2`` suffix means a qcow2 image inside the
LV), the path ``/dev/<vgname>/<name>``. Allocation is ``lvcreate``: thin
(``-V <size>k --thinpool VG/POOL``) or thick (``--size <size>k VG``), active
and with autoactivation off as PVE 9 does; freeing is ``lvremove -f VG/LV``.

A thick LV is not zeroed: it holds what its extents held before, so a restore
writes every block (``zeroed_images`` False). A thin LV reads as zeroes.

Containers: a container volume on LVM is a raw block device with an ext4 file
system inside (PVE formats and mounts it). pvebackup does not mount file
systems for containers, so such a volume is refused (backup and restore) with a
message naming the storage; VMs are fully supported.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import ClassVar

from pvebackup.api.errors import StateError, UsageError
from pvebackup.storage.guestvol import (
    GuestVolume,
    GuestVolumeStorage,
    check_vm_name,
    next_disk_name,
    run_tool,
)
from pvebackup.storage.properties import PropertySpec
from pvebackup.storage.pve import PVE_STORAGE_PROPERTIES

__all__ = ["LvmPlugin", "LvmThinPlugin"]

# PVE::Storage::Plugin::parse_lvm_name: also keeps '/' and '..' out of the path.
_LVM_NAME = re.compile(r"^[a-z0-9][a-z0-9\-_.]*[a-z0-9]$", re.IGNORECASE)
_KIB = 1024


class _LvmBase(GuestVolumeStorage):
    image_formats: ClassVar[tuple[str, ...]] = ("raw",)
    prefixes: ClassVar[tuple[str, ...]] = ("vm",)

    def _vg(self, scfg: Mapping[str, str], storeid: str) -> str:
        vg = self.parse_properties(scfg, storeid).text("vgname") or ""
        if not _LVM_NAME.match(vg):
            raise UsageError(f"storage '{storeid}': invalid vgname {vg!r}")
        return vg

    def parse_volname(self, volname: str) -> tuple[str, int, str]:
        """``(name, vmid, format)`` as PVE's ``parse_volname``.

        :raises UsageError: not an LV name of a guest disk.
        """
        m = re.match(rf"^((?:{'|'.join(self.prefixes)})-(\d+)-\S+)$", volname)
        if not _LVM_NAME.match(volname) or m is None:
            raise UsageError(f"unable to parse lvm volume name {volname!r}")
        fmt = "qcow2" if volname.endswith(".qcow2") else "raw"
        return m.group(1), int(m.group(2)), fmt

    def guest_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> GuestVolume:
        name, _, fmt = self.parse_volname(volname)
        return GuestVolume(f"/dev/{self._vg(scfg, storeid)}/{name}", fmt, "host_device")

    def activate_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> bool:
        # PVE 9 creates LVs with autoactivation off: a stopped guest's LV may have
        # no device node until activated (PVE's activate_volume does the same).
        name, _, _ = self.parse_volname(volname)
        path = f"/dev/{self._vg(scfg, storeid)}/{name}"
        if os.path.exists(path):
            return False
        run_tool(["lvchange", "-aly", f"{self._vg(scfg, storeid)}/{name}"], f"activating {path}")
        return True

    def deactivate_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> None:
        # PVE's deactivate_volume: an active LV of a stopped guest is what keeps a
        # shared VG's LV active on two nodes; only what we activated comes here.
        name, _, _ = self.parse_volname(volname)
        vg = self._vg(scfg, storeid)
        run_tool(["lvchange", "-aln", f"{vg}/{name}"], f"deactivating /dev/{vg}/{name}")

    def _lvs(self, scfg: Mapping[str, str], storeid: str) -> list[str]:
        vg = self._vg(scfg, storeid)
        out = run_tool(
            ["lvs", "--noheadings", "--options", "lv_name", vg], f"listing volume group {vg}"
        )
        return [line.strip() for line in out.splitlines() if line.strip()]

    def volume_exists(self, scfg: Mapping[str, str], storeid: str, volname: str) -> bool:
        name, _, _ = self.parse_volname(volname)
        return name in self._lvs(scfg, storeid)

    def next_volname(self, scfg: Mapping[str, str], storeid: str, vmid: int, fmt: str) -> str:
        self.check_format(storeid, fmt)
        return next_disk_name(self._lvs(scfg, storeid), vmid)

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
        if size <= 0:
            raise UsageError(f"invalid image size {size}")
        check_vm_name(storeid, volname, vmid, ("vm",))
        name, _, _ = self.parse_volname(volname)
        if name in self._lvs(scfg, storeid):
            raise StateError(f"volume {storeid}:{name} exists already")
        kib = -(-size // _KIB)  # PVE passes KiB to lvcreate; never round down
        run_tool(self.create_argv(scfg, storeid, name, kib), f"lvcreate {name}")
        return name

    def create_argv(
        self, scfg: Mapping[str, str], storeid: str, name: str, kib: int
    ) -> list[str]:
        raise NotImplementedError

    def free(self, scfg: Mapping[str, str], storeid: str, volname: str) -> None:
        name, _, _ = self.parse_volname(volname)
        vg = self._vg(scfg, storeid)
        run_tool(["lvremove", "-f", f"{vg}/{name}"], f"lvremove {vg}/{name}")


class LvmThinPlugin(_LvmBase):
    """``lvmthin: ID`` with ``vgname`` and ``thinpool`` (the installer's ``local-lvm``)."""

    type: ClassVar[str] = "lvmthin"
    properties: ClassVar[Mapping[str, PropertySpec]] = PVE_STORAGE_PROPERTIES["lvmthin"]
    prefixes: ClassVar[tuple[str, ...]] = ("vm", "base")
    zeroed_images: ClassVar[bool] = True

    def create_argv(
        self, scfg: Mapping[str, str], storeid: str, name: str, kib: int
    ) -> list[str]:
        vg = self._vg(scfg, storeid)
        pool = self.parse_properties(scfg, storeid).text("thinpool") or ""
        if not _LVM_NAME.match(pool):
            raise UsageError(f"storage '{storeid}': invalid thinpool {pool!r}")
        return [
            "lvcreate", "-aly", "-V", f"{kib}k", "--name", name,
            "--setautoactivation", "n", "--thinpool", f"{vg}/{pool}",
        ]  # fmt: skip


class LvmPlugin(_LvmBase):
    """``lvm: ID`` with ``vgname``: thick LVs, not zeroed on creation."""

    type: ClassVar[str] = "lvm"
    properties: ClassVar[Mapping[str, PropertySpec]] = PVE_STORAGE_PROPERTIES["lvm"]
    zeroed_images: ClassVar[bool] = False

    def create_argv(
        self, scfg: Mapping[str, str], storeid: str, name: str, kib: int
    ) -> list[str]:
        return [
            "lvcreate", "-aly", "-Wy", "--yes", "--size", f"{kib}k", "--name", name,
            "--setautoactivation", "n", self._vg(scfg, storeid),
        ]  # fmt: skip
