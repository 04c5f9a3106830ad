"""The storage plugin: type, properties, provider factory, listing and removal."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from typing import ClassVar

from pvebackup.api import BackupProvider, LogFunction
from pvebackup.api.errors import VolumeNotFoundError
from pvebackup.storage import COMMON_PROPERTIES, PropertySpec, StoragePlugin, VolumeInfo
from pvebackup_plainfiles.provider import PlainFilesProvider
from pvebackup_plainfiles.volumes import Store


# [snippet:plugin]
class PlainFilesPlugin(StoragePlugin):
    """Storage type ``plain-files``: every backup is a directory of plain files."""

    type: ClassVar[str] = "plain-files"
    properties: ClassVar[Mapping[str, PropertySpec]] = {
        **COMMON_PROPERTIES,
        "path": PropertySpec(required=True, path=True, description="backup directory"),
        "store-logs": PropertySpec(flag=True, description="keep task logs (default on)"),
    }

    def new_backup_provider(
        self, scfg: Mapping[str, str], storeid: str, log_function: LogFunction
    ) -> BackupProvider:
        return PlainFilesProvider(self, scfg, storeid, log_function)

    def list_volumes(self, scfg: Mapping[str, str], storeid: str) -> list[VolumeInfo]:
        store = Store(scfg)
        volumes = []
        for volname in store.volnames():
            meta = store.read_meta(volname)
            volumes.append(
                VolumeInfo(
                    volid=f"{storeid}:{volname}",
                    vmid=meta.vmid,
                    vmtype=meta.vmtype,
                    ctime=meta.ctime,
                    size=meta.stored,
                    format="plain-files",
                )
            )
        return sorted(volumes, key=lambda v: (v.ctime, v.volid))

    def free_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> None:
        path = Store(scfg).volume(volname)  # VolumeNotFoundError for bad or missing names
        shutil.rmtree(path)
# [end]


__all__ = ["PlainFilesPlugin", "VolumeNotFoundError"]
