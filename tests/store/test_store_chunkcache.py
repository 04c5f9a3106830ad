"""The sorted-file chunk index cache: same answers as the store, persistent, fast."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pvebackup.store.backends.memory import MemoryBackend
from pvebackup.store.chunkcache import SortedChunkIndex, write_sorted_index
from pvebackup.store.chunkindex import ChunkLocation
from pvebackup.store.datastore import Datastore

CS = 64 * 1024


def test_cache_answers_like_the_index_objects_and_survives_reopen(tmp_path: Path) -> None:
    backend = MemoryBackend()
    writer = Datastore.create(backend, chunk_size=CS, pack_size=1 << 20)
    digests = [writer.insert_chunk(os.urandom(CS)).digest for _ in range(30)]
    writer.flush()
    cache = SortedChunkIndex(tmp_path / "cache")
    reader = Datastore.open(backend, index=cache)
    assert reader.refresh_index() == 1
    expected = writer.index_entries()
    assert {d: reader.locate_chunk(d) for d in digests} == expected
    cache.close()
    again = SortedChunkIndex(tmp_path / "cache")
    assert {d: again.lookup(d) for d in digests} == expected
    assert Datastore.open(backend, index=again).refresh_index() == 0  # nothing new to read
    assert again.lookup(bytes(32)) is None


def test_merge_keeps_old_and_new_entries_sorted(tmp_path: Path) -> None:
    cache = SortedChunkIndex(tmp_path)
    first = {os.urandom(32): ChunkLocation(b"a" * 32, 16, 100, 200) for _ in range(500)}
    cache.add(first.items())
    cache.save()
    second = {os.urandom(32): ChunkLocation(b"b" * 32, 116, 50, 60) for _ in range(500)}
    cache.add(second.items())
    cache.add([(next(iter(first)), ChunkLocation(b"c" * 32, 0, 32, 1))])  # known: kept
    cache.save()
    assert len(cache) == 1000
    assert all(cache.lookup(d) == loc for d, loc in {**first, **second}.items())


@pytest.mark.serial
def test_lookups_on_a_synthetic_index_are_fast(tmp_path: Path) -> None:
    # The big one (10 million chunks, RSS) is bench/chunkindex.py; this guards the
    # lookup path against an accidental linear scan.
    digests = sorted(os.urandom(32) for _ in range(200_000))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "packs").write_bytes(bytes(32))
    write_sorted_index(
        tmp_path / "cache" / "chunks.idx", ((d, 0, 16, 100, 100) for d in digests)
    )
    sample = digests[::20]
    cache = SortedChunkIndex(tmp_path / "cache")
    assert len(cache) == 200_000
    t = time.perf_counter()
    for _ in range(5):
        assert all(cache.lookup(d) is not None for d in sample)
        assert cache.lookup(os.urandom(32)) is None
    assert 5 * len(sample) / (time.perf_counter() - t) > 20_000


def test_a_digest_spanning_two_records_is_no_hit(tmp_path: Path) -> None:
    # The bucket is searched with bytes.find: bytes that straddle a record
    # boundary (one record's tail, the next one's digest) must not count.
    prefix = b"\x01\x02"
    first = prefix + bytes(30)
    second = prefix + b"\x55" * 30
    tail = (0x0201).to_bytes(4, "little") + bytes(12)  # pack 0x0201, offset, length, size 0
    forged = tail + second[:16]
    (tmp_path / "packs").write_bytes(bytes(32) * 0x0202)
    write_sorted_index(
        tmp_path / "chunks.idx", [(first, 0x0201, 0, 0, 0), (second, 0, 16, 100, 100)]
    )
    cache = SortedChunkIndex(tmp_path)
    assert forged[:2] == prefix and cache.lookup(second) is not None
    assert cache.lookup(forged) is None


def test_a_cut_cache_file_is_started_over(tmp_path: Path) -> None:
    cache = SortedChunkIndex(tmp_path)
    cache.add([(os.urandom(32), ChunkLocation(b"a" * 32, 16, 100, 200)) for _ in range(50)])
    cache.mark_ingested("index/x")
    cache.close()
    with open(tmp_path / "chunks.idx", "r+b") as f:  # a crash or a full disk cut it
        f.truncate(os.path.getsize(tmp_path / "chunks.idx") - 10)
    again = SortedChunkIndex(tmp_path)
    assert len(again) == 0 and again.ingested() == set()  # everything is read again


def test_a_read_missing_from_a_cache_that_claims_the_object_reads_it_again(
    tmp_path: Path,
) -> None:
    backend = MemoryBackend()
    writer = Datastore.create(backend, chunk_size=CS)
    digest = writer.insert_chunk(os.urandom(CS)).digest
    writer.flush()
    cache = SortedChunkIndex(tmp_path)
    Datastore.open(backend, index=cache).refresh_index()
    cache.close()
    # another process saved its own cache over ours: the entries are gone, the
    # list of ingested index objects still names the object
    (tmp_path / "chunks.idx").unlink()
    stale = SortedChunkIndex(tmp_path)
    assert stale.ingested() and stale.lookup(digest) is None
    assert len(Datastore.open(backend, index=stale).read_chunk(digest)) == CS
