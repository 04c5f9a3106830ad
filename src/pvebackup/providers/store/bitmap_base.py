"""Which snapshot a guest's dirty bitmap may be applied to (the incremental base).

The host clears a bitmap only after a backup that used it succeeded (after
``backup_end`` returned), so the bitmap holds every write since that backup
started. It may be applied to that backup's snapshot, never to an older one or to
one that differs from what was committed: the writes in between would be missing,
a silent gap. The proof of "this is the snapshot, byte for byte" cannot live in
the store (a rolled-back or edited store vouches for itself), so it lives on the
host (:mod:`pvebackup.kit.hoststate`), per (storage, guest)::

    {"store-id": ..., "snapshot": "vm/100/...", "manifest-sha256": "<hex>",
     "bitmap-id": "store-<8 hex>-<6 hex>" | null, "reason": ""}

- ``backup_end``: the snapshot just committed, the SHA-256 of its manifest bytes
  (the manifest lists every index with its SHA-256, each index every chunk
  digest: the whole backup is pinned), and the bitmap id used (``null`` when the
  backup used none).
- a failed backup that created a bitmap (``new``), or an incremental one that
  found its base unusable: no snapshot, with the reason.

The bitmap id names a *chain*: a random part chosen on this host when a chain
starts, so a bitmap that another host (or this host before it lost its state)
cleared can never be answered ``reuse``.

The store keeps a record too (``provider/backup-store/bitmap-base/<kind>-<vmid>
.json``, a key prefix the datastore does not use): the same snapshot and
checksum, signed in an encrypted store (HMAC-SHA256 under a key derived from the
store key's signing key). It is never trusted on its own: it must agree with the
host state, so an edited record (or one another host wrote) means a full backup.

``decide`` returns the bitmap id to give the host, and the base, or no bitmap
with the reason (logged at ``warn`` for anything that looks like a rollback or an
edit).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any

from pvebackup.api.errors import IntegrityError, ObjectNotFoundError, VolumeNotFoundError
from pvebackup.api.types import GuestType
from pvebackup.kit.hoststate import HostState
from pvebackup.store.backends.base import Backend
from pvebackup.store.datastore import Datastore
from pvebackup.store.formats import LABEL_BITMAP_BASE_RECORD
from pvebackup.store.keys import EncryptionKey
from pvebackup.store.snapshot import SnapshotId

__all__ = [
    "BaseDecision",
    "BitmapBase",
    "commit_base",
    "decide",
    "new_chain_id",
    "read_base",
    "reset_base",
    "write_base",
]

_PREFIX = "provider/backup-store/bitmap-base/"


@dataclass(frozen=True, slots=True)
class BitmapBase:
    """``snapshot``: the safe base, or ``None`` (next backup full) with ``reason``."""

    snapshot: SnapshotId | None
    manifest_sha256: str | None = None
    bitmap_id: str | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class BaseDecision:
    """What ``backup_get_mechanism`` answers: bitmap id and base, or why none."""

    bitmap_id: str | None
    base: SnapshotId | None
    level: str
    message: str
    base_sha256: str | None = None


def _name(kind: str, vmid: int) -> str:
    return f"{kind}-{vmid}"


def _key(kind: str, vmid: int) -> str:
    return f"{_PREFIX}{_name(kind, vmid)}.json"


def _body(base: BitmapBase) -> dict[str, Any]:
    return {
        "snapshot": None if base.snapshot is None else base.snapshot.path,
        "manifest-sha256": base.manifest_sha256,
        "reason": base.reason,
    }


def _mac(body: dict[str, Any], key: EncryptionKey | None) -> str:
    data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    if key is None:
        # Integrity against damage only: a plain store cannot authenticate anything,
        # which is why the record is never trusted without the host state.
        return "sha256:" + hashlib.sha256(data).hexdigest()
    record_key = hmac.digest(key.signing_key, LABEL_BITMAP_BASE_RECORD, "sha256")
    return "hmac-sha256:" + hmac.digest(record_key, data, "sha256").hex()


def write_base(
    backend: Backend, kind: str, vmid: int, base: BitmapBase, key: EncryptionKey | None
) -> None:
    """Replace the store's record of guest ``vmid`` (durably, signed when keyed)."""
    doc = _body(base)
    doc["mac"] = _mac(doc, key)
    backend.put(_key(kind, vmid), json.dumps(doc).encode(), overwrite=True)


def read_base(
    backend: Backend, kind: str, vmid: int, key: EncryptionKey | None
) -> BitmapBase | str | None:
    """The store's record of guest ``vmid``: ``None`` if there is none, a string
    saying what is wrong if it is damaged or its signature does not fit."""
    # Threat: the store is writable by others; the record is checked, and even a
    # valid one only counts when it agrees with the host state.
    try:
        raw = backend.get(_key(kind, vmid))
    except ObjectNotFoundError:
        return None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise TypeError("not an object")
        mac = doc.pop("mac", None)
        snap = doc.get("snapshot")
        sha = doc.get("manifest-sha256")
        reason = doc.get("reason", "")
        if not isinstance(sha, str | None) or not isinstance(reason, str):
            raise TypeError("wrong field types")
        base = BitmapBase(None if snap is None else SnapshotId.parse(str(snap)), sha, None, reason)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "the store's bitmap record is damaged"
    if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(_body(base), key)):
        return "the store's bitmap record does not carry a valid signature (edited)"
    return base


