"""``verify_store``: a clean store passes; a flipped byte and a missing pack are named."""

from __future__ import annotations

import os
from pathlib import Path

from pvebackup.api.types import GuestType
from pvebackup.store.backends.local import LocalBackend
from pvebackup.store.datastore import Datastore
from pvebackup.store.keys import EncryptionKey
from pvebackup.store.snapshot import MANIFEST_NAME, SnapshotId
from pvebackup.store.verify import verify_store

CS = 64 * 1024
T0 = 1795685400


def _backup(path: Path, t: int, chunks: list[bytes]) -> list[bytes]:
    store = Datastore.open(LocalBackend(path))
    digests = []
    with store.new_snapshot(SnapshotId(GuestType.QEMU, 100, t), chunk_size=CS) as w:
        with w.index_writer("drive-scsi0", len(chunks) * CS) as iw:
            for i, c in enumerate(chunks):
                digests.append(store.insert_chunk(c).digest)
                iw.set(i, digests[-1])
    store.close()
    return digests


def _store(tmp_path: Path) -> tuple[Path, list[bytes], list[bytes]]:
    path = tmp_path / "st"
    Datastore.create(LocalBackend(path), chunk_size=CS)
    data = [os.urandom(CS) for _ in range(6)]
    first = _backup(path, T0, data[:4])
    second = _backup(path, T0 + 60, data[2:])  # shares data[2:4] with the first
    return path, first, second


def _packs(path: Path) -> list[Path]:
    return sorted(p for p in (path / "packs").rglob("*") if p.is_file())


def test_verify_clean_store_reads_each_shared_chunk_once(tmp_path: Path) -> None:
    path, first, second = _store(tmp_path)
    store = Datastore.open(LocalBackend(path))
    reads: list[bytes] = []
    real = store.read_chunk

    def counting(digest: bytes, size: int | None = None) -> bytes:
        reads.append(digest)
        return real(digest, size)

    store.read_chunk = counting  # type: ignore[method-assign]
    report = verify_store(store)
    assert report.ok and [s.state for s in report.snapshots] == ["ok", "ok"]
    assert report.chunks == 6 and sorted(reads) == sorted(set(first + second))
    assert report.bytes == 6 * CS


def test_verify_names_a_flipped_byte_and_the_snapshots_using_it(tmp_path: Path) -> None:
    path, first, second = _store(tmp_path)
    # Hostile input: one byte flipped inside the blob area of a pack.
    store = Datastore.open(LocalBackend(path))
    loc = store.locate_chunk(first[2])  # shared by both snapshots
    assert loc is not None
    pack = next(p for p in _packs(path) if p.name == loc.pack.hex())
    raw = bytearray(pack.read_bytes())
    raw[loc.offset + loc.length // 2] ^= 0x01
    pack.write_bytes(bytes(raw))
    report = verify_store(Datastore.open(LocalBackend(path)))
    assert not report.ok
    assert list(report.bad_chunks) == [first[2].hex()]
    assert [s.state for s in report.snapshots] == ["failed", "failed"]
    assert all(s.bad_chunks == [first[2].hex()] for s in report.snapshots)
    assert "FAILED" in report.lines()[-1]


def test_verify_names_the_chunks_of_a_missing_pack(tmp_path: Path) -> None:
    path, first, second = _store(tmp_path)
    store = Datastore.open(LocalBackend(path))
    loc = store.locate_chunk(second[-1])  # only the second snapshot uses it
    assert loc is not None
    in_pack = {d for d in set(first + second) if store.locate_chunk(d).pack == loc.pack}  # type: ignore[union-attr]
    next(p for p in _packs(path) if p.name == loc.pack.hex()).unlink()
    report = verify_store(Datastore.open(LocalBackend(path)))
    assert not report.ok and set(report.bad_chunks) == {d.hex() for d in in_pack}
    assert report.snapshots[1].state == "failed"
    assert second[-1].hex() in report.snapshots[1].bad_chunks
    assert all("missing" in e for e in report.bad_chunks.values()), report.bad_chunks


def test_verify_one_snapshot_reads_only_its_chunks(tmp_path: Path) -> None:
    path, first, _second = _store(tmp_path)
    sid = SnapshotId(GuestType.QEMU, 100, T0)
    report = verify_store(Datastore.open(LocalBackend(path)), [sid])
    assert report.ok and report.chunks == len(first)
    assert [s.volname for s in report.snapshots] == [sid.volname]


def test_verify_reports_a_damaged_manifest(tmp_path: Path) -> None:
    path, _first, _second = _store(tmp_path)
    sid = SnapshotId(GuestType.QEMU, 100, T0)
    manifest = path / (sid.prefix + MANIFEST_NAME)
    manifest.write_bytes(manifest.read_bytes()[:-3] + b"xyz")
    report = verify_store(Datastore.open(LocalBackend(path)))
    assert not report.ok
    assert [s.state for s in report.snapshots] == ["failed", "ok"]


def test_verify_names_the_chunks_cut_off_a_truncated_pack(tmp_path: Path) -> None:
    path, first, second = _store(tmp_path)
    store = Datastore.open(LocalBackend(path))
    loc = store.locate_chunk(second[-1])
    assert loc is not None
    pack = next(p for p in _packs(path) if p.name == loc.pack.hex())
    # Hostile input: the pack cut inside the chunk's blob (a short write, a bad copy).
    pack.write_bytes(pack.read_bytes()[: loc.offset + loc.length // 2])
    report = verify_store(Datastore.open(LocalBackend(path)))
    assert not report.ok and second[-1].hex() in report.bad_chunks
    assert "cut short" in report.bad_chunks[second[-1].hex()]
    assert report.snapshots[1].state == "failed"


def test_verify_an_encrypted_store_names_a_flipped_byte(tmp_path: Path, key: EncryptionKey) -> None:
    path = tmp_path / "st"
    Datastore.create(LocalBackend(path), chunk_size=CS, key=key)
    store = Datastore.open(LocalBackend(path), key=key)
    with store.new_snapshot(SnapshotId(GuestType.QEMU, 100, T0), chunk_size=CS) as w:
        with w.index_writer("drive-scsi0", 2 * CS) as iw:
            digests = [store.insert_chunk(os.urandom(CS)).digest for _ in range(2)]
            for i, d in enumerate(digests):
                iw.set(i, d)
    store.close()
    assert verify_store(Datastore.open(LocalBackend(path), key=key)).ok
    loc = Datastore.open(LocalBackend(path), key=key).locate_chunk(digests[1])
    assert loc is not None
    pack = next(p for p in _packs(path) if p.name == loc.pack.hex())
    raw = bytearray(pack.read_bytes())
    raw[loc.offset + loc.length // 2] ^= 0x01  # the ciphertext: its tag fails
    pack.write_bytes(bytes(raw))
    report = verify_store(Datastore.open(LocalBackend(path), key=key))
    assert list(report.bad_chunks) == [digests[1].hex()]
