"""The other storage types of Proxmox VE, recognised so that a node's storage.cfg parses.

A real node's ``/etc/pve/storage.cfg`` holds ``lvmthin: local-lvm`` from the
installer, and often NFS, CIFS, ZFS, Ceph or PBS storages. pvebackup must read
that file whole (``--root /``), yet keep refusing what nobody knows, so that a
typo never silently drops a storage. These plugins know their type and the
properties Proxmox VE's plugin of that type declares (its ``options()``, as of
pve-storage 9.1), plus the legacy ones an older node may still have written
(``maxfiles``, valid through PVE 8; the ``glusterfs`` type, dropped in PVE 9):
those are accepted with a warning. Anything else is an unknown property, an
error naming ``file:line`` for that one storage.

They have no backup provider. The types that hold guest volumes the host reaches
(``nfs``, ``cifs``, ``btrfs``, ``lvm``, ``lvmthin``, ``zfspool``, ``rbd``) get
their own plugins (:mod:`pvebackup.storage.guestvol`), which take these property
tables; a guest disk on one of the others fails that guest's backup with a clear
message. Values are kept as written except
flags and numbers, which are checked as Proxmox VE checks them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from pvebackup.api.errors import UnsupportedError
from pvebackup.storage.plugin import COMMON_PROPERTIES, StoragePlugin
from pvebackup.storage.properties import PropertyKind, PropertySpec

__all__ = [
    "LEGACY_PROPERTIES",
    "PVE_STORAGE_PROPERTIES",
    "PVE_STORAGE_TYPES",
    "OtherPveStorage",
    "other_pve_plugins",
    "unreachable",
]

_S = PropertySpec()
_B = PropertySpec(PropertyKind.BOOL)
_I = PropertySpec(PropertyKind.INT, minimum=0)

# Value kinds of the properties below that are not plain strings.
_KINDS: Mapping[str, PropertySpec] = {
    "disable": _B, "shared": _B, "krbd": _B, "fuse": _B, "sparse": _B, "nocow": _B,
    "nowritecache": _B, "saferemove": _B, "tagged_only": _B, "mkdir": _B,
    "create-base-path": _B, "create-subdirs": _B, "snapshot-as-volume-chain": _B,
    "skip-cert-verification": _B, "port": PropertySpec(PropertyKind.INT, minimum=1,
                                                       maximum=65535),
    "max-protected-backups": PropertySpec(PropertyKind.INT, minimum=-1),
    "saferemove_throughput": _S, "saferemove-stepsize": _I,
}  # fmt: skip

_PATHLIKE = (
    "path", "content-dirs", "prune-backups", "max-protected-backups", "format",
    "mkdir", "create-base-path", "create-subdirs", "preallocation", "bwlimit",
)  # fmt: skip

# Each type's options() in pve-storage (src/PVE/Storage/*Plugin.pm) beyond the
# common content/disable/nodes/shared.
_TYPE_OPTIONS: Mapping[str, tuple[str, ...]] = {
    "btrfs": (*_PATHLIKE, "is_mountpoint", "nocow"),
    "cephfs": (*_PATHLIKE, "monhost", "subdir", "options", "username", "fuse", "keyring",
               "fs-name"),
    "cifs": (*_PATHLIKE, "server", "share", "subdir", "username", "password", "domain",
             "smbversion", "options", "snapshot-as-volume-chain"),
    "esxi": ("server", "username", "password", "skip-cert-verification", "port"),
    "iscsi": ("portal", "target", "bwlimit"),
    "iscsidirect": ("portal", "target", "bwlimit"),
    "lvm": ("vgname", "base", "saferemove", "saferemove-stepsize", "saferemove_throughput",
            "tagged_only", "bwlimit", "snapshot-as-volume-chain"),
    "lvmthin": ("thinpool", "vgname", "bwlimit"),
    "nfs": (*_PATHLIKE, "server", "export", "options", "snapshot-as-volume-chain"),
    "pbs": ("server", "datastore", "namespace", "port", "username", "password",
            "encryption-key", "master-pubkey", "prune-backups", "max-protected-backups",
            "fingerprint"),
    # fsid: not in RBDPlugin's options() but read by it ($scfg->{fsid}); qemu-server's
    # tests configure it
    "rbd": ("monhost", "pool", "data-pool", "namespace", "username", "krbd", "keyring",
            "bwlimit", "fsid"),
    "zfs": ("portal", "target", "pool", "blocksize", "iscsiprovider", "nowritecache",
            "sparse", "comstar_hg", "comstar_tg", "lio_tpg", "bwlimit", "zfs-base-path"),
    "zfspool": ("pool", "blocksize", "sparse", "mountpoint", "bwlimit"),
    # Dropped in PVE 9 (pve-storage 7669a99); a PVE 8 node may still have one.
    "glusterfs": (*_PATHLIKE, "server", "server2", "volume", "transport"),
}  # fmt: skip

_MAXFILES = PropertySpec(
    PropertyKind.INT,
    minimum=0,
    description="number of backups to keep (PVE 8 and older)",
    deprecated="'maxfiles' is deprecated since PVE 7 and dropped in PVE 9; "
    "use 'prune-backups keep-last=N'",
)

LEGACY_PROPERTIES: Mapping[str, Mapping[str, PropertySpec]] = {
    t: {"maxfiles": _MAXFILES}
    for t in ("dir", "btrfs", "cephfs", "cifs", "nfs", "pbs", "glusterfs")
}
"""Properties Proxmox VE no longer declares but an older node may have written,
by type (``maxfiles``: through PVE 8, on the types that held backups)."""

PVE_STORAGE_TYPES = tuple(t for t in _TYPE_OPTIONS)
"""Proxmox VE's storage types besides ``dir`` (``glusterfs`` only through PVE 8)."""

_LEGACY_TYPES = {"glusterfs": "the glusterfs storage type was dropped in PVE 9"}

PVE_STORAGE_PROPERTIES: Mapping[str, Mapping[str, PropertySpec]] = {
    t: {
        **COMMON_PROPERTIES,
        **{name: _KINDS.get(name, _S) for name in names},
        **LEGACY_PROPERTIES.get(t, {}),
    }
    for t, names in _TYPE_OPTIONS.items()
}
"""Every property each type accepts (current, then legacy ones)."""


class OtherPveStorage(StoragePlugin):
    """A Proxmox VE storage type pvebackup recognises but does not drive."""

    type: ClassVar[str] = "pve-other"
    legacy_type: ClassVar[str] = ""
    """Why the type itself is legacy (a warning when storage.cfg is read), or ''."""

    def image_path(self, scfg: Mapping[str, str], volname: str) -> Path:
        raise UnsupportedError(f"volume {volname!r} is on {unreachable(self.type)}")


def unreachable(kind: str) -> str:
    """The end of a message for a guest volume on a type the host cannot reach."""
    return (
        f"a storage of type {kind}; pvebackup's host side reaches guest volumes on"
        " dir, nfs, cifs, btrfs, lvm, lvmthin, zfspool and rbd storages only"
    )


def other_pve_plugins() -> tuple[type[StoragePlugin], ...]:
    """One plugin class per type in :data:`PVE_STORAGE_TYPES`."""
    return tuple(
        type(
            f"{name.capitalize()}Storage",
            (OtherPveStorage,),
            {
                "type": name,
                "properties": PVE_STORAGE_PROPERTIES[name],
                "legacy_type": _LEGACY_TYPES.get(name, ""),
            },
        )
        for name in PVE_STORAGE_TYPES
    )
