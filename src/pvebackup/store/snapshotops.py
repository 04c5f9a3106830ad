"""Snapshot-level operations of a store: open, list, remove (with pins), leftovers.

A mixin of :class:`pvebackup.store.datastore.Datastore` (kept apart to keep that
module readable); it needs only the backend, the codec and the key.

Threat: manifests are storage content, checked by ``Manifest.from_bytes``; session
objects (pins) too, by ``parse_session``, and only plausible ones pin.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from typing import Final

from pvebackup.api.errors import (
    CorruptIndexError,
    ObjectNotFoundError,
    VolumeInUseError,
    VolumeNotFoundError,
)
from pvebackup.api.types import GuestType
from pvebackup.store.backends.base import Backend
from pvebackup.store.blob import ChunkCodec
from pvebackup.store.formats import MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE
from pvebackup.store.gcrecord import MAX_SESSION_SIZE, SESSIONS_PREFIX, parse_session
from pvebackup.store.keys import EncryptionKey
from pvebackup.store.snapshot import (
    MANIFEST_NAME,
    SNAPSHOTS_PREFIX,
    Manifest,
    Snapshot,
    SnapshotId,
)
from pvebackup.store.storeconfig import CONFIG_KEY, StoreConfig, get_bounded

__all__ = [
    "KeylessListing",
    "SnapshotOps",
    "list_snapshot_ids",
    "pinned_snapshots",
    "remove_snapshot_objects",
]

_PIN_SKEW: Final = 600.0
"""Seconds a session's heartbeat may lie ahead of our clock (skew between hosts)."""
_MAX_PIN_TTL: Final = 86400.0


class SnapshotOps:
    """Open, list and remove committed snapshots; see the module docstring."""

    backend: Backend
    codec: ChunkCodec
    _key: EncryptionKey | None

    def open_snapshot(self, snapshot: SnapshotId) -> Snapshot:
        """The committed snapshot, manifest verified (``VolumeNotFoundError`` if none)."""
        key = snapshot.prefix + MANIFEST_NAME
        try:
            raw = get_bounded(self.backend, key, MAX_MANIFEST_SIZE)
        except ObjectNotFoundError as exc:
            raise VolumeNotFoundError(f"no snapshot {snapshot} in the store") from exc
        return self.snapshot_from_manifest(snapshot, raw)

    def snapshot_from_manifest(self, snapshot: SnapshotId, raw: bytes) -> Snapshot:
        """The snapshot whose manifest bytes are ``raw`` (read by the caller, e.g.
        from a cache), verified exactly as ``open_snapshot`` verifies them."""
        manifest = Manifest.from_bytes(raw, self._key, name=f"snapshot {snapshot}")
        if manifest.snapshot != snapshot:
            raise CorruptIndexError(f"snapshot {snapshot}: manifest names {manifest.snapshot}")
        return Snapshot(self.backend, self.codec, manifest, hashlib.sha256(raw).hexdigest())

    def has_snapshot(self, snapshot: SnapshotId) -> bool:
        return self.backend.exists(snapshot.prefix + MANIFEST_NAME)

    def list_snapshots(
        self,
        guest_type: GuestType | None = None,
        vmid: int | None = None,
        *,
        on_skip: Callable[[str, str], None] | None = None,
    ) -> list[SnapshotId]:
        """Committed snapshots (those with a manifest), oldest first.

        A manifest under a prefix that is no snapshot name (``vm/100/2026-02-31T...``:
        an impossible date, written by someone else) is skipped, never fatal to the
        listing; ``on_skip(key prefix, reason)`` hears of each.
        """
        return list_snapshot_ids(self.backend, guest_type, vmid, on_skip=on_skip)

    def remove_snapshot(self, snapshot: SnapshotId) -> None:
        """Drop a snapshot: the manifest first (it vanishes at once), then its files.

        Its chunks stay until garbage collection.
        """
        remove_snapshot_objects(self.backend, snapshot)

    def incomplete_snapshots(self) -> Iterator[tuple[str, float]]:
        """``(prefix, newest mtime)`` of every snapshot prefix without a manifest."""
        groups: dict[str, list[str]] = {}
        for key in self.backend.list(SNAPSHOTS_PREFIX):
            parts = key[len(SNAPSHOTS_PREFIX) :].split("/")
            if len(parts) < 4:
                continue
            groups.setdefault(SNAPSHOTS_PREFIX + "/".join(parts[:3]) + "/", []).append(key)
        for prefix, keys in groups.items():
            if prefix + MANIFEST_NAME in keys:
                continue
            newest = 0.0
            for k in keys:
                try:
                    newest = max(newest, self.backend.stat(k).mtime)
                except ObjectNotFoundError:
                    continue
            yield prefix, newest

    def cleanup_incomplete(self, *, min_age: float = 86400.0) -> list[str]:
        """Delete leftovers of snapshots that never got a manifest.

        Only prefixes whose newest file is older than ``min_age`` seconds, so that a
        backup still running is left alone. Returns the removed prefixes.
        """
        cutoff = time.time() - min_age
        removed: list[str] = []
        for prefix, newest in list(self.incomplete_snapshots()):
            if newest > cutoff:
                continue
            for k in list(self.backend.list(prefix)):
                self.backend.delete(k)
            removed.append(prefix)
        return removed

    def pinned_snapshots(self, *, now: float | None = None) -> dict[str, str]:
        """Snapshot key prefix -> the live writer session (hex) that pins it."""
        return pinned_snapshots(self.backend, now=now)


