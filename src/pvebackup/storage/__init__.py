"""Storage layer: storage.cfg, the plugin registry, the storage API version.

What Proxmox VE's ``PVE::Storage`` and ``PVE::Storage::Plugin`` are to the seed:
it finds the storage a backup job names, the plugin of that storage's type, and
asks the plugin for a backup provider (:func:`new_backup_provider`).
"""

from __future__ import annotations

from pvebackup.api.provider import BackupProvider
from pvebackup.api.types import LogFunction
from pvebackup.storage import registry
from pvebackup.storage.basepath import (
    BASE_PATH_PROPERTIES,
    CREATE_SUBDIRS,
    BasePath,
    is_mounted,
)
from pvebackup.storage.config import (
    StorageConfig,
    StorageSection,
    parse_storage_config,
    read_storage_config,
    storage_config,
    valid_storeid,
    write_storage_config,
)
from pvebackup.storage.dir import DirPlugin
from pvebackup.storage.guestvol import GuestVolume, GuestVolumeStorage
from pvebackup.storage.plugin import (
    COMMON_PROPERTIES,
    VOLUME_ATTRIBUTES,
    AttributeValue,
    DamagedVolume,
    StoragePlugin,
    VolumeInfo,
    VolumeScan,
    remove_backup_volume,
)
from pvebackup.storage.properties import (
    PropertyKind,
    PropertySpec,
    PropertyValue,
    StorageProperties,
    parse_boolean,
    parse_properties,
)
from pvebackup.storage.registry import (
    ENTRY_POINT_GROUP,
    lookup,
    plugin_types,
    register,
    registered,
    unregister,
)
from pvebackup.storage.version import APIAGE, APIVER, check_api_version
from pvebackup.storage.volume import (
    guest_volume,
    guest_volume_storage,
    parse_volume_id,
    volume_path,
)

__all__ = [
    "APIAGE",
    "APIVER",
    "BASE_PATH_PROPERTIES",
    "COMMON_PROPERTIES",
    "CREATE_SUBDIRS",
    "VOLUME_ATTRIBUTES",
    "AttributeValue",
    "ENTRY_POINT_GROUP",
    "BasePath",
    "DamagedVolume",
    "DirPlugin",
    "PropertyKind",
    "PropertySpec",
    "PropertyValue",
    "StorageConfig",
    "StoragePlugin",
    "StorageProperties",
    "StorageSection",
    "VolumeInfo",
    "VolumeScan",
    "check_api_version",
    "is_mounted",
    "lookup",
    "new_backup_provider",
    "parse_boolean",
    "parse_properties",
    "parse_storage_config",
    "parse_volume_id",
    "plugin_types",
    "read_storage_config",
    "register",
    "registered",
    "registry",
    "remove_backup_volume",
    "storage_config",
    "unregister",
    "valid_storeid",
    "volume_path",
    "guest_volume",
    "guest_volume_storage",
    "GuestVolume",
    "GuestVolumeStorage",
    "write_storage_config",
]


def new_backup_provider(
    cfg: StorageConfig, storeid: str, log_function: LogFunction
) -> BackupProvider | None:
    """The backup provider of storage ``storeid``, or ``None`` for a plain storage.

    The seed's ``PVE::Storage::new_backup_provider``: look the storage up in
    ``cfg``, find the plugin of its type, and delegate to
    ``plugin.new_backup_provider(scfg, storeid, log_function)``.

    :raises StorageNotFoundError: no storage ``storeid`` in ``cfg``.
    :raises PluginNotFoundError: no plugin for the storage's type.
    :raises PluginError: the plugin was refused (load failure, api version).
    :raises StorageUnavailableError: the storage is disabled.
    """
    scfg = storage_config(cfg, storeid)
    plugin = lookup(scfg["type"])
    return plugin.new_backup_provider(scfg, storeid, log_function)
