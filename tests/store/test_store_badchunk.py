"""Verify moves a bad chunk aside (never deletes it); the next backup of it heals the store."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pvebackup.api.errors import CorruptChunkError
from pvebackup.api.types import GuestType
from pvebackup.store.backends.local import LocalBackend
from pvebackup.store.badchunk import BAD_RECORDS_PREFIX, read_bad_chunks
from pvebackup.store.blob import ChunkCodec
from pvebackup.store.chunkindex import ChunkLocation
from pvebackup.store.datastore import Datastore
from pvebackup.store.gc import collect_garbage
from pvebackup.store.keys import EncryptionKey
from pvebackup.store.snapshot import SnapshotId
from pvebackup.store.verify import verify_store

CS = 64 * 1024
T0 = 1795685400


def _backup(path: Path, t: int, chunks: list[bytes], key: EncryptionKey | None) -> list[bytes]:
    store = Datastore.open(LocalBackend(path), key=key)
    digests = []
    with store.new_snapshot(SnapshotId(GuestType.QEMU, 100, t), chunk_size=CS) as w:
        with w.index_writer("drive-scsi0", len(chunks) * CS) as iw:
            for i, c in enumerate(chunks):
                r = store.insert_chunk(c)
                digests.append(r.digest)
                iw.set(i, r.digest)
    store.close()
    return digests


def _pack_file(path: Path, loc: ChunkLocation) -> Path:
    return next(p for p in (path / "packs").rglob("*") if p.name == loc.pack.hex())


def _flip(path: Path, loc: ChunkLocation, key: EncryptionKey | None, data: bytes) -> None:
    pack = _pack_file(path, loc)
    raw = bytearray(pack.read_bytes())
    raw[loc.offset + loc.length // 2] ^= 0x40
    pack.write_bytes(bytes(raw))


def _truncate(path: Path, loc: ChunkLocation, key: EncryptionKey | None, data: bytes) -> None:
    pack = _pack_file(path, loc)
    pack.write_bytes(pack.read_bytes()[: loc.offset + loc.length // 3])


def _remove_pack(path: Path, loc: ChunkLocation, key: EncryptionKey | None, data: bytes) -> None:
    _pack_file(path, loc).unlink()


def _wrong_key(path: Path, loc: ChunkLocation, key: EncryptionKey | None, data: bytes) -> None:
    # Hostile input: the same plaintext sealed under another key, same length, in place.
    blob = ChunkCodec(EncryptionKey(bytes(range(7, 39)))).encode(data)
    assert len(blob) == loc.length
    pack = _pack_file(path, loc)
    raw = bytearray(pack.read_bytes())
    raw[loc.offset : loc.offset + loc.length] = blob
    pack.write_bytes(bytes(raw))


Damage = Callable[[Path, ChunkLocation, "EncryptionKey | None", bytes], None]


@pytest.mark.parametrize(
    ("damage", "encrypted", "says"),
    [
        (_flip, False, "digest"),
        (_flip, True, "authentication"),
        (_truncate, False, "cut short"),
        (_remove_pack, False, "missing"),
        (_wrong_key, True, "authentication"),
    ],
    ids=["flipped-byte", "flipped-byte-encrypted", "truncated", "missing-pack", "wrong-key"],
)
def test_bad_chunk_is_named_moved_aside_and_healed_by_the_next_backup(
    tmp_path: Path, damage: Damage, encrypted: bool, says: str
) -> None:
    key = EncryptionKey(bytes(range(32))) if encrypted else None
    path = tmp_path / "st"
    Datastore.create(LocalBackend(path), chunk_size=CS, key=key)
    data = [os.urandom(CS) for _ in range(4)]
    first = _backup(path, T0, data[:3], key)
    second = _backup(path, T0 + 60, data[1:], key)  # shares data[1:3]
    store = Datastore.open(LocalBackend(path), key=key)
    loc = store.locate_chunk(first[1])
    assert loc is not None
    locs = {d: store.locate_chunk(d) for d in set(first + second)}
    same_pack = {d: lc for d, lc in locs.items() if lc is not None and lc.pack == loc.pack}
    damage(path, loc, key, data[1])
    hit = {
        _flip: {first[1]},
        _wrong_key: {first[1]},
        _truncate: {d for d, lc in same_pack.items() if lc.offset >= loc.offset},
        _remove_pack: set(same_pack),
    }[damage]

    report = verify_store(Datastore.open(LocalBackend(path), key=key))
    assert not report.ok
    assert set(report.bad_chunks) == {d.hex() for d in hit}
    assert says in report.bad_chunks[first[1].hex()]
    assert [s.state for s in report.snapshots] == ["failed", "failed"]
    assert first[1].hex() in report.snapshots[0].bad_chunks
    # Moved aside: one record per bad location, the bytes found kept, nothing deleted.
    records = read_bad_chunks(LocalBackend(path), ChunkCodec(key))
    assert {r.digest for r in records} == hit and {r.pack for r in records} == {loc.pack}
    assert sorted(k for ks in report.moved_aside.values() for k in ks) == sorted(
        r.key for r in records
    )
    rec = next(r for r in records if r.digest == first[1])
    kept = (path / rec.data_key).read_bytes()
    assert len(kept) == rec.data_length and says in rec.reason
    if damage is _flip:
        assert kept == _pack_file(path, loc).read_bytes()[loc.offset : loc.offset + loc.length]
    assert any(f"chunk {first[1].hex()}: moved aside: {BAD_RECORDS_PREFIX}" in ln
               for ln in report.lines())

    # A second verify still fails, names the chunk as moved aside, writes no new record.
    again = verify_store(Datastore.open(LocalBackend(path), key=key))
    assert not again.ok and "moved aside" in again.bad_chunks[first[1].hex()]
    assert len(read_bad_chunks(LocalBackend(path), ChunkCodec(key))) == len(records)

    # The next backup producing the same chunks stores them anew: the store heals.
    store = Datastore.open(LocalBackend(path), key=key)
    assert store.insert_chunk(data[1]).is_new
    store.close()
    _backup(path, T0 + 120, data, key)
    healed = verify_store(Datastore.open(LocalBackend(path), key=key))
    assert healed.ok, healed.lines()
    assert [s.state for s in healed.snapshots] == ["ok", "ok", "ok"]
    # The old snapshots restore through the new copy.
    reader = Datastore.open(LocalBackend(path), key=key)
    assert reader.read_chunk(first[1], CS) == data[1]
    # A further backup deduplicates against the healed copy (no third copy).
    again_store = Datastore.open(LocalBackend(path), key=key)
    assert not again_store.insert_chunk(data[1]).is_new
    again_store.close()

    # GC condemns the bad location, then removes it; the bad bytes stay under bad/.
    for _ in range(2):
        collect_garbage(Datastore.open(LocalBackend(path), key=key), margin=0.0)
    assert verify_store(Datastore.open(LocalBackend(path), key=key)).ok
    assert (path / rec.data_key).read_bytes() == kept
    assert len(read_bad_chunks(LocalBackend(path), ChunkCodec(key))) == len(records)


def test_verify_without_move_aside_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "st"
    Datastore.create(LocalBackend(path), chunk_size=CS)
    data = [os.urandom(CS) for _ in range(2)]
    digests = _backup(path, T0, data, None)
    loc = Datastore.open(LocalBackend(path)).locate_chunk(digests[0])
    assert loc is not None
    _flip(path, loc, None, data[0])
    report = verify_store(Datastore.open(LocalBackend(path)), move_aside=False)
    assert not report.ok and not report.moved_aside
    assert not (path / "bad").exists()


def test_a_reader_without_a_healed_copy_names_the_record(tmp_path: Path) -> None:
    path = tmp_path / "st"
    Datastore.create(LocalBackend(path), chunk_size=CS)
    data = [os.urandom(CS)]
    digests = _backup(path, T0, data, None)
    loc = Datastore.open(LocalBackend(path)).locate_chunk(digests[0])
    assert loc is not None
    _flip(path, loc, None, data[0])
    verify_store(Datastore.open(LocalBackend(path)))
    with pytest.raises(CorruptChunkError, match="moved aside as bad.*heals"):
        Datastore.open(LocalBackend(path)).read_chunk(digests[0], CS)


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x00" * 100, b'{"format": "pvebackup-bad-chunk"}', os.urandom(70 * 1024)],
    ids=["empty", "zeros", "plain-json", "too-large"],
)
def test_a_planted_bad_record_is_ignored(tmp_path: Path, garbage: bytes) -> None:
    path = tmp_path / "st"
    Datastore.create(LocalBackend(path), chunk_size=CS)
    data = [os.urandom(CS)]
    digests = _backup(path, T0, data, None)
    # Hostile input: someone with write access plants a record that is not one.
    (path / "bad" / "records").mkdir(parents=True)
    (path / "bad" / "records" / ("0" * 32)).write_bytes(garbage)
    errors: list[str] = []
    assert read_bad_chunks(LocalBackend(path), ChunkCodec(None),
                           on_error=lambda k, e: errors.append(k)) == []
    assert errors == ["bad/records/" + "0" * 32]
    assert verify_store(Datastore.open(LocalBackend(path))).ok
    store = Datastore.open(LocalBackend(path))
    assert not store.insert_chunk(data[0]).is_new and store.read_chunk(digests[0], CS) == data[0]


def test_a_damaged_index_object_fails_verify_and_moves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "st"
    Datastore.create(LocalBackend(path), chunk_size=CS)
    _backup(path, T0, [os.urandom(CS) for _ in range(2)], None)
    # Hostile input: the chunk index object altered (its name no longer its hash).
    (obj,) = (path / "index").iterdir()
    obj.write_bytes(obj.read_bytes() + b"x")
    report = verify_store(Datastore.open(LocalBackend(path)))
    assert not report.ok and not report.moved_aside
    assert any("not moved aside" in n for n in report.notes), report.notes
    assert not (path / "bad").exists()
