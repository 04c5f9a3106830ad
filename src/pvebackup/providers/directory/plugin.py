"""``BackupDirPlugin``: the storage type ``backup-dir`` in storage.cfg.

::

    backup-dir: mybackups
        path /srv/backups
        bitmap yes          # incremental VM backups with a dirty bitmap (default yes)
        ct-format tar       # containers as root.tar.zst (default) or a directory tree
        is_mountpoint yes   # usable only while a file system is mounted at path
        create-base-path 0  # create path when missing (default no: refused)

Registered through the entry point group ``pvebackup.storage_plugins`` (see
``pyproject.toml``), like any third-party plugin. The plugin itself holds no
state: every method gets the storage's ``scfg``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from pvebackup.api.errors import (
    IntegrityError,
    UnsafeArchiveError,
    UsageError,
    VolumeNotFoundError,
    VolumeProtectedError,
)
from pvebackup.api.provider import BackupProvider
from pvebackup.api.types import GuestType, LogFunction
from pvebackup.providers.directory import annotations as sidecars
from pvebackup.providers.directory.provider import BackupDirProvider
from pvebackup.providers.directory.settings import PROPERTIES, BackupDirSettings
from pvebackup.providers.directory.volumes import VolumeLayout
from pvebackup.storage.plugin import (
    AttributeValue,
    DamagedVolume,
    PropertySpec,
    StoragePlugin,
    VolumeInfo,
    VolumeScan,
)

__all__ = ["BackupDirPlugin"]

_FORMATS = {"tar": "tar.zst", "directory": "directory"}


class BackupDirPlugin(StoragePlugin):
    """Storage plugin of type ``backup-dir``: backups as plain files in a directory."""

    type: ClassVar[str] = "backup-dir"
    properties: ClassVar[Mapping[str, PropertySpec]] = PROPERTIES
    children_need_parent: ClassVar[bool] = True  # incrementals are qcow2 overlays

    def new_backup_provider(
        self, scfg: Mapping[str, str], storeid: str, log_function: LogFunction
    ) -> BackupProvider | None:
        """A new :class:`BackupDirProvider` for one backup job or restore."""
        return BackupDirProvider(self, scfg, storeid, log_function)

    def list_volumes(self, scfg: Mapping[str, str], storeid: str) -> list[VolumeInfo]:
        """Every readable committed backup, oldest first; ``parent`` names an
        incremental's base. Damaged volumes are left out (see :meth:`scan_volumes`)."""
        return self.scan_volumes(scfg, storeid).volumes

    def scan_volumes(self, scfg: Mapping[str, str], storeid: str) -> VolumeScan:
        """The readable volumes, and the damaged ones (impossible name, bad index).

        :raises StorageConfigError: no ``path``.
        """
        layout = self._layout(scfg, storeid)
        volumes = []
        volnames, bad = layout.scan()
        damaged = [DamagedVolume(f"{storeid}:{volname}", reason) for volname, reason in bad]
        for volname in volnames:
            try:
                index = layout.read_index(volname)
            except VolumeNotFoundError:
                continue  # removed since the scan
            except (IntegrityError, UnsafeArchiveError) as exc:  # damaged or hostile
                damaged.append(DamagedVolume(f"{storeid}:{volname}", str(exc)))
                continue
            try:
                notes = sidecars.read_notes(layout, volname)
            except (IntegrityError, UnsafeArchiveError):
                notes = ""  # hostile or damaged notes: not shown (`notes` names why)
            except VolumeNotFoundError:
                continue
            protected = sidecars.is_protected(layout, volname)
            verified = sidecars.read_verify_state(layout, volname)
            fmt = "qcow2" if index.vmtype is GuestType.QEMU else _FORMATS[index.ct_format or "tar"]
            volumes.append(
                VolumeInfo(
                    volid=f"{storeid}:{volname}",
                    vmid=index.vmid,
                    vmtype=index.vmtype,
                    ctime=index.ctime,
                    size=index.stored_size,
                    format=fmt,
                    parent=index.parent,
                    virtual_size=(
                        sum(d.size for d in index.devices.values())
                        if index.vmtype is GuestType.QEMU
                        else None
                    ),
                    comment="incremental" if index.parent else "full",
                    notes=notes,
                    protected=protected,
                    verify_state=None if verified is None else verified.state,
                    verify_time=None if verified is None else verified.time,
                )
            )
        return VolumeScan(volumes, damaged)

    def free_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> None:
        """Remove one backup, refusing while an incremental backup depends on it.

        :raises VolumeNotFoundError: no such volume.
        :raises VolumeInUseError: the message names the volumes that depend on it.
        :raises VolumeProtectedError: it is protected.
        """
        layout = self._layout(scfg, storeid)
        if sidecars.is_protected(layout, volname):
            raise VolumeProtectedError(
                f"backup {storeid}:{volname} is protected (pvebackup unprotect it first)"
            )
        layout.remove(volname)

    def get_volume_attribute(
        self, scfg: Mapping[str, str], storeid: str, volname: str, attribute: str
    ) -> AttributeValue | None:
        """``notes`` (``""`` if none) or ``protected``; see the base class.

        :raises VolumeNotFoundError: no such volume.
        :raises CorruptIndexError: the notes sidecar is too large, not UTF-8 or
            not a regular file.
        """
        layout = self._layout(scfg, storeid)
        if attribute == "notes":
            return sidecars.read_notes(layout, volname)
        if attribute == "protected":
            return sidecars.is_protected(layout, volname)
        return None

    def update_volume_attribute(
        self,
        scfg: Mapping[str, str],
        storeid: str,
        volname: str,
        attribute: str,
        value: AttributeValue,
    ) -> None:
        """Set ``notes`` (a ``str``, ``""`` removes) or ``protected`` (a ``bool``)."""
        layout = self._layout(scfg, storeid)
        if attribute == "notes" and isinstance(value, str):
            sidecars.write_notes(layout, volname, value)
        elif attribute == "protected" and isinstance(value, bool):
            sidecars.set_protected(layout, volname, value)
        elif attribute in ("notes", "protected"):
            raise UsageError(f"attribute {attribute!r}: wrong type {type(value).__name__}")
        else:
            super().update_volume_attribute(scfg, storeid, volname, attribute, value)

    @staticmethod
    def _layout(scfg: Mapping[str, str], storeid: str) -> VolumeLayout:
        settings = BackupDirSettings.from_scfg(scfg, storeid)
        # listing or removing never creates anything; unmounted is an error, not "empty"
        settings.base.activate()
        return VolumeLayout(settings.path)
