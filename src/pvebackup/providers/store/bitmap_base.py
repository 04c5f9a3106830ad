"""Which snapshot a guest's dirty bitmap may be applied to (the incremental base).

The host clears a guest's bitmap only after a backup that used it succeeded, so
the bitmap holds every write since then. It may therefore be applied to that
backup's snapshot, or to any newer one (it then holds a superset of the changes),
never to an older one: the writes between that snapshot and the last clear would
be missing, a silent gap. This record names the snapshot that is safe:

- ``backup_end`` (any bitmap mode): the snapshot just committed.
- a failed backup that created a bitmap (``new``): none; the new bitmap started
  after every existing snapshot, so the next backup must be full.
- an incremental backup that found its base unusable: none, with the reason.

``backup_get_mechanism`` asks for the bitmap only when the record names a
snapshot that still exists and fits; otherwise it returns no bitmap and logs why.

Stored per guest under ``provider/backup-store/bitmap-base/<kind>-<vmid>.json`` on
the store's backend (a key prefix the datastore does not use), so it travels with
the store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pvebackup.api.errors import ObjectNotFoundError
from pvebackup.store.backends.base import Backend
from pvebackup.store.snapshot import SnapshotId

__all__ = ["BitmapBase", "read_base", "write_base"]

_PREFIX = "provider/backup-store/bitmap-base/"


@dataclass(frozen=True, slots=True)
class BitmapBase:
    """``snapshot``: the safe base, or ``None`` (next backup full) with ``reason``."""

    snapshot: SnapshotId | None
    reason: str = ""


def _key(kind: str, vmid: int) -> str:
    return f"{_PREFIX}{kind}-{vmid}.json"


def read_base(backend: Backend, kind: str, vmid: int) -> BitmapBase | None:
    """The record of guest ``vmid`` (``kind`` ``vm``/``ct``), ``None`` if there is none.

    An unreadable record counts as "no safe base".
    """
    try:
        raw = backend.get(_key(kind, vmid))
    except ObjectNotFoundError:
        return None
    try:
        doc = json.loads(raw)
        snap = doc["snapshot"]
        return BitmapBase(
            None if snap is None else SnapshotId.parse(str(snap)), str(doc.get("reason", ""))
        )
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return BitmapBase(None, "the record of the last bitmap backup is damaged")


def write_base(backend: Backend, kind: str, vmid: int, base: BitmapBase) -> None:
    """Replace the record of guest ``vmid`` (durably)."""
    doc = {"snapshot": None if base.snapshot is None else base.snapshot.path, "reason": base.reason}
    backend.put(_key(kind, vmid), json.dumps(doc).encode(), overwrite=True)