def _host_name(kind: str, vmid: int) -> str:
    return _name(kind, vmid)


def _read_host(state: HostState, kind: str, vmid: int, store_id: str) -> BitmapBase | str | None:
    loaded = state.read(_host_name(kind, vmid))
    if loaded.missing:
        return None
    if loaded.doc is None:
        return loaded.problem or "the host state file is damaged"
    doc = loaded.doc
    try:
        if doc.get("store-id") != store_id:
            return f"the host state file {state.path(_host_name(kind, vmid))} is of another store"
        snap = doc["snapshot"]
        sha = doc["manifest-sha256"]
        bitmap = doc["bitmap-id"]
        reason = doc.get("reason", "")
        if not (isinstance(sha, str | None) and isinstance(bitmap, str | None)):
            raise TypeError("wrong field types")
        return BitmapBase(
            None if snap is None else SnapshotId.parse(str(snap)), sha, bitmap, str(reason)
        )
    except (ValueError, KeyError, TypeError):
        return f"the host state file {state.path(_host_name(kind, vmid))} is damaged"


def commit_base(
    store: Datastore,
    state: HostState,
    kind: str,
    vmid: int,
    base: BitmapBase,
) -> None:
    """Record the snapshot just committed: in the store, then on the host (the proof)."""
    write_base(store.backend, kind, vmid, base, store.key)
    state.write(
        _host_name(kind, vmid),
        {
            "store-id": store.config.store_id,
            "snapshot": None if base.snapshot is None else base.snapshot.path,
            "manifest-sha256": base.manifest_sha256,
            "bitmap-id": base.bitmap_id,
            "reason": base.reason,
        },
    )


def reset_base(store: Datastore, state: HostState, kind: str, vmid: int, reason: str) -> None:
    """No snapshot is a safe base any more: the next backup is full."""
    commit_base(store, state, kind, vmid, BitmapBase(None, None, None, reason))


def new_chain_id(store: Datastore) -> str:
    """A fresh bitmap id: the store's prefix plus a random part for this chain."""
    return f"store-{store.config.store_id.split('-')[0]}-{secrets.token_hex(3)}"


def decide(
    store: Datastore,
    state: HostState,
    guest_type: GuestType,
    vmid: int,
    chunk_size: int,
) -> BaseDecision:
    """The bitmap id and base for the next backup of ``vmid`` (see module doc)."""
    kind = SnapshotId(guest_type, vmid, 0).kind
    host = _read_host(state, kind, vmid, store.config.store_id)
    record = read_base(store.backend, kind, vmid, store.key)

    def full(level: str, why: str) -> BaseDecision:
        return BaseDecision(None, None, level, f"full backup without a bitmap: {why}")

    if host is None:
        if record is None and not store.list_snapshots(guest_type, vmid):
            chain = new_chain_id(store)
            return BaseDecision(
                chain, None, "info", f"first backup of {vmid} here: starting bitmap {chain}"
            )
        return full(
            "warn",
            f"this host holds no record of the last backup of {vmid} "
            f"({state.path(_host_name(kind, vmid))} is missing), so no base can be proven",
        )
    if isinstance(host, str):
        return full("warn", host)
    if host.snapshot is None:
        return full("info", host.reason or "no usable base")
    if isinstance(record, str):
        return full("warn", record)
    if record is None:
        return full("warn", "the store's bitmap record is missing (storage rolled back?)")
    if record.snapshot != host.snapshot or record.manifest_sha256 != host.manifest_sha256:
        return full(
            "warn",
            f"the store's bitmap record names {record.snapshot or 'no snapshot'}, this host "
            f"committed {host.snapshot} last (record edited, storage rolled back, "
            "or written by another host)",
        )
    try:
        snap = store.open_snapshot(host.snapshot)
    except VolumeNotFoundError:
        return full(
            "warn", f"the previous backup {host.snapshot} is gone (removed or storage rolled back)"
        )
    except IntegrityError as exc:
        return full("warn", f"the previous backup {host.snapshot} is unreadable ({exc})")
    if snap.manifest_sha256 != host.manifest_sha256:
        return full(
            "warn",
            f"the manifest of the previous backup {host.snapshot} is not the one this host "
            "committed (storage rolled back or edited)",
        )
    if snap.manifest.chunk_size != chunk_size:
        return full("warn", f"the previous backup {host.snapshot} uses another chunk size")
    if host.bitmap_id is None:
        chain = new_chain_id(store)
        return BaseDecision(
            chain, None, "info", f"the previous backup used no bitmap: starting bitmap {chain}"
        )
    return BaseDecision(
        host.bitmap_id,
        host.snapshot,
        "info",
        f"incremental backup on top of {host.snapshot}",
        host.manifest_sha256,
    )
