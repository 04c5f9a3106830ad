"""Open the image a restore serves: the store, the key, the snapshot's index.

Used inside the nbdkit plugin process (:mod:`.nbdkit_plugin`), and by tests
directly. The backend is chosen by name (:func:`pvebackup.store.backends.make_backend`).
"""

from __future__ import annotations

from pvebackup.providers.store.image import SnapshotImage
from pvebackup.store.backends import make_backend
from pvebackup.store.datastore import Datastore
from pvebackup.store.keys import EncryptionKey
from pvebackup.store.snapshot import SnapshotId

__all__ = ["open_image"]


def open_image(
    backend: str, location: str, snapshot: str, device: str, key_material: bytes | None
) -> SnapshotImage:
    """The image of ``device`` in ``snapshot`` (a ``SnapshotId.path``)."""
    key = EncryptionKey(key_material) if key_material else None
    store = Datastore.open(make_backend(backend, location), key=key)
    snap = store.open_snapshot(SnapshotId.parse(snapshot))
    index = snap.open_fixed_index(device)
    return SnapshotImage(store.read_chunk, index, f"snapshot {snapshot} device {device}")
