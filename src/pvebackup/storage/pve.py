"""The other storage types of Proxmox VE, recognised so that a node's storage.cfg parses.

A real node's ``/etc/pve/storage.cfg`` holds ``lvmthin: local-lvm`` from the
installer, and often NFS, CIFS, ZFS, Ceph or PBS storages. pvebackup must read
that file whole (``--root /``), yet keep refusing types nobody knows, so that a
typo never silently drops a storage. These plugins know their type and nothing
else: their properties are accepted as written, they have no backup provider,
and they hold no volumes the host side can reach (a guest disk on one of them
fails that guest's backup with a clear message; ``dir`` is what the host side
reads and writes today).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from pvebackup.api.errors import UnsupportedError
from pvebackup.storage.plugin import StoragePlugin

__all__ = ["PVE_STORAGE_TYPES", "OtherPveStorage", "other_pve_plugins"]

PVE_STORAGE_TYPES = (
    "btrfs", "cephfs", "cifs", "esxi", "glusterfs", "iscsi", "iscsidirect", "lvm",
    "lvmthin", "nfs", "pbs", "rbd", "zfs", "zfspool",
)  # fmt: skip
"""Proxmox VE's built-in storage types besides ``dir``."""


class OtherPveStorage(StoragePlugin):
    """A Proxmox VE storage type pvebackup recognises but does not drive."""

    type: ClassVar[str] = "pve-other"
    open_properties: ClassVar[bool] = True

    def image_path(self, scfg: Mapping[str, str], volname: str) -> Path:
        raise UnsupportedError(
            f"volume {volname!r} is on a storage of type {self.type}; pvebackup's host "
            "side reaches guest volumes on 'dir' storages only"
        )


def other_pve_plugins() -> tuple[type[StoragePlugin], ...]:
    """One plugin class per type in :data:`PVE_STORAGE_TYPES`."""
    return tuple(
        type(f"{name.capitalize()}Storage", (OtherPveStorage,), {"type": name})
        for name in PVE_STORAGE_TYPES
    )
