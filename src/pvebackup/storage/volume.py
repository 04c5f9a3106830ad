"""Volume ids: ``STOREID:VOLNAME``, and where a guest image volume lives."""

from __future__ import annotations

import re
from pathlib import Path

from pvebackup.api.errors import UnsupportedError, UsageError
from pvebackup.storage import registry
from pvebackup.storage.config import StorageConfig, storage_config
from pvebackup.storage.guestvol import GuestVolume, GuestVolumeStorage
from pvebackup.storage.pve import unreachable

__all__ = ["guest_volume", "guest_volume_storage", "parse_volume_id", "volume_path"]

# Proxmox VE's parse_volume_id: a storage id, a colon, a non-empty rest.
_VOLID = re.compile(r"^([a-z][a-z0-9\-_.]*[a-z0-9]):(.+)$", re.IGNORECASE | re.DOTALL)


def parse_volume_id(volid: str) -> tuple[str, str]:
    """Split ``"STOREID:VOLNAME"`` into ``(storeid, volname)``.

    :raises UsageError: not of that form: no colon, an invalid storage id, an
        empty volname or a newline (one error type for every bad input, exit 2).
    """
    m = _VOLID.match(volid)
    if m is None or "\n" in volid:
        raise UsageError(
            f"invalid volume id {volid!r}: expected STOREID:VOLNAME, "
            "e.g. local:100/vm-100-disk-0.qcow2"
        )
    return m.group(1), m.group(2)


def volume_path(cfg: StorageConfig, volid: str) -> Path:
    """The file system path of a guest image or subvol volume.

    :raises UsageError: ``volid`` is malformed.
    :raises StorageNotFoundError: its storage does not exist.
    :raises PluginError: the storage's plugin cannot be loaded.
    :raises UnsupportedError: the storage type holds no guest images.
    """
    storeid, volname = parse_volume_id(volid)
    scfg = storage_config(cfg, storeid)
    plugin = registry.lookup(scfg["type"])
    if isinstance(plugin, GuestVolumeStorage):
        return Path(plugin.guest_volume(scfg, storeid, volname).path)
    return plugin.image_path(scfg, volname)


def guest_volume_storage(
    cfg: StorageConfig, storeid: str
) -> tuple[dict[str, str], GuestVolumeStorage]:
    """``(scfg, plugin)`` of a storage that holds guest volumes.

    :raises StorageNotFoundError: no such storage.
    :raises StorageUnavailableError: it is disabled.
    :raises UnsupportedError: its type holds no guest volumes pvebackup can reach.
    """
    scfg = storage_config(cfg, storeid)
    plugin = registry.lookup(scfg["type"])
    if not isinstance(plugin, GuestVolumeStorage):
        raise UnsupportedError(f"storage '{storeid}' is {unreachable(scfg['type'])}")
    return dict(scfg), plugin


def guest_volume(cfg: StorageConfig, volid: str, *, activate: bool = False) -> GuestVolume:
    """What QEMU opens for ``volid`` (``pvesm path``), activated first if asked.

    :raises UsageError: ``volid`` is malformed, or no volume name of its type.
    :raises StorageNotFoundError: its storage does not exist.
    :raises UnsupportedError: the storage type holds no guest volumes we reach.
    :raises ExternalToolError: activating it failed.
    """
    storeid, volname = parse_volume_id(volid)
    scfg, plugin = guest_volume_storage(cfg, storeid)
    if activate:
        plugin.activate_volume(scfg, storeid, volname)
    return plugin.guest_volume(scfg, storeid, volname)
