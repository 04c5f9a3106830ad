"""The storage plugin: type, properties, provider factory, listing and removal."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from typing import ClassVar

from pvebackup.api import BackupProvider, LogFunction
from pvebackup.api.errors import PveBackupError
from pvebackup.storage import (
    DamagedVolume,
    PropertySpec,
    StoragePlugin,
    VolumeInfo,
    VolumeScan,
)
from pvebackup_plainfiles.provider import PlainFilesProvider
from pvebackup_plainfiles.settings import PROPERTIES, Settings
from pvebackup_plainfiles.volumes import Store


# [snippet:plugin]
class PlainFilesPlugin(StoragePlugin):
    """Storage type ``plain-files``: every backup is a directory of plain files."""

    type: ClassVar[str] = "plain-files"
    properties: ClassVar[Mapping[str, PropertySpec]] = PROPERTIES  # see settings.py

    def new_backup_provider(
        self, scfg: Mapping[str, str], storeid: str, log_function: LogFunction
    ) -> BackupProvider:
        return PlainFilesProvider(self, scfg, storeid, log_function)

    def list_volumes(self, scfg: Mapping[str, str], storeid: str) -> list[VolumeInfo]:
        return self.scan_volumes(scfg, storeid).volumes

    def scan_volumes(self, scfg: Mapping[str, str], storeid: str) -> VolumeScan:
        # One damaged volume (storage content is hostile) must not hide the others.
        store = Store(Settings.of(scfg, storeid).path)
        volumes, damaged = [], []
        for volname in store.volnames():
            try:
                meta = store.read_meta(volname)
            except PveBackupError as exc:
                damaged.append(DamagedVolume(f"{storeid}:{volname}", str(exc)))
                continue
            volumes.append(
                VolumeInfo(
                    volid=f"{storeid}:{volname}",
                    vmid=meta.vmid,
                    vmtype=meta.vmtype,
                    ctime=meta.ctime,
                    size=meta.stored,
                    format="plain-files",
                    virtual_size=sum(meta.devices.values()) if meta.devices else None,
                )
            )
        volumes.sort(key=lambda v: (v.ctime, v.volid))  # oldest first
        return VolumeScan(volumes, damaged)

    def free_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> None:
        store = Store(Settings.of(scfg, storeid).path)
        shutil.rmtree(store.volume(volname))  # VolumeNotFoundError: bad or missing name
# [end]


__all__ = ["PlainFilesPlugin"]
