"""The snapshots of a store from one listing, their small objects from a cache.

For a store in a bucket, ``list`` costs one ``ListObjectsV2`` per 1000 objects
under ``snapshots/`` (a snapshot has about five: manifest, index, config blob,
sidecars), plus one GET per manifest, note or verify state that is new or changed
since the last listing on this host (:mod:`.metacache`); protection costs nothing
(the listing shows whether the ``protected`` object exists). Without a cache, the
same listing still saves the HEAD requests that presence checks would cost.

Works on backends that list with entity tags (``list_info``: S3); callers use
the per-object path (``annotations``) on the others, whose reads are local.

Threat: the listing and the objects are storage content. Sizes from the listing
are checked against each object's limit before it is read, the bytes read are
checked against the size again, and every object is parsed and verified as the
uncached path does (manifest signature, notes limits, verify state).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from pvebackup.api.errors import CorruptIndexError, ObjectNotFoundError, VolumeNotFoundError
from pvebackup.kit.annotations import (
    NOTES_MAX,
    NOTES_NAME,
    PROTECTED_NAME,
    VERIFY_MAX,
    VERIFY_NAME,
    VerifyState,
    parse_notes,
)
from pvebackup.store.backends.base import Backend, ObjectInfo
from pvebackup.store.formats import MAX_MANIFEST_SIZE
from pvebackup.store.metacache import MetaCache
from pvebackup.store.snapshot import MANIFEST_NAME, SNAPSHOTS_PREFIX, Manifest, SnapshotId

__all__ = ["ParseManifest", "SnapshotCatalog", "catalog_for"]


class _ListsInfo(Protocol):
    def list_info(self, prefix: str = "") -> Iterator[tuple[str, ObjectInfo]]: ...


ParseManifest = Callable[[SnapshotId, bytes], Manifest]
"""Verifies a manifest's bytes as the store's own read path does (with the key:
``Datastore.snapshot_from_manifest``; without: ``KeylessListing.manifest_from_bytes``)."""


def catalog_for(
    backend: Backend, cache: MetaCache | None, parse: ParseManifest
) -> SnapshotCatalog | None:
    """A catalog of the store on ``backend`` if it lists with tags, else None."""
    # A wrapper (RetryBackend) has the method even when its inner backend has not.
    inner = getattr(backend, "inner", backend)
    if not hasattr(backend, "list_info") or not hasattr(inner, "list_info"):
        return None
    return SnapshotCatalog(backend, cache, parse)


class SnapshotCatalog:
    """One listing of ``snapshots/`` (made on construction) and reads through it."""

    def __init__(self, backend: Backend, cache: MetaCache | None, parse: ParseManifest) -> None:
        self.backend = backend
        self.cache = cache
        self._parse = parse
        lister: _ListsInfo = backend  # type: ignore[assignment]
        self._objects: dict[str, ObjectInfo] = dict(lister.list_info(SNAPSHOTS_PREFIX))
        if cache is not None:
            cache.retain(self._objects)

    def snapshots(self, *, on_skip: Callable[[str, str], None] | None = None) -> list[SnapshotId]:
        """Committed snapshots (with a manifest), oldest first; as ``list_snapshots``."""
        suffix = "/" + MANIFEST_NAME
        found: list[SnapshotId] = []
        for key in self._objects:
            if not key.endswith(suffix):
                continue
            try:
                found.append(SnapshotId.parse(key[len(SNAPSHOTS_PREFIX) : -len(suffix)]))
            except ValueError as exc:
                if on_skip is not None:
                    on_skip(key[: -len(suffix)], str(exc))
        return sorted(found, key=lambda s: (s.backup_time, s.kind, s.vmid))

    def _read(self, key: str, limit: int) -> bytes | None:
        """The object ``key`` as listed (cached or read), None if not listed/gone."""
        info = self._objects.get(key)
        if info is None:
            return None
        if info.size > limit:
            raise CorruptIndexError(f"{key}: {info.size} bytes, more than the {limit} it may have")
        if self.cache is not None:
            data = self.cache.get(key, info.tag, info.size)
            if data is not None:
                return data
        try:
            data = self.backend.get(key)
        except ObjectNotFoundError:
            return None
        if len(data) > limit:  # replaced by a larger one since the listing
            raise CorruptIndexError(f"{key}: more than the {limit} bytes it may have")
        if self.cache is not None:
            self.cache.put(key, info.tag, data)
        return data

    def manifest(self, sid: SnapshotId) -> Manifest:
        """The snapshot's manifest, verified by ``parse``; from the cache if unchanged.

        :raises VolumeNotFoundError: not listed (or removed since).
        """
        raw = self._read(sid.prefix + MANIFEST_NAME, MAX_MANIFEST_SIZE)
        if raw is None:
            raise VolumeNotFoundError(f"no snapshot {sid} in the store")
        return self._parse(sid, raw)

    def notes(self, sid: SnapshotId) -> str:
        """As ``annotations.read_notes`` (``CorruptIndexError`` if too large or not UTF-8)."""
        key = sid.prefix + NOTES_NAME
        data = self._read(key, NOTES_MAX)
        return "" if data is None else parse_notes(data, key)

    def protected(self, sid: SnapshotId) -> bool:
        """Whether the listing shows the snapshot's ``protected`` object."""
        return sid.prefix + PROTECTED_NAME in self._objects

    def verify_state(self, sid: SnapshotId) -> VerifyState | None:
        """As ``annotations.read_verify_state`` (advisory: unreadable is None)."""
        try:
            data = self._read(sid.prefix + VERIFY_NAME, VERIFY_MAX)
        except CorruptIndexError:
            return None
        return None if data is None else VerifyState.from_bytes(data)
