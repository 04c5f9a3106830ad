"""Crash consistency of a snapshot: nothing visible may point at a lost object.

A backend that plays a power loss: puts made with ``durable=False`` survive only
once a ``sync()`` followed them; a crash drops every unsynced put. The writer is
crashed before each backend operation in turn; after every crash, each snapshot
that is visible (has a manifest) must have all its files and chunks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from pvebackup.api.types import GuestType
from pvebackup.store.backends.base import ObjectInfo
from pvebackup.store.backends.memory import MemoryBackend
from pvebackup.store.datastore import Datastore
from pvebackup.store.formats import ZERO_DIGEST
from pvebackup.store.snapshot import SnapshotId

CHUNK = 65536


class Crash(Exception):
    """The power went out."""


class CrashingBackend:
    """MemoryBackend that loses unsynced puts on ``crash()``; stops at operation N."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.mem = MemoryBackend()
        self.unsynced: set[str] = set()
        self.crash_at = crash_at
        self.ops: list[str] = []

    def _op(self, what: str) -> None:
        if self.crash_at is not None and len(self.ops) == self.crash_at:
            raise Crash(what)
        self.ops.append(what)

    def crash(self) -> None:
        for key in self.unsynced:
            self.mem.delete(key)
        self.unsynced.clear()
        self.crash_at = None

    def get(self, key: str) -> bytes:
        return self.mem.get(key)

    def put(self, key: str, data: bytes, *, overwrite: bool, durable: bool = True) -> bool:
        self._op(f"put {key}")
        written = self.mem.put(key, data, overwrite=overwrite)
        if written and not durable:
            self.unsynced.add(key)
        elif written:
            self.unsynced.discard(key)
        return written

    def exists(self, key: str) -> bool:
        return self.mem.exists(key)

    def stat(self, key: str) -> ObjectInfo:
        return self.mem.stat(key)

    def delete(self, key: str) -> None:
        self.mem.delete(key)
        self.unsynced.discard(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.mem.list(prefix)

    def sync(self) -> None:
        self._op("sync")
        self.unsynced.clear()


def _back_up(store: Datastore, t: int) -> None:
    writer = store.new_snapshot(SnapshotId(GuestType.QEMU, 100, t), chunk_size=CHUNK)
    with writer.index_writer("drive-scsi0", 3 * CHUNK) as index:
        for i in range(3):
            index.set(i, store.insert_chunk(os.urandom(CHUNK)).digest)
    writer.add_file("guest.conf", b"memory: 512\n")
    writer.commit()


def _visible_snapshots_are_whole(store: Datastore) -> int:
    seen = 0
    for sid in store.list_snapshots():
        snap = store.open_snapshot(sid)  # the manifest itself is whole
        snap.read_file("guest.conf")
        for device in snap.devices:
            for digest in snap.open_index(device).digests():
                if digest != ZERO_DIGEST:
                    assert store.has_chunk(digest), f"{sid}: chunk {digest.hex()} lost"
                    store.read_chunk(digest)
        seen += 1
    return seen


def test_a_crash_at_any_point_leaves_no_snapshot_pointing_at_a_lost_object() -> None:
    probe = CrashingBackend()
    Datastore.create(probe, chunk_size=CHUNK)
    setup = len(probe.ops)
    _back_up(Datastore.open(probe), 1000)
    total = len(probe.ops)
    assert probe.ops[-1] == "sync" and probe.ops[-2].endswith("/manifest.json")
    visible = []
    for crash_at in range(setup, total + 1):
        backend = CrashingBackend()
        Datastore.create(backend, chunk_size=CHUNK)
        backend.sync()
        backend.ops.clear()
        backend.crash_at = crash_at - setup
        try:
            _back_up(Datastore.open(backend), 1000)
        except Crash:
            pass
        backend.crash()
        visible.append(_visible_snapshots_are_whole(Datastore.open(backend)))
    # Crashing before the manifest leaves nothing; the last point (after the final
    # sync) leaves the snapshot, whole.
    assert visible[0] == 0 and visible[-1] == 1


def test_ops_order_is_chunks_index_files_sync_manifest() -> None:
    backend = CrashingBackend()
    Datastore.create(backend, chunk_size=CHUNK)
    backend.ops.clear()
    _back_up(Datastore.open(backend), 1000)
    manifest = next(i for i, op in enumerate(backend.ops) if op.endswith("/manifest.json"))
    assert backend.ops[manifest - 1] == "sync"
    assert all(op.startswith("put ") for op in backend.ops[: manifest - 1])
