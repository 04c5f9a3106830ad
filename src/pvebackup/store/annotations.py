"""Notes, protection and verify state of store snapshots: sidecar objects.

The sidecars (:mod:`pvebackup.kit.annotations`) are objects under the
snapshot's prefix, beside ``manifest.json``:
``snapshots/<vm|ct>/<vmid>/<time>/{notes,protected,verify-state.json}``. The
manifest neither lists nor signs them (no snapshot file may take their names:
:func:`pvebackup.store.snapshot` refuses them), exactly as Proxmox Backup Server
keeps notes and protection out of its signed manifest: setting them needs no
key, and a backup's contents never depend on them.

Threat: objects written by others. Reads are bounded (size checked before the
object is read); a file-system backend refuses a symlinked object
(``UnsafeStorageError``); writes are whole-object puts (atomic in every backend).
Removing a snapshot removes its sidecars with it (everything under the prefix).
"""

from __future__ import annotations

from typing import Protocol

from pvebackup.api.errors import (
    CorruptIndexError,
    ObjectNotFoundError,
    UnsafeStorageError,
    VolumeNotFoundError,
)
from pvebackup.kit.annotations import (
    NOTES_MAX,
    NOTES_NAME,
    PROTECTED_NAME,
    VERIFY_MAX,
    VERIFY_NAME,
    VerifyState,
    check_notes,
    parse_notes,
)
from pvebackup.store.backends.base import Backend
from pvebackup.store.datastore import Datastore
from pvebackup.store.snapshot import SnapshotId


class SnapshotObjects(Protocol):
    """What reading a sidecar needs: a :class:`Datastore`, or a
    :class:`~pvebackup.store.snapshotops.KeylessListing` (sidecars are not
    encrypted, so ``list`` shows them without the key)."""

    @property
    def backend(self) -> Backend: ...

    def has_snapshot(self, snapshot: SnapshotId) -> bool: ...

__all__ = [
    "is_protected",
    "read_notes",
    "read_verify_state",
    "set_protected",
    "write_notes",
    "write_verify_state",
]


def _existing(store: SnapshotObjects, sid: SnapshotId) -> str:
    """The snapshot's prefix; ``VolumeNotFoundError`` unless it is committed.

    So that annotating a name that is no snapshot never creates objects under it.
    """
    if not store.has_snapshot(sid):
        raise VolumeNotFoundError(f"no snapshot {sid} in the store")
    return sid.prefix


def _get(store: SnapshotObjects, key: str, limit: int) -> bytes | None:
    """The object, ``None`` if absent; too large is ``CorruptIndexError`` (not read)."""
    try:
        size = store.backend.stat(key).size
        if size > limit:
            raise CorruptIndexError(f"{key}: {size} bytes, more than the {limit} it may have")
        data = store.backend.get(key)
    except ObjectNotFoundError:
        return None
    if len(data) > limit:  # grew between stat and get
        raise CorruptIndexError(f"{key}: more than the {limit} bytes it may have")
    return data


def read_notes(store: SnapshotObjects, sid: SnapshotId) -> str:
    """The snapshot's notes, ``""`` if none.

    :raises VolumeNotFoundError: no such snapshot.
    :raises CorruptIndexError: too large or not UTF-8.
    :raises UnsafeStorageError: a symlink or special file (file-system backend).
    """
    key = _existing(store, sid) + NOTES_NAME
    data = _get(store, key, NOTES_MAX)
    return "" if data is None else parse_notes(data, key)


def write_notes(store: Datastore, sid: SnapshotId, text: str) -> None:
    """Replace the snapshot's notes (``""``: remove them).

    :raises UsageError: too long, or control characters.
    :raises VolumeNotFoundError: no such snapshot.
    """
    data = check_notes(text)
    key = _existing(store, sid) + NOTES_NAME
    if data:
        store.backend.put(key, data, overwrite=True)
    else:
        _delete(store, key)


def is_protected(store: SnapshotObjects, sid: SnapshotId) -> bool:
    """Whether the snapshot is protected; a symlink or special file there counts too
    (fails safe: prune keeps rather than removes).

    :raises VolumeNotFoundError: no such snapshot.
    """
    key = _existing(store, sid) + PROTECTED_NAME
    try:
        return store.backend.exists(key)
    except UnsafeStorageError:
        return True


def set_protected(store: Datastore, sid: SnapshotId, protected: bool) -> None:
    """Protect or unprotect the snapshot.

    :raises VolumeNotFoundError: no such snapshot.
    """
    key = _existing(store, sid) + PROTECTED_NAME
    if protected:
        store.backend.put(key, b"1\n", overwrite=True)
    else:
        _delete(store, key)


def read_verify_state(store: SnapshotObjects, sid: SnapshotId) -> VerifyState | None:
    """The last verify's result; ``None`` if never verified or unreadable (advisory)."""
    try:
        data = _get(store, sid.prefix + VERIFY_NAME, VERIFY_MAX)
    except (CorruptIndexError, UnsafeStorageError):
        return None
    return None if data is None else VerifyState.from_bytes(data)


def write_verify_state(store: Datastore, sid: SnapshotId, state: VerifyState) -> None:
    """Record a verify's result beside the snapshot.

    :raises VolumeNotFoundError: no such snapshot (removed while verify ran).
    """
    key = _existing(store, sid) + VERIFY_NAME
    store.backend.put(key, state.to_bytes(), overwrite=True)


def _delete(store: Datastore, key: str) -> None:
    try:
        store.backend.delete(key)
    except ObjectNotFoundError:
        pass
