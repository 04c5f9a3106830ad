"""Fleecing images on a storage (``--fleecing storage=ID``, vzdump.conf ``fleecing``).

As qemu-server's ``allocate_fleecing_images``: one volume per disk, named
``vm-<vmid>-fleece-<n>`` in the storage type's volname form (``<vmid>/...qcow2``
on file storages, a plain LV, zvol or rbd image name elsewhere), allocated and
freed through the storage's :class:`~pvebackup.storage.GuestVolumeStorage`
interface, so every type that allocates images can hold them (PVE allows any).
The format is ``qcow2`` where the storage allocates it, else the storage's own
(raw): PVE's ``resolve_format_hint(storage, 'qcow2')``. A raw volume may come out
bigger than the disk (LVM extents, rbd MiB), so QEMU opens it with the disk's
exact ``size``, as qemu-server does.

Every volume is recorded in the guest's run state *before* it is allocated
(``record``): a run killed in between leaves a volume the next run frees. A name
that exists already is never touched (it may be Proxmox VE's own fleecing image
of a backup running beside us); the next free number is taken instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pvebackup.api.errors import PveBackupError, UnsupportedError
from pvebackup.api.types import LogFunction, LogLevel
from pvebackup.storage import GuestVolume, GuestVolumeStorage

__all__ = ["FleecingVolumes", "fleecing_format"]

_MAX_TRIES = 100


def fleecing_format(plugin: GuestVolumeStorage, storeid: str) -> str:
    """``qcow2`` when the storage allocates it, else its first image format.

    :raises UnsupportedError: the storage allocates no disk images at all.
    """
    if "qcow2" in plugin.image_formats:
        return "qcow2"
    if not plugin.image_formats:
        raise UnsupportedError(
            f"fleecing storage '{storeid}' (type {plugin.type}) cannot hold disk images"
        )
    return plugin.image_formats[0]


@dataclass
class FleecingVolumes:
    """Allocates and frees one guest's fleecing images on storage ``storeid``.

    :ivar record: called with each volume id before it is allocated (run state).
    """

    storeid: str
    scfg: Mapping[str, str]
    plugin: GuestVolumeStorage
    vmid: int
    log: LogFunction
    record: Callable[[str], None] | None = None
    format: str = ""
    allocated: list[str] = field(default_factory=list)  # volnames, in order

    def __post_init__(self) -> None:
        if not self.format:
            self.format = fleecing_format(self.plugin, self.storeid)

    def volname(self, n: int) -> str:
        """``vm-<vmid>-fleece-<n>`` in this storage type's volname form."""
        template = self.plugin.next_volname(self.scfg, self.storeid, self.vmid, self.format)
        name, count = re.subn(
            rf"vm-{self.vmid}-disk-\d+", f"vm-{self.vmid}-fleece-{n}", template, count=1
        )
        if count != 1:
            raise UnsupportedError(
                f"fleecing storage '{self.storeid}': cannot name a fleecing image"
                f" after {template!r}"
            )
        return name

    def allocate(self, size: int) -> tuple[GuestVolume, dict[str, Any]]:
        """A new fleecing image of ``size`` bytes, and the ``blockdev-add``
        options of its format node (without a node name).

        :raises PveBackupError: the storage refused or its tool failed.
        """
        n = len(self.allocated)
        for _ in range(_MAX_TRIES):
            volname = self.volname(n)
            if not self.plugin.volume_exists(self.scfg, self.storeid, volname):
                break
            n += 1  # not ours (or an earlier run's, freed by its own record): skip it
        else:
            raise UnsupportedError(
                f"fleecing storage '{self.storeid}': no free fleecing image name for"
                f" VM {self.vmid}"
            )
        volid = f"{self.storeid}:{volname}"
        if self.record is not None:
            self.record(volid)
        self.plugin.allocate(self.scfg, self.storeid, self.vmid, self.format, size, volname)
        self.allocated.append(volname)
        self.plugin.activate_volume(self.scfg, self.storeid, volname)
        volume = self.plugin.guest_volume(self.scfg, self.storeid, volname)
        self.log(LogLevel.INFO, f"fleecing image {volid} ({self.format}) allocated")
        node: dict[str, Any] = {
            "driver": self.format,
            "discard": "unmap",
            "file": {**volume.file_node(), "discard": "unmap"},
        }
        if self.format == "raw":
            node["size"] = size  # the volume may be rounded up; QEMU must see the disk's size
        return volume, node

    def free_all(self) -> bool:
        """Free every image allocated here; log what cannot be freed. True if all went."""
        ok = True
        for volname in list(self.allocated):
            volid = f"{self.storeid}:{volname}"
            try:
                self.plugin.free(self.scfg, self.storeid, volname)
            except (PveBackupError, OSError) as exc:
                ok = False
                self.log(LogLevel.WARN, f"error removing fleecing image '{volid}' - {exc}")
                continue
            self.allocated.remove(volname)
        return ok
