"""Datastore: keys checked first, chunk inserts and verified reads, snapshots."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvebackup.api.errors import (
    CorruptChunkError,
    CorruptIndexError,
    MissingKeyError,
    ObjectNotFoundError,
    SnapshotExistsError,
    StateError,
    UnsupportedError,
    VolumeNotFoundError,
    WrongKeyError,
)
from pvebackup.api.types import GuestType
from pvebackup.store.backends.base import ObjectInfo
from pvebackup.store.backends.local import LocalBackend
from pvebackup.store.backends.memory import MemoryBackend
from pvebackup.store.chunkindex import ChunkLocation
from pvebackup.store.datastore import CONFIG_KEY, Datastore
from pvebackup.store.formats import ZERO_DIGEST
from pvebackup.store.keys import EncryptionKey
from pvebackup.store.pack import pack_key
from pvebackup.store.snapshot import MANIFEST_NAME, SnapshotId

CS = 64 * 1024
SID = SnapshotId(GuestType.QEMU, 100, 1795685400)


class SpyBackend(MemoryBackend):
    """Records every key read, to prove what was (not) touched."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def get(self, key: str) -> bytes:
        self.reads.append(key)
        return super().get(key)

    def stat(self, key: str) -> ObjectInfo:
        self.reads.append(key)
        return super().stat(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        self.reads.append(f"list:{prefix}")
        return super().list(prefix)


def _chunk(i: int, size: int = CS) -> bytes:
    return (f"chunk {i} ".encode() * size)[:size]


@pytest.fixture(params=[False, True], ids=["plain", "encrypted"])
def store(request: pytest.FixtureRequest, key: EncryptionKey) -> Datastore:
    return Datastore.create(MemoryBackend(), key=key if request.param else None, chunk_size=CS)


def test_create_refuses_existing_store() -> None:
    backend = MemoryBackend()
    Datastore.create(backend)
    with pytest.raises(StateError):
        Datastore.create(backend)
    with pytest.raises(ObjectNotFoundError, match="no store"):
        Datastore.open(MemoryBackend())


def test_open_checks_key_before_touching_data(key: EncryptionKey, other_key: EncryptionKey) -> None:
    backend = SpyBackend()
    ds = Datastore.create(backend, key=key, chunk_size=CS)
    ds.insert_chunk(_chunk(1))
    backend.reads.clear()
    with pytest.raises(MissingKeyError, match=key.fingerprint):
        Datastore.open(backend)
    with pytest.raises(WrongKeyError, match=other_key.fingerprint):
        Datastore.open(backend, key=other_key)
    assert set(backend.reads) == {CONFIG_KEY}  # stat and get of the config only
    assert Datastore.open(backend, key=key).encrypted


def test_key_for_plain_store_is_refused(key: EncryptionKey) -> None:
    backend = MemoryBackend()
    Datastore.create(backend)
    with pytest.raises(WrongKeyError, match="not encrypted"):
        Datastore.open(backend, key=key)


def test_corrupt_config() -> None:
    backend = MemoryBackend()
    backend.put(CONFIG_KEY, b'{"format": "pvebackup-store", "version": 2}', overwrite=False)
    with pytest.raises(CorruptIndexError, match="config.json"):
        Datastore.open(backend)


def test_format_1_store_is_refused_clearly() -> None:
    backend = MemoryBackend()
    backend.put(CONFIG_KEY, b'{"format": "pvebackup-store", "version": 1}', overwrite=False)
    with pytest.raises(UnsupportedError, match="format 1.*create a new store"):
        Datastore.open(backend)


def test_unknown_algorithm_ids_are_refused() -> None:
    backend = MemoryBackend()
    Datastore.create(backend)
    cfg = backend.get(CONFIG_KEY).replace(b'"zstd"', b'"lz4"')
    backend.put(CONFIG_KEY, cfg, overwrite=True)
    with pytest.raises(UnsupportedError, match="lz4"):
        Datastore.open(backend)


def test_insert_read_and_idempotence(store: Datastore) -> None:
    r1 = store.insert_chunk(_chunk(1))
    assert r1.is_new and 0 < r1.stored_size < CS
    r2 = store.insert_chunk(_chunk(1))
    assert (r2.digest, r2.stored_size, r2.is_new) == (r1.digest, r1.stored_size, False)
    assert store.has_chunk(r1.digest)
    assert store.read_chunk(r1.digest, CS) == _chunk(1)
    assert list(store.backend.list("packs/")) == []  # still in the open pack
    store.flush()
    (pack,) = store.pack_names()
    assert store.locate_chunk(r1.digest) == ChunkLocation(pack, 16, r1.stored_size, CS)
    # another session (process) finds it through the index object
    other = Datastore.open(store.backend, key=store.key)
    assert other.read_chunk(r1.digest, CS) == _chunk(1)
    assert not other.insert_chunk(_chunk(1)).is_new


def test_prepare_then_store_separately(store: Datastore) -> None:
    prepared = store.prepare_chunk(_chunk(2))
    assert not store.has_chunk(prepared.digest)
    assert store.store_prepared(prepared).is_new
    assert not store.store_prepared(prepared).is_new
    assert store.read_chunk(prepared.digest) == _chunk(2)


def test_zero_chunks_are_not_stored(store: Datastore) -> None:
    r = store.insert_chunk(bytes(CS))
    assert (r.digest, r.stored_size, r.is_new) == (ZERO_DIGEST, 0, False)
    store.flush()
    assert list(store.backend.list("packs/")) == []
    assert store.has_chunk(ZERO_DIGEST)
    assert store.read_chunk(ZERO_DIGEST, 100) == bytes(100)
    with pytest.raises(ValueError):
        store.read_chunk(ZERO_DIGEST)


def test_encrypted_chunk_names_reveal_nothing(key: EncryptionKey) -> None:
    import hashlib

    ds = Datastore.create(MemoryBackend(), key=key)
    r = ds.insert_chunk(b"known plaintext" * 100)
    assert r.digest != hashlib.sha256(b"known plaintext" * 100).digest()


def test_corrupt_missing_and_short_chunks(store: Datastore) -> None:
    r = store.insert_chunk(_chunk(3))
    store.flush()
    (name,) = store.pack_names()
    k = pack_key(name)
    pack = bytearray(store.backend.get(k))
    pack[16 + r.stored_size - 1] ^= 0x40  # the chunk's last byte, in place
    store.backend.put(k, bytes(pack), overwrite=True)
    with pytest.raises(CorruptChunkError, match=r.digest.hex()):
        store.read_chunk(r.digest)
    store.backend.put(k, bytes(pack[: 16 + r.stored_size - 1]), overwrite=True)
    with pytest.raises(CorruptChunkError, match="cut short"):
        store.read_chunk(r.digest)
    store.backend.delete(k)
    with pytest.raises(CorruptChunkError, match="pack .* is missing"):
        store.read_chunk(r.digest)
    with pytest.raises(CorruptChunkError, match="missing"):
        store.read_chunk(store.prepare_chunk(_chunk(5)).digest)
    with pytest.raises(CorruptChunkError, match="index expects"):
        store.insert_chunk(_chunk(6))
        store.read_chunk(store.prepare_chunk(_chunk(6)).digest, CS - 1)


def test_snapshot_write_read_list_remove(store: Datastore) -> None:
    digests = [store.insert_chunk(_chunk(i)).digest for i in range(3)]
    parent = SnapshotId(GuestType.QEMU, 100, SID.backup_time - 3600)
    with store.new_snapshot(SID, bitmap_id="pvebackup-abc", parent=parent) as w:
        with w.index_writer("drive-scsi0", 3 * CS + 10) as iw:
            for i, d in enumerate(digests):
                iw.set(i, d)
        w.add_file("qemu-server.conf", b"memory: 2048\n")
        w.add_file("task.log", b"INFO: done\n")
        w.metadata["new-bytes"] = "123"
    snap = store.open_snapshot(SID)
    m = snap.manifest
    assert (m.bitmap_id, m.parent, m.chunk_size, m.encrypted) == (
        "pvebackup-abc",
        parent,
        CS,
        store.encrypted,
    )
    assert m.metadata == {"new-bytes": "123"}
    assert m.devices["drive-scsi0"].size == 3 * CS + 10
    assert snap.file_names() == ["qemu-server.conf", "task.log"]
    assert snap.read_file("qemu-server.conf") == b"memory: 2048\n"
    idx = snap.open_index("drive-scsi0")
    assert [idx.digest(i) for i in range(3)] == digests and idx.is_zero(3)
    assert store.list_snapshots() == [SID]
    assert store.list_snapshots(GuestType.QEMU, 100) == [SID]
    assert store.list_snapshots(GuestType.LXC) == []
    assert store.list_snapshots(GuestType.QEMU, 101) == []
    with pytest.raises(ObjectNotFoundError):
        snap.read_file("nope")
    store.remove_snapshot(SID)
    assert store.list_snapshots() == []
    assert list(store.backend.list("snapshots/")) == []
    assert store.has_chunk(digests[0])  # chunks wait for garbage collection
    with pytest.raises(VolumeNotFoundError):
        store.remove_snapshot(SID)
    with pytest.raises(VolumeNotFoundError):
        store.open_snapshot(SID)


def test_index_of_a_sparse_disk_costs_little(store: Datastore) -> None:
    """A snapshot's size follows its data, not the disk's size."""
    digest = store.insert_chunk(_chunk(1)).digest
    size = 64 * 1024**3  # 64 GiB: a plain index would hold 8 MiB of zero digests
    with store.new_snapshot(SID) as w, w.index_writer("drive-scsi0", size) as iw:
        iw.set(12345, digest)
    stored = store.open_snapshot(SID).manifest.files["drive-scsi0.fidx"].size
    assert stored < 64 * 1024
    idx = store.open_snapshot(SID).open_index("drive-scsi0")
    assert idx.size == size and idx.digest(12345) == digest and idx.is_zero(12346)


def test_config_files_are_encrypted_in_encrypted_store(key: EncryptionKey) -> None:
    ds = Datastore.create(MemoryBackend(), key=key, chunk_size=CS)
    with ds.new_snapshot(SID) as w:
        w.add_file("qemu-server.conf", b"secret-password-in-config")
    raw = ds.backend.get(SID.prefix + "qemu-server.conf")
    assert b"secret-password" not in raw
    assert ds.open_snapshot(SID).read_file("qemu-server.conf") == b"secret-password-in-config"


def test_failed_backup_leaves_no_snapshot(store: Datastore) -> None:
    with pytest.raises(RuntimeError):
        with store.new_snapshot(SID) as w:
            with w.index_writer("drive-scsi0", CS) as iw:
                iw.set(0, store.insert_chunk(_chunk(1)).digest)
            w.add_file("task.log", b"x")
            raise RuntimeError("guest backup failed")
    assert store.list_snapshots() == []
    assert list(store.backend.list("snapshots/")) == []


def test_snapshot_without_manifest_is_invisible_and_cleaned(store: Datastore) -> None:
    w = store.new_snapshot(SID)
    w.add_file("task.log", b"crashed before the manifest")
    # (no commit: as if the process died here)
    assert store.list_snapshots() == []
    assert not store.has_snapshot(SID)
    assert store.cleanup_incomplete(min_age=3600) == []  # may still be running
    assert store.cleanup_incomplete(min_age=-1) == [SID.prefix]
    assert list(store.backend.list("snapshots/")) == []


def test_existing_snapshot_is_not_overwritten(store: Datastore) -> None:
    with store.new_snapshot(SID) as w:
        w.add_file("task.log", b"first")
    with pytest.raises(SnapshotExistsError):
        store.new_snapshot(SID)
    assert store.open_snapshot(SID).read_file("task.log") == b"first"


def test_damaged_snapshot_files_are_detected(store: Datastore) -> None:
    with store.new_snapshot(SID) as w:
        with w.index_writer("drive-scsi0", CS):
            pass
        w.add_file("task.log", b"log")
    store.backend.put(SID.prefix + "task.log", b"tampered", overwrite=True)
    snap = store.open_snapshot(SID)
    with pytest.raises(CorruptIndexError, match="task.log"):
        snap.read_file("task.log")
    store.backend.delete(SID.prefix + "drive-scsi0.fidx")
    with pytest.raises(CorruptIndexError, match="missing"):
        snap.open_index("drive-scsi0")
    m = store.backend.get(SID.prefix + MANIFEST_NAME)
    store.backend.put(SID.prefix + MANIFEST_NAME, m.replace(b"65536", b"65537"), overwrite=True)
    with pytest.raises(CorruptIndexError):
        store.open_snapshot(SID)


def test_two_threads_insert_concurrently(store: Datastore) -> None:
    errors: list[BaseException] = []
    results: list[bool] = []

    def work() -> None:
        try:
            for i in range(40):
                r = store.insert_chunk(_chunk(i % 20))
                results.append(r.is_new)
                assert store.read_chunk(r.digest) == _chunk(i % 20)
        except BaseException as exc:  # noqa: B036 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results.count(True) == 20


_WRITER = textwrap.dedent(
    """
    import sys
    from pvebackup.api.types import GuestType
    from pvebackup.store.backends.local import LocalBackend
    from pvebackup.store.datastore import Datastore
    from pvebackup.store.snapshot import SnapshotId

    root, vmid = sys.argv[1], int(sys.argv[2])
    ds = Datastore.open(LocalBackend(root))
    sid = SnapshotId(GuestType.QEMU, vmid, 1795685400)
    with ds.new_snapshot(sid) as w:
        with w.index_writer("drive-scsi0", 64 * 65536) as iw:
            for i in range(64):
                # chunks 0..31 are shared by both guests, the rest are their own
                tag = i if i < 32 else vmid * 1000 + i
                data = (f"chunk {tag} ".encode() * 65536)[:65536]
                iw.set(i, ds.insert_chunk(data).digest)
    print("ok")
    """
)


@pytest.mark.e2e
def test_two_writer_processes_into_one_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    Datastore.create(LocalBackend(root), chunk_size=CS)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(root), str(vmid)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for vmid in (100, 101)
    ]
    deadline = time.monotonic() + 60
    for p in procs:
        out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        assert p.returncode == 0, err.decode()
        assert out.strip() == b"ok"
    ds = Datastore.open(LocalBackend(root))
    sids = ds.list_snapshots()
    assert [s.vmid for s in sids] == [100, 101]
    # each writer packed its own new chunks; the shared ones at most twice
    assert 32 + 2 * 32 <= len(ds.rebuild_index_from_packs()) <= 2 * 64
    assert len(ds.index_entries()) == len(ds.rebuild_index_from_packs())
    for sid in sids:
        idx = ds.open_snapshot(sid).open_index("drive-scsi0")
        for i in range(len(idx)):
            tag = i if i < 32 else sid.vmid * 1000 + i
            assert ds.read_chunk(idx.digest(i), CS) == (f"chunk {tag} ".encode() * CS)[:CS]


