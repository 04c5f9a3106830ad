"""The persistent chunk index cache: one owner per directory, keyed by store id."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pvebackup.store import chunkcache
from pvebackup.store.backends.local import LocalBackend
from pvebackup.store.backends.memory import MemoryBackend
from pvebackup.store.chunkcache import SortedChunkIndex, open_chunk_cache
from pvebackup.store.chunkindex import ChunkLocation, MemoryChunkIndex
from pvebackup.store.datastore import Datastore

CS = 64 * 1024


def test_a_second_owner_gets_a_memory_cache_until_the_first_lets_go(tmp_path: Path) -> None:
    first = open_chunk_cache(tmp_path / "c")
    assert isinstance(first, SortedChunkIndex)
    first.add([(b"\1" * 32, ChunkLocation(b"p" * 32, 0, 40, 100))])
    second = open_chunk_cache(tmp_path / "c")
    # Two savers in one directory would replace each other's files.
    assert isinstance(second, MemoryChunkIndex)
    first.close()
    third = open_chunk_cache(tmp_path / "c")
    assert isinstance(third, SortedChunkIndex)
    assert third.lookup(b"\1" * 32) == ChunkLocation(b"p" * 32, 0, 40, 100)
    third.close()


def test_another_process_holding_the_cache_does_not_stop_a_backup(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    store = Datastore.create(LocalBackend(tmp_path / "s"), chunk_size=CS, cache_dir=cache_dir)
    store.close_cache()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path\n"
         "from pvebackup.store.chunkcache import open_chunk_cache, SortedChunkIndex\n"
         "c = open_chunk_cache(Path(sys.argv[1]))\n"
         "print(isinstance(c, SortedChunkIndex), flush=True); time.sleep(60)",
         str(cache_dir / store.config.store_id)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "True"
        other = Datastore.open(LocalBackend(tmp_path / "s"), cache_dir=cache_dir)
        data = os.urandom(CS)
        digest = other.insert_chunk(data).digest
        other.close()
        assert other.read_chunk(digest, CS) == data
        # it never wrote into the cache the other process owns
        assert not (cache_dir / store.config.store_id / "chunks.idx").exists()
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()


def test_the_cache_persists_across_opens_so_no_index_object_is_read_again(
    tmp_path: Path,
) -> None:
    backend = MemoryBackend()
    cache_dir = tmp_path / "cache"
    store = Datastore.create(backend, chunk_size=CS, cache_dir=cache_dir)
    digests = [store.insert_chunk(os.urandom(CS)).digest for _ in range(5)]
    store.close()
    store.close_cache()
    again = Datastore.open(backend, cache_dir=cache_dir)
    assert again.refresh_index() == 0  # everything came from the saved cache
    assert all(again.locate_chunk(d) is not None for d in digests)
    again.close_cache()


def test_a_store_made_anew_at_the_same_place_never_meets_the_old_cache(
    tmp_path: Path,
) -> None:
    # The old store's cache says chunk X is stored; the new store (new id) must
    # not believe it, or X would be skipped and be missing from the new store.
    root = tmp_path / "s"
    cache_dir = tmp_path / "cache"
    data = os.urandom(CS)
    old = Datastore.create(LocalBackend(root), chunk_size=CS, cache_dir=cache_dir)
    old.insert_chunk(data)
    old.close()
    old.close_cache()
    for f in sorted(root.rglob("*"), reverse=True):
        f.rmdir() if f.is_dir() else f.unlink()
    new = Datastore.create(LocalBackend(root), chunk_size=CS, cache_dir=cache_dir)
    result = new.insert_chunk(data)
    assert result.is_new
    new.close()
    assert new.read_chunk(result.digest, CS) == data
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted(
        [old.config.store_id, new.config.store_id]
    )
    new.close_cache()


def test_a_save_cut_short_never_leaves_entries_without_their_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Entries whose index object key is not saved escape the check for index
    # objects GC compacted away: a later backup could reuse a deleted chunk.
    cache = SortedChunkIndex(tmp_path / "c")
    cache.mark_ingested("index/" + "00" * 32)
    cache.save()
    digest = b"\7" * 32
    cache.add([(digest, ChunkLocation(b"p" * 32, 0, 40, 100))])
    cache.mark_ingested("index/" + "11" * 32)
    real = chunkcache.os.replace

    def crash_at_second(src: object, dst: object) -> None:
        if str(dst).endswith("ingested") or str(dst).endswith("chunks.idx"):
            if not hasattr(crash_at_second, "done"):
                crash_at_second.done = True  # type: ignore[attr-defined]
                real(src, dst)  # type: ignore[arg-type]
                return
            raise OSError("power cut")
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(chunkcache.os, "replace", crash_at_second)
    with pytest.raises(OSError):
        cache.save()
    monkeypatch.undo()
    reopened = SortedChunkIndex(tmp_path / "c")
    assert reopened.lookup(digest) is None or "index/" + "11" * 32 in reopened.ingested()


def test_a_cache_dropped_unclosed_lets_its_directory_go(tmp_path: Path) -> None:
    # e.g. a provider used for a restore only, in a long-lived process
    store = Datastore.create(MemoryBackend(), chunk_size=CS, cache_dir=tmp_path)
    store.insert_chunk(os.urandom(CS))
    store.close()  # saved: the index file is open now, and the lock still held
    cache_dir = tmp_path / store.config.store_id
    fds = len(os.listdir("/proc/self/fd"))
    del store
    assert len(os.listdir("/proc/self/fd")) == fds - 2  # the index file and the lock
    again = open_chunk_cache(cache_dir)
    assert isinstance(again, SortedChunkIndex)
    again.close()