def pinned_snapshots(backend: Backend, *, now: float | None = None) -> dict[str, str]:
    """Snapshot key prefix -> the live writer session (hex) that pins it (no key needed)."""
    when = time.time() if now is None else now
    out: dict[str, str] = {}
    for key in backend.list(SESSIONS_PREFIX):
        try:
            info = parse_session(backend.get_range(key, 0, MAX_SESSION_SIZE + 1))
        except (ObjectNotFoundError, CorruptIndexError):
            continue  # ended meanwhile / not a session: pins nothing
        # Threat: a planted session with a heartbeat far ahead (or a huge ttl)
        # would pin a snapshot forever; only a plausible one pins.
        plausible = info.heartbeat <= when + _PIN_SKEW and info.ttl <= _MAX_PIN_TTL
        if plausible and info.alive(when):
            out.update((p, info.session) for p in info.pins)
    return out


def remove_snapshot_objects(backend: Backend, snapshot: SnapshotId) -> None:
    """Delete a snapshot's objects: the manifest first (the snapshot vanishes at
    once), then the rest. Needs no key: nothing is decrypted or written; the
    chunks stay for garbage collection.

    :raises VolumeNotFoundError: no such committed snapshot.
    :raises VolumeInUseError: a running backup builds on it.
    """
    key = snapshot.prefix + MANIFEST_NAME
    if not backend.exists(key):
        raise VolumeNotFoundError(f"no snapshot {snapshot} in the store")
    # A running backup (any process or host) builds on it: see "Store lock
    # protocol" in docs/design.md for the race this leaves and why it is safe.
    session = pinned_snapshots(backend).get(snapshot.prefix)
    if session is not None:
        raise VolumeInUseError(
            f"snapshot {snapshot} is the base of a running backup (writer session "
            f"{session}); try again when it has ended"
        )
    backend.delete(key)
    backend.sync()
    for k in list(backend.list(snapshot.prefix)):
        backend.delete(k)


def list_snapshot_ids(
    backend: Backend,
    guest_type: GuestType | None = None,
    vmid: int | None = None,
    *,
    on_skip: Callable[[str, str], None] | None = None,
) -> list[SnapshotId]:
    """:meth:`SnapshotOps.list_snapshots` on ``backend``: names only, no key needed."""
    prefix = SNAPSHOTS_PREFIX
    if guest_type is not None:
        prefix += SnapshotId(guest_type, 1, 0).kind + "/"
        if vmid is not None:
            prefix += f"{vmid}/"
    found: list[SnapshotId] = []
    suffix = "/" + MANIFEST_NAME
    for key in backend.list(prefix):
        if not key.endswith(suffix):
            continue
        try:
            sid = SnapshotId.parse(key[len(SNAPSHOTS_PREFIX) : -len(suffix)])
        except ValueError as exc:
            if on_skip is not None:
                on_skip(key[: -len(suffix)], str(exc))
            continue  # not ours: skip rather than fail the whole listing
        if vmid is None or sid.vmid == vmid:
            found.append(sid)
    return sorted(found, key=lambda s: (s.backup_time, s.kind, s.vmid))


class KeylessListing:
    """What ``list``, ``remove`` and ``prune`` may do with a store without its key:
    read names, times, sizes, notes; delete whole snapshots.

    ``snapshot/manifest.json`` is plain JSON (only its signature needs the key);
    chunks, indexes' data and the stored files (guest config, task log) stay
    encrypted and are never opened here. There is no chunk codec and no writer
    (deleting a snapshot's objects is the only change): a store opened this way
    cannot be written to, so a missing key can never lead to plaintext chunks in
    an encrypted store. Removal needs no key in PBS either (``snapshot forget``);
    the freed chunks go at the next garbage collection.
    """

    def __init__(self, backend: Backend) -> None:
        try:
            raw = get_bounded(backend, CONFIG_KEY, MAX_CONFIG_SIZE)
        except ObjectNotFoundError as exc:
            raise ObjectNotFoundError(f"no store in {backend!r} ({CONFIG_KEY} missing)") from exc
        self.backend = backend
        self.config = StoreConfig.from_bytes(raw)

    def list_snapshots(
        self, *, on_skip: Callable[[str, str], None] | None = None
    ) -> list[SnapshotId]:
        return list_snapshot_ids(self.backend, on_skip=on_skip)

    def has_snapshot(self, snapshot: SnapshotId) -> bool:
        return self.backend.exists(snapshot.prefix + MANIFEST_NAME)

    def remove_snapshot(self, snapshot: SnapshotId) -> None:
        """As :meth:`SnapshotOps.remove_snapshot` (pins honoured, no key needed)."""
        remove_snapshot_objects(self.backend, snapshot)

    def manifest(self, snapshot: SnapshotId) -> Manifest:
        """The manifest, every field checked but (encrypted) its signature unchecked.

        :raises CorruptIndexError: malformed, or it names another snapshot or key.
        """
        key = snapshot.prefix + MANIFEST_NAME
        try:
            raw = get_bounded(self.backend, key, MAX_MANIFEST_SIZE)
        except ObjectNotFoundError as exc:
            raise VolumeNotFoundError(f"no snapshot {snapshot} in the store") from exc
        return self.manifest_from_bytes(snapshot, raw)

    def manifest_from_bytes(self, snapshot: SnapshotId, raw: bytes) -> Manifest:
        """:meth:`manifest` of bytes read by the caller (e.g. from a cache)."""
        name = f"snapshot {snapshot}"
        manifest = Manifest.from_bytes(raw, None, name=name, unsigned_ok=self.config.encrypted)
        if manifest.snapshot != snapshot:
            raise CorruptIndexError(f"{name}: manifest names {manifest.snapshot}")
        if manifest.encrypted != self.config.encrypted or (
            manifest.key_fingerprint != self.config.key_fingerprint
        ):
            raise CorruptIndexError(f"{name}: manifest does not match the store's key")
        return manifest