def test_incremental_index_from_previous_snapshot(store: Datastore) -> None:
    first = [store.insert_chunk(_chunk(i)).digest for i in range(4)]
    with store.new_snapshot(SID) as w:
        with w.index_writer("drive-scsi0", 4 * CS) as iw:
            for i, d in enumerate(first):
                iw.set(i, d)
    prev = store.open_snapshot(SID).open_index("drive-scsi0")
    later = SnapshotId(GuestType.QEMU, 100, SID.backup_time + 60)
    with store.new_snapshot(later, parent=SID) as w:
        with w.index_writer_from("drive-scsi0", prev) as iw:
            iw.set(2, store.insert_chunk(_chunk(99)).digest)
    idx = store.open_snapshot(later).open_index("drive-scsi0")
    assert [store.read_chunk(idx.digest(i), CS) for i in range(4)] == [
        _chunk(0),
        _chunk(1),
        _chunk(99),
        _chunk(3),
    ]
    assert store.list_snapshots(GuestType.QEMU, 100) == [SID, later]


def test_listing_ignores_foreign_keys(store: Datastore) -> None:
    store.backend.put("snapshots/vm/abc/nonsense/manifest.json", b"{}", overwrite=False)
    store.backend.put("snapshots/README", b"hi", overwrite=False)
    with store.new_snapshot(SID) as w:
        w.add_file("task.log", b"x")
    assert store.list_snapshots() == [SID]
