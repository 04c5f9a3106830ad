"""``StoragePlugin``: the base class of every storage type in storage.cfg.

One plugin class per storage ``type`` (``dir``, ``backup-dir``, ...). The registry
(:mod:`pvebackup.storage.registry`) keeps one instance per type; the methods take
the storage's configuration (``scfg``, a ``dict`` of strings with ``type``) and the
storage id, like Proxmox VE's class methods take ``$scfg`` and ``$storeid``. A
plugin therefore holds no per-storage state itself.

A plugin for an external backup system overrides :meth:`new_backup_provider` to
return its :class:`~pvebackup.api.BackupProvider`, and :meth:`list_volumes` /
:meth:`free_volume` so that ``pvebackup list``/``remove`` can show and remove its
backups; :meth:`scan_volumes` as well when it can report a damaged volume instead
of failing the whole listing; :meth:`get_volume_attribute` /
:meth:`update_volume_attribute` for notes and protection (optional: without them
a backup has no notes, is never protected, and ``pvebackup notes --set`` /
``protect`` say the plugin does not support it). A plain storage (``dir``)
returns ``None`` and holds guest images instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pvebackup.api.errors import UnsupportedError, VolumeProtectedError
from pvebackup.api.provider import BackupProvider
from pvebackup.api.types import GuestType, LogFunction
from pvebackup.kit.prune import format_keep_options, parse_keep_options
from pvebackup.storage.properties import (
    PropertyKind,
    PropertySpec,
    StorageProperties,
    parse_properties,
)
from pvebackup.storage.version import APIVER

__all__ = [
    "COMMON_PROPERTIES",
    "DamagedVolume",
    "PropertyKind",
    "PropertySpec",
    "StorageProperties",
    "StoragePlugin",
    "VolumeInfo",
    "VolumeScan",
    "PRUNE_PROPERTIES",
    "VOLUME_ATTRIBUTES",
    "AttributeValue",
    "remove_backup_volume",
]

VOLUME_ATTRIBUTES = ("notes", "protected")
"""The attributes of a backup volume (Proxmox VE's ``get_volume_attribute`` names):
``notes`` (``str``) and ``protected`` (``bool``)."""

AttributeValue = str | bool


COMMON_PROPERTIES: Mapping[str, PropertySpec] = {
    "content": PropertySpec(
        description="comma separated content types (images, rootdir, backup, ...)"
    ),
    "disable": PropertySpec(
        PropertyKind.BOOL,
        description="the storage is disabled: no backup to it, no restore from or onto"
        " it, no list or remove (storage.cfg still parses)",
    ),
    "nodes": PropertySpec(description="comma separated node names that may use it"),
    "shared": PropertySpec(PropertyKind.BOOL, description="all nodes see the same content"),
}
"""Properties every storage type understands (Proxmox VE's common options)."""


def _prune_backups(text: str) -> str:
    return format_keep_options(parse_keep_options(text)) or "keep-all=1"


PRUNE_PROPERTIES: Mapping[str, PropertySpec] = {
    "prune-backups": PropertySpec(
        description="retention applied by 'pvebackup prune' and after each backup, in "
        "Proxmox VE's syntax: keep-last=N,keep-hourly=N,...,keep-yearly=N or keep-all=1",
        parser=_prune_backups,
    ),
}
"""The retention property of storages that hold backups (see :mod:`pvebackup.kit.prune`)."""


@dataclass(frozen=True, slots=True)
class VolumeInfo:
    """One backup volume on a storage, as ``pvebackup list`` shows it.

    Every provider fills the fields with the same meaning:

    :ivar volid: ``"STOREID:VOLNAME"``.
    :ivar vmid: the guest the backup belongs to.
    :ivar vmtype: ``qemu`` or ``lxc``.
    :ivar ctime: creation time, Unix seconds.
    :ivar size: bytes stored *for this backup* (what it added to the storage; the
        same number ``backup_get_task_size`` reported). With deduplication or an
        incremental chain this is far below the guest's size.
    :ivar format: the provider's format name (e.g. ``pvebackup-dir``).
    :ivar parent: for an incremental backup, the volname of the backup it was
        made on top of (its base); ``None`` for a full backup. Whether the parent
        may then be removed is the provider's business (``backup-dir`` refuses:
        it is a backing file; ``backup-store`` allows: snapshots stand alone).
    :ivar notes: the operator's notes on this backup (empty unless someone wrote
        some); never generated text.
    :ivar virtual_size: the guest's size as backed up: the sum of the VM's disk
        sizes; ``None`` where there is no such number (containers).
    :ivar comment: what the provider says about the backup, for people (e.g.
        ``"incremental, stored 1.2 MiB"``).
    :ivar protected: never removed or pruned until unprotected.
    :ivar verify_state: ``"ok"`` or ``"failed"``: the last ``pvebackup verify``
        of it; ``None`` if never verified (or the plugin does not record it).
        Advisory only: nothing skips a check because of it.
    :ivar verify_time: when that verify ran, Unix seconds (``None`` with it).
    """

    volid: str
    vmid: int
    vmtype: GuestType
    ctime: int
    size: int
    format: str
    parent: str | None = None
    notes: str = ""
    virtual_size: int | None = None
    comment: str = ""
    protected: bool = False
    verify_state: str | None = None
    verify_time: int | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with stable keys; ``vmtype`` as its plain string."""
        return {
            "volid": self.volid,
            "vmid": self.vmid,
            "vmtype": str(self.vmtype),
            "ctime": self.ctime,
            "size": self.size,
            "virtual-size": self.virtual_size,
            "format": self.format,
            "parent": self.parent,
            "notes": self.notes,
            "comment": self.comment,
            "protected": self.protected,
            "verify": (
                None
                if self.verify_state is None
                else {"state": self.verify_state, "time": self.verify_time}
            ),
        }


@dataclass(frozen=True, slots=True)
class DamagedVolume:
    """A backup volume a listing found but could not read.

    :ivar volid: ``"STOREID:VOLNAME"`` as found on the storage (the name itself
        may be the damage, e.g. an impossible date).
    :ivar reason: what is wrong, for people.
    """

    volid: str
    reason: str


@dataclass(frozen=True, slots=True)
class VolumeScan:
    """What :meth:`StoragePlugin.scan_volumes` found: good volumes and damaged ones."""

    volumes: list[VolumeInfo]
    damaged: list[DamagedVolume]


class StoragePlugin:
    """Base class of storage plugins. Subclasses set ``type`` and ``properties``.

    :cvar type: the storage type as written in storage.cfg headers (``dir: local``).
    :cvar api_version: the storage API version the plugin was written against; the
        registry refuses it unless ``APIVER - APIAGE <= api_version <= APIVER``.
    :cvar properties: every property a section of this type may have (include
        :data:`COMMON_PROPERTIES`); storage.cfg parsing refuses others.
    :cvar open_properties: accept properties not in ``properties`` as they are
        (valued, or flags when they have no value). Only for types pvebackup merely
        has to recognise in a real node's storage.cfg (see ``storage.pve``).
    :cvar children_need_parent: a volume's ``parent`` is needed to restore it (an
        image chain), so ``free_volume`` refuses a parent while a child exists.
        ``prune`` then keeps such a base and says why, in dry runs too.
    """

    type: ClassVar[str]
    api_version: ClassVar[int] = APIVER
    properties: ClassVar[Mapping[str, PropertySpec]] = COMMON_PROPERTIES
    open_properties: ClassVar[bool] = False
    children_need_parent: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} type={getattr(self, 'type', '?')!r}>"

    def parse_properties(self, scfg: Mapping[str, str], storeid: str) -> StorageProperties:
        """The typed properties of ``scfg`` by this plugin's :attr:`properties`.

        The one call a plugin or its provider makes to read its properties: the
        seed hands ``scfg`` over as strings; this gives ``bool``, ``int``,
        ``Path``... values (see :mod:`pvebackup.storage.properties`). Never fails
        for a scfg of a storage.cfg that was read (it was checked then).

        :raises StorageConfigError: a value that does not parse, an unknown or a
            missing required property (a scfg made in code).
        """
        return parse_properties(
            self.properties, scfg, storeid, open_properties=self.open_properties
        )

    def new_backup_provider(
        self, scfg: Mapping[str, str], storeid: str, log_function: LogFunction
    ) -> BackupProvider | None:
        """Return the backup provider of an external backup system, or ``None``.

        Used by storage plugins for external backup providers. See
        :class:`pvebackup.api.BackupProvider` for the API the provider needs to
        implement. When this returns a provider, the host uses callbacks to that
        provider for backups and restores instead of its usual mechanisms. Called
        once per backup job and once per restore, through the module-level
        :func:`pvebackup.storage.new_backup_provider`.

        :param scfg: the storage configuration: ``type`` and the section's
            properties from storage.cfg, all values strings (flags ``"1"``).
        :param storeid: the storage id.
        :param log_function: ``log_function(level, message)`` writes to the
            backup task log; ``level`` is ``info``, ``warn`` or ``err``,
            ``message`` is the message to be printed.
        :returns: a new provider instance (constructed as
            ``Provider(self, scfg, storeid, log_function)``), or ``None``: the
            base class returns ``None`` because a plain storage has no provider.
        :raises ConfigError: the plugin cannot make a provider from ``scfg``.
        """
        return None

    def list_volumes(self, scfg: Mapping[str, str], storeid: str) -> list[VolumeInfo]:
        """List the backup volumes on this storage, oldest first.

        :raises UnsupportedError: the storage type does not hold backups, or its
            plugin has a backup provider but does not implement listing (base).
        """
        raise self._unsupported("listing")

    def _unsupported(self, what: str) -> UnsupportedError:
        # A plugin with a backup provider does hold backups: say what is missing.
        if type(self).new_backup_provider is not StoragePlugin.new_backup_provider:
            return UnsupportedError(f"plugin {self.type} does not implement {what}")
        return UnsupportedError(f"storage type {self.type} does not hold backups")

    def scan_volumes(self, scfg: Mapping[str, str], storeid: str) -> VolumeScan:
        """:meth:`list_volumes`, plus the volumes that could not be read.

        Storage content is written by others too: one damaged volume (a name with
        an impossible date, an unreadable index) must not hide the others, so a
        plugin that can tell lists the good ones and reports each damaged one here
        instead of raising. The base class has nothing to report and returns
        ``list_volumes`` with no damaged volumes, so a plugin that implements only
        ``list_volumes`` keeps working.

        :raises UnsupportedError: the storage type does not hold backups (base).
        """
        return VolumeScan(self.list_volumes(scfg, storeid), [])

    def free_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> None:
        """Remove one backup volume.

        :raises VolumeNotFoundError: no such volume.
        :raises VolumeInUseError: another volume depends on it (``parent``).
        :raises UnsupportedError: the storage type does not hold backups, or its
            plugin has a backup provider but does not implement removal (base).
        """
        raise self._unsupported("removal")

    def get_volume_attribute(
        self, scfg: Mapping[str, str], storeid: str, volname: str, attribute: str
    ) -> AttributeValue | None:
        """An attribute of one backup volume (Proxmox VE's ``get_volume_attribute``).

        ``attribute`` is one of :data:`VOLUME_ATTRIBUTES`: ``"notes"`` gives the
        notes (``""`` when none), ``"protected"`` a ``bool``. Optional: the base
        class returns ``None`` for every attribute (no notes, not protected), as
        Proxmox VE's does; a plugin that overrides it must override
        :meth:`update_volume_attribute` too. ``None`` also for an attribute the
        plugin does not know.

        :raises VolumeNotFoundError: no such volume (plugins that implement it).
        """
        return None

    def update_volume_attribute(
        self,
        scfg: Mapping[str, str],
        storeid: str,
        volname: str,
        attribute: str,
        value: AttributeValue,
    ) -> None:
        """Set an attribute of one backup volume (``update_volume_attribute``).

        ``"notes"`` takes a ``str`` (``""`` removes the notes), ``"protected"`` a
        ``bool``. A protected volume must make :meth:`free_volume` raise
        :class:`VolumeProtectedError` (``pvebackup remove`` and ``prune`` check
        first anyway, through :func:`remove_backup_volume`), and
        :meth:`scan_volumes` report ``protected`` and ``notes``.

        :raises UnsupportedError: the plugin does not support the attribute (base).
        :raises VolumeNotFoundError: no such volume.
        :raises UsageError: a value that cannot be stored (notes too long...).
        """
        raise UnsupportedError(
            f"attribute {attribute!r} is not supported for storage type {self.type!r}"
        )

    def image_path(self, scfg: Mapping[str, str], volname: str) -> Path:
        """Path of a guest image or subvol volume (``<vmid>/<name>``) on this storage.

        :raises UnsupportedError: the storage type holds no guest images (base).
        """
        raise UnsupportedError(f"storage type {self.type} holds no guest images")


def remove_backup_volume(
    plugin: StoragePlugin, scfg: Mapping[str, str], storeid: str, volname: str
) -> None:
    """Remove a backup volume unless it is protected (Proxmox VE's ``vdisk_free`` check).

    Checked here as well as in our providers' ``free_volume``, so that a
    third-party plugin that records protection but forgets to check it in
    ``free_volume`` still never loses a protected backup to ``remove`` or ``prune``.

    :raises VolumeProtectedError: the volume is protected; nothing was removed.
    """
    if plugin.get_volume_attribute(scfg, storeid, volname, "protected"):
        raise VolumeProtectedError(
            f"backup {storeid}:{volname} is protected (pvebackup unprotect it first)"
        )
    plugin.free_volume(scfg, storeid, volname)
