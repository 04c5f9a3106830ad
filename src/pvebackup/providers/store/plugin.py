"""``BackupStorePlugin``: the storage type ``backup-store`` in storage.cfg.

::

    backup-store: store1
        path /srv/pvebackup-store
        encryption-key /etc/pvebackup/store1.key      # optional
        encryption-passphrase-file /root/store1.pass  # only for a passphrase-protected key
        chunk-size 256K                               # optional; default: the store's
        is_mountpoint yes                             # optional: path must be mounted
        create-base-path 1                            # optional: create path (default no)

Registered through the entry point group ``pvebackup.storage_plugins``. Volumes
are the store's snapshots, named ``backup/vm-<vmid>-<UTC time>``. A listed
volume's ``size`` is what that backup added to the store (its new chunks and its
own files: the task size), ``virtual_size`` the logical size of its disks (what a
restore writes). ``parent`` names the snapshot an incremental was made on; unlike
backup-dir's, a chunk store snapshot never *depends* on its parent, so any of
them can be removed; removing one frees chunk space only at the next garbage
collection.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal, overload

from pvebackup.api.errors import (
    CryptoError,
    IntegrityError,
    UnsafeStorageError,
    UsageError,
    VolumeNotFoundError,
    VolumeProtectedError,
)
from pvebackup.api.provider import BackupProvider
from pvebackup.api.types import LogFunction
from pvebackup.kit.units import format_bytes
from pvebackup.providers.store.provider import BackupStoreProvider
from pvebackup.providers.store.settings import PROPERTIES, StoreSettings
from pvebackup.storage.plugin import (
    AttributeValue,
    DamagedVolume,
    PropertySpec,
    StoragePlugin,
    VolumeInfo,
    VolumeScan,
)
from pvebackup.store import annotations as sidecars
from pvebackup.store.catalog import ParseManifest, SnapshotCatalog, catalog_for
from pvebackup.store.datastore import Datastore
from pvebackup.store.metacache import MetaCache
from pvebackup.store.snapshot import Manifest, SnapshotId
from pvebackup.store.snapshotops import KeylessListing

__all__ = ["FORMAT", "BackupStorePlugin"]

FORMAT = "pvebackup-store"


class BackupStorePlugin(StoragePlugin):
    """Storage plugin of type ``backup-store``: the deduplicating chunk store."""

    type: ClassVar[str] = "backup-store"
    properties: ClassVar[Mapping[str, PropertySpec]] = PROPERTIES

    def new_backup_provider(
        self, scfg: Mapping[str, str], storeid: str, log_function: LogFunction
    ) -> BackupProvider | None:
        """A new :class:`BackupStoreProvider` for one backup job or restore."""
        return BackupStoreProvider(self, scfg, storeid, log_function)

    def list_volumes(self, scfg: Mapping[str, str], storeid: str) -> list[VolumeInfo]:
        """Every readable committed snapshot, oldest first (see :meth:`scan_volumes`)."""
        return self.scan_volumes(scfg, storeid).volumes

    def scan_volumes(self, scfg: Mapping[str, str], storeid: str) -> VolumeScan:
        """Every committed snapshot, oldest first, and the damaged ones apart.

        ``size`` is the disks' logical size (with deduplication, no byte count is
        one backup's own); ``notes`` say full or incremental and what it stored.
        A snapshot whose manifest does not verify, or whose name is impossible, is
        reported in ``damaged`` and not listed: it cannot be restored.
        """
        settings = StoreSettings.from_scfg(scfg, storeid)
        if settings.empty():
            # Before the first backup: nothing to list, which is no error (as backup-dir).
            return VolumeScan([], [])
        store = settings.open_for_listing()
        keyless = isinstance(store, KeylessListing)
        volumes: list[VolumeInfo] = []
        damaged: list[DamagedVolume] = []

        def skipped(prefix: str, reason: str) -> None:
            damaged.append(DamagedVolume(f"{storeid}:{prefix}", reason))

        catalog = _catalog(store, settings)
        sids = (store.list_snapshots(on_skip=skipped) if catalog is None
                else catalog.snapshots(on_skip=skipped))  # fmt: skip
        for sid in sids:
            try:
                if catalog is not None:
                    manifest = catalog.manifest(sid)
                elif isinstance(store, KeylessListing):
                    manifest = store.manifest(sid)
                else:
                    manifest = store.open_snapshot(sid).manifest
            except VolumeNotFoundError:
                continue  # removed since the listing
            except (IntegrityError, CryptoError) as exc:
                # CryptoError too: a manifest claiming another key, or encryption in
                # a plain store, is one damaged snapshot, not a reason to list none.
                damaged.append(DamagedVolume(f"{storeid}:{sid.volname}", str(exc)))
                continue
            comment = _describe(manifest.metadata)
            if keyless:
                # Listed without the key: the signature is unchecked (see KeylessListing).
                comment += "; encrypted, listed without the key (signature not checked)"
            parent = manifest.parent
            try:
                notes = (sidecars.read_notes(store, sid) if catalog is None
                         else catalog.notes(sid))  # fmt: skip
            except (IntegrityError, UnsafeStorageError):
                notes = ""  # hostile or damaged notes: not shown (`notes` names why)
            except VolumeNotFoundError:
                continue  # removed since the listing
            if catalog is None:
                verified = sidecars.read_verify_state(store, sid)
                protected = sidecars.is_protected(store, sid)
            else:
                verified, protected = catalog.verify_state(sid), catalog.protected(sid)
            volumes.append(
                VolumeInfo(
                    volid=f"{storeid}:{sid.volname}",
                    vmid=sid.vmid,
                    vmtype=sid.guest_type,
                    ctime=sid.backup_time,
                    size=_stored_size(manifest),
                    format=FORMAT,
                    parent=None if parent is None else parent.volname,
                    virtual_size=sum(d.size for d in manifest.devices.values()),
                    comment=comment,
                    notes=notes,
                    protected=protected,
                    verify_state=None if verified is None else verified.state,
                    verify_time=None if verified is None else verified.time,
                )
            )
        return VolumeScan(volumes, damaged)

    def free_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> None:
        """Remove the snapshot; its chunks are reclaimed by a later garbage collection.
        The key is not needed (nor read).

        :raises VolumeNotFoundError: no such snapshot.
        :raises VolumeProtectedError: it is protected.
        """
        sid = _sid(volname)
        # Keyless on purpose: removal decrypts and writes nothing (an encrypted
        # store's backups can be pruned on a node that does not hold its key).
        store = StoreSettings.from_scfg(scfg, storeid).open_keyless()
        if sidecars.is_protected(store, sid):
            raise VolumeProtectedError(
                f"backup {storeid}:{volname} is protected (pvebackup unprotect it first)"
            )
        store.remove_snapshot(sid)

    def get_volume_attribute(
        self, scfg: Mapping[str, str], storeid: str, volname: str, attribute: str
    ) -> AttributeValue | None:
        """``notes`` (``""`` if none) or ``protected``; see the base class.

        :raises VolumeNotFoundError: no such snapshot.
        :raises CorruptIndexError: the notes object is too large or not UTF-8.
        :raises UnsafeStorageError: it is a symlink or special file.
        """
        # Keyless: the sidecars are plain (as ``list`` shows them without the key), and
        # ``remove``/``prune`` ask for ``protected`` before removing.
        sid, store = _sid(volname), self._store(scfg, storeid, keyless=True)
        if attribute == "notes":
            return sidecars.read_notes(store, sid)
        if attribute == "protected":
            return sidecars.is_protected(store, sid)
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
        if attribute not in ("notes", "protected"):
            super().update_volume_attribute(scfg, storeid, volname, attribute, value)
            return
        sid, store = _sid(volname), self._store(scfg, storeid)
        if attribute == "notes" and isinstance(value, str):
            sidecars.write_notes(store, sid, value)
        elif attribute == "protected" and isinstance(value, bool):
            sidecars.set_protected(store, sid, value)
        else:
            raise UsageError(f"attribute {attribute!r}: wrong type {type(value).__name__}")

    @overload
    @staticmethod
    def _store(
        scfg: Mapping[str, str], storeid: str, *, keyless: Literal[False] = False
    ) -> Datastore: ...

    @overload
    @staticmethod
    def _store(
        scfg: Mapping[str, str], storeid: str, *, keyless: Literal[True]
    ) -> KeylessListing: ...

    @staticmethod
    def _store(
        scfg: Mapping[str, str], storeid: str, *, keyless: bool = False
    ) -> Datastore | KeylessListing:
        settings = StoreSettings.from_scfg(scfg, storeid)
        if settings.empty():
            raise VolumeNotFoundError(f"storage {storeid} holds no backups yet")
        return settings.open_keyless() if keyless else settings.open()


def _sid(volname: str) -> SnapshotId:
    try:
        return SnapshotId.from_volname(volname)
    except ValueError as exc:
        raise VolumeNotFoundError(f"{volname!r} is not a backup-store volume name") from exc


def _stored_size(manifest: Manifest) -> int:
    """What this snapshot added: its new chunk blobs and its own files (the task size).

    ``stored-bytes`` is metadata (a free string): anything but a plain number
    counts as 0 rather than failing the listing.
    """
    stored = manifest.metadata.get("stored-bytes", "")
    chunks = int(stored) if stored.isascii() and stored.isdigit() and len(stored) <= 20 else 0
    return chunks + sum(f.size for f in manifest.files.values())


def _describe(metadata: Mapping[str, str]) -> str:
    """``"incremental, stored 259.2 KiB"``: how the backup was made, what it added."""
    kind = "incremental" if "=reuse" in metadata.get("bitmap-modes", "") else "full"
    stored = metadata.get("stored-bytes")
    # Metadata values are free strings: a non-number here is shown, not fatal.
    if stored is None or not (stored.isascii() and stored.isdigit()) or len(stored) > 20:
        return kind
    return f"{kind}, stored {format_bytes(int(stored))}"


def _catalog(store: Datastore | KeylessListing, settings: StoreSettings) -> SnapshotCatalog | None:
    """On S3: one listing and a host cache (``cache-dir``) instead of ~6 requests per
    snapshot; None for a local store (its reads cost no requests)."""
    parse: ParseManifest
    if isinstance(store, KeylessListing):
        parse = store.manifest_from_bytes
    else:
        def parse(sid: SnapshotId, raw: bytes) -> Manifest:
            return store.snapshot_from_manifest(sid, raw).manifest

    meta = MetaCache(settings.cache_root() / "metacache" / store.config.store_id)
    return catalog_for(store.backend, meta, parse)
