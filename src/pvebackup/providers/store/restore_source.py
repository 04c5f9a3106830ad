"""Open the image a restore serves: the store, the key, the snapshot's index.

Used inside the nbdkit plugin process (:mod:`.nbdkit_plugin`), and by tests
directly. The backend is chosen by name (:func:`pvebackup.store.backends.make_backend`).

Read-ahead is sized in bytes, whatever the chunk size: batches of
``BATCH_BYTES`` (one job, usually one ranged read of a pack), a window of
``READ_AHEAD_BYTES`` ahead of each request, and as many jobs at once as the
backend may have requests in flight (``s3-max-requests``; 4 on a local store).
Decoded chunks in memory stay below about ``READ_AHEAD_BYTES + IN_FLIGHT_BYTES
+ jobs * BATCH_BYTES`` (96 MiB with 8 jobs), whatever the image size.
"""

from __future__ import annotations

from typing import Final

from pvebackup.providers.store.image import SnapshotImage
from pvebackup.store.backends import make_backend
from pvebackup.store.datastore import Datastore
from pvebackup.store.keys import EncryptionKey
from pvebackup.store.snapshot import SnapshotId

__all__ = ["BATCH_BYTES", "READ_AHEAD_BYTES", "open_image"]

BATCH_BYTES: Final = 4 << 20
READ_AHEAD_BYTES: Final = 32 << 20
IN_FLIGHT_BYTES: Final = 32 << 20
"""Cached beyond the window: what concurrent NBD requests are reading (qemu-img
convert keeps 8 of up to 2 MiB in flight; the restore server's nbdkit serves 4
at once), with room to spare: too little and read-ahead is evicted unused."""
LOCAL_JOBS: Final = 4


def _jobs(backend: str, location: str) -> int:
    if backend == "s3":
        from pvebackup.store.backends.s3 import S3Config

        return max(1, S3Config.from_location(location).max_requests)
    return LOCAL_JOBS


def open_image(
    backend: str, location: str, snapshot: str, device: str, key_material: bytes | None
) -> SnapshotImage:
    """The image of ``device`` in ``snapshot`` (a ``SnapshotId.path``)."""
    key = EncryptionKey(key_material) if key_material else None
    store = Datastore.open(make_backend(backend, location), key=key)
    snap = store.open_snapshot(SnapshotId.parse(snapshot))
    index = snap.open_fixed_index(device)
    chunk = index.chunk_size
    return SnapshotImage(
        store.read_chunk,
        index,
        f"snapshot {snapshot} device {device}",
        read_ahead=max(16, READ_AHEAD_BYTES // chunk),
        cache_chunks=max(64, (READ_AHEAD_BYTES + IN_FLIGHT_BYTES) // chunk),
        read_chunks=store.read_chunks,
        batch=max(1, BATCH_BYTES // chunk),
        workers=_jobs(backend, location),
    )
