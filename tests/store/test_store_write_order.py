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

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self.mem.get_range(key, offset, length)

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


def _index_objects_name_only_stored_packs(store: Datastore) -> None:
    # The chunk index may never promise a chunk whose pack a crash lost: a later
    # backup would dedup against it and commit a snapshot missing data.
    packs = set(store.pack_names())
    for digest, loc in store.index_entries().items():
        assert loc.pack in packs, f"index names lost pack {loc.pack.hex()}"
        store.read_chunk(digest)


def _visible_snapshots_are_whole(store: Datastore) -> int:
    _index_objects_name_only_stored_packs(store)
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


def test_ops_order_is_files_pack_index_object_sync_manifest() -> None:
    backend = CrashingBackend()
    Datastore.create(backend, chunk_size=CHUNK)
    backend.ops.clear()
    _back_up(Datastore.open(backend), 1000)
    manifest = next(i for i, op in enumerate(backend.ops) if op.endswith("/manifest.json"))
    assert backend.ops[manifest - 1] == "sync"
    assert all(op.startswith("put ") for op in backend.ops[: manifest - 1])
    kinds = [op.split()[1].split("/")[0] for op in backend.ops[: manifest - 1]]
    # the writer's session is registered before its first chunk (garbage collection
    # relies on it) and heartbeats before the manifest
    assert kinds[0] == "sessions" and kinds.count("sessions") == 2
    assert [k for k in kinds if k != "sessions"] == ["snapshots", "snapshots", "packs", "index"]


def test_packs_written_mid_backup_are_durable_before_their_index_object() -> None:
    # A small pack target: the writer fills several packs before its commit.
    backend = CrashingBackend()
    Datastore.create(backend, chunk_size=CHUNK, pack_size=1024 * 1024)
    store = Datastore.open(backend)
    writer = store.new_snapshot(SnapshotId(GuestType.QEMU, 100, 1000), chunk_size=CHUNK)
    with writer.index_writer("drive-scsi0", 40 * CHUNK) as index:
        for i in range(40):
            index.set(i, store.insert_chunk(os.urandom(CHUNK)).digest)
    writer.add_file("guest.conf", b"memory: 512\n")
    store.wait_packs()  # full packs are put by the pack writer thread
    packs_before_commit = [op for op in backend.ops if op.startswith("put packs/")]
    assert len(packs_before_commit) == 2  # 16 random 64 KiB chunks fill 1 MiB
    # nothing was synced yet, but the packs would survive a crash
    assert not any(k.startswith("packs/") for k in backend.unsynced)
    assert not any(op.startswith("put index/") for op in backend.ops)
    writer.commit()
    assert _visible_snapshots_are_whole(Datastore.open(backend)) == 1
    assert len(Datastore.open(backend).pack_names()) == 3
