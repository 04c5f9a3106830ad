"""``nfs`` and ``cifs``: a network share mounted at ``path``, laid out like ``dir``.

Proxmox VE mounts the share at its ``path`` (``/mnt/pve/<ID>``) itself; here the
node (PVE, fstab, an automounter) mounts it and we only use it *while it is
mounted*: ``path`` must be a mount point for every use, as if ``is_mountpoint``
were set. Reading or allocating in an unmounted ``/mnt/pve/<ID>`` would reach (or
fill) the node's root file system instead of the share.

Volumes, paths and allocation are ``dir``'s (``<path>/images/<vmid>/<name>``),
with the same ``kit.safefs`` defences: a share is written by others too.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from pvebackup.storage.basepath import BasePath
from pvebackup.storage.dir import _DIR_PROPERTIES, DirPlugin
from pvebackup.storage.guestvol import GuestVolume
from pvebackup.storage.properties import PropertySpec
from pvebackup.storage.pve import PVE_STORAGE_PROPERTIES

__all__ = ["CifsPlugin", "NfsPlugin"]


def _properties(kind: str) -> Mapping[str, PropertySpec]:
    # PVE's options of the type, with dir's typed path & co. where both have them.
    return {
        **PVE_STORAGE_PROPERTIES[kind],
        **{k: v for k, v in _DIR_PROPERTIES.items() if k in PVE_STORAGE_PROPERTIES[kind]},
    }


class _MountedDir(DirPlugin):
    def _mounted(self, scfg: Mapping[str, str], storeid: str) -> Path:
        path = self.parse_properties(scfg, storeid).path("path")
        return BasePath(storeid, path, mountpoint=path).activate()

    def _activate(self, scfg: Mapping[str, str], storeid: str) -> None:
        self._mounted(scfg, storeid)
        super()._activate(scfg, storeid)

    def guest_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> GuestVolume:
        self._mounted(scfg, storeid)
        return super().guest_volume(scfg, storeid, volname)


class NfsPlugin(_MountedDir):
    """``nfs: ID`` with ``path``, ``server``, ``export``."""

    type: ClassVar[str] = "nfs"
    properties: ClassVar[Mapping[str, PropertySpec]] = _properties("nfs")


class CifsPlugin(_MountedDir):
    """``cifs: ID`` with ``path``, ``server``, ``share``."""

    type: ClassVar[str] = "cifs"
    properties: ClassVar[Mapping[str, PropertySpec]] = _properties("cifs")
