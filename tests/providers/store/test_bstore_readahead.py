"""Restore read-ahead: batches of neighbouring chunks become one ranged read."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pvebackup.api.errors import CorruptChunkError, IntegrityError
from pvebackup.providers.store.image import SnapshotImage
from pvebackup.store.backends.base import Backend
from pvebackup.store.backends.local import LocalBackend
from pvebackup.store.backends.memory import MemoryBackend
from pvebackup.store.datastore import Datastore
from pvebackup.store.formats import ZERO_DIGEST
from pvebackup.store.index import FixedIndex, FixedIndexWriter
from pvebackup.store.pack import PACKS_PREFIX

CS = 64 * 1024


class CountingBackend:
    """A backend that counts ranged reads (and the most at once)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.ranges: list[tuple[str, int, int]] = []
        self._lock = threading.Lock()
        self._now = 0
        self.most = 0

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        with self._lock:
            self.ranges.append((key, offset, length))
            self._now += 1
            self.most = max(self.most, self._now)
        try:
            return self.inner.get_range(key, offset, length)
        finally:
            with self._lock:
                self._now -= 1

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)


def _store(backend: Backend, chunks: int, *, zero_every: int = 0) -> tuple[Datastore, FixedIndex]:
    store = Datastore.create(backend, chunk_size=CS)
    writer = FixedIndexWriter(chunks * CS, CS)
    for i in range(chunks):
        if zero_every and i % zero_every == 0:
            writer.set(i, ZERO_DIGEST)
            continue
        data = random.Random(i).randbytes(CS)  # incompressible, distinct
        writer.set(i, store.insert_chunk(data).digest)
    store.flush()
    return store, FixedIndex(writer.to_bytes())


def _read_all(img: SnapshotImage, step: int = 32 * 1024) -> bytes:
    out = bytearray(img.size)
    for off in range(0, img.size, step):
        view = memoryview(out)[off : off + step]
        img.pread(view, off)
    return bytes(out)


def _expected(store: Datastore, index: FixedIndex) -> bytes:
    return b"".join(
        store.read_chunk(index.digest(i), index.extent(i)[1]) for i in range(len(index))
    )


def test_sequential_restore_reads_each_batch_with_one_request() -> None:
    counting = CountingBackend(MemoryBackend())
    store, index = _store(counting, 64, zero_every=5)  # type: ignore[arg-type]
    want = _expected(store, index)
    reopened = Datastore.open(counting)  # type: ignore[arg-type]
    counting.ranges.clear()
    img = SnapshotImage(reopened.read_chunk, index, "s d", read_ahead=32,
                        read_chunks=reopened.read_chunks, batch=16, workers=4)  # fmt: skip
    try:
        assert _read_all(img) == want
    finally:
        img.close()
    packs = [r for r in counting.ranges if r[0].startswith(PACKS_PREFIX)]
    # 64 chunks in batches of 16, all in one pack: the broken per-chunk read-ahead
    # made ~51 requests (one per non-zero chunk); one per batch plus the first
    # demand read is what coalescing gives.
    assert len(packs) <= 64 // 16 + 2, packs
    assert all(length > CS for _, _, length in packs[1:]), packs
    assert counting.most <= 4  # the read-ahead jobs bound the requests in flight


def test_read_ahead_jobs_follow_s3_max_requests() -> None:
    from pvebackup.providers.store.restore_source import LOCAL_JOBS, _jobs
    from pvebackup.store.backends.s3 import S3Config

    location = S3Config("http://127.0.0.1:1", "b", max_requests=13).location()
    assert _jobs("s3", location) == 13
    assert _jobs("local", "/srv/store") == LOCAL_JOBS


def test_read_chunks_isolates_a_damaged_chunk_in_a_span(tmp_path: Path) -> None:
    backend = LocalBackend(str(tmp_path / "store"))
    store, index = _store(backend, 8)
    digests = [(index.digest(i), index.extent(i)[1]) for i in range(8)]
    loc = store.locate_chunk(digests[3][0])
    assert loc is not None
    # Hostile storage: flip a byte inside chunk 3's blob in the pack.
    key = next(iter(backend.list(PACKS_PREFIX)))
    path = tmp_path / "store" / key
    raw = bytearray(path.read_bytes())
    raw[loc.offset + loc.length - 5] ^= 0xFF
    path.write_bytes(bytes(raw))
    fresh = Datastore.open(LocalBackend(str(tmp_path / "store")))
    results = fresh.read_chunks(digests)
    assert isinstance(results[3], CorruptChunkError)
    assert all(isinstance(r, bytes) and len(r) == CS for i, r in enumerate(results) if i != 3)
    img = SnapshotImage(fresh.read_chunk, index, "snapshot vm/1/x device d", read_ahead=8,
                        read_chunks=fresh.read_chunks, batch=8)  # fmt: skip
    try:
        img.pread(bytearray(10), 0)  # prefetches the batch holding chunk 3
        with pytest.raises(CorruptChunkError, match=r"vm/1/x device d: chunk 3 "):
            img.pread(bytearray(10), 3 * CS)
        buf = bytearray(10)
        img.pread(buf, 4 * CS)
        assert bytes(buf) == fresh.read_chunk(*digests[4])[:10]
    finally:
        img.close()


def test_read_chunks_falls_back_when_the_span_comes_back_short() -> None:
    class Short(CountingBackend):
        def get_range(self, key: str, offset: int, length: int) -> bytes:
            data = super().get_range(key, offset, length)
            # A cut connection / truncated pack: the span lacks its last blobs.
            return data[: length // 2] if length > 2 * CS else data

    counting = Short(MemoryBackend())
    store, index = _store(counting, 8)  # type: ignore[arg-type]
    want = [store.read_chunk(index.digest(i), CS) for i in range(8)]
    fresh = Datastore.open(counting)  # type: ignore[arg-type]
    got = fresh.read_chunks([(index.digest(i), CS) for i in range(8)])
    assert got == want


def test_concurrent_readers_get_every_chunk_from_the_read_ahead_once() -> None:
    # qemu-img convert keeps several requests in flight: the slowest reader's
    # chunks must not be evicted by the read-ahead of the fastest (LRU/FIFO did,
    # and every evicted chunk was then fetched again, alone).
    counting = CountingBackend(MemoryBackend())
    store, index = _store(counting, 256)  # type: ignore[arg-type]
    want = _expected(store, index)
    fresh = Datastore.open(counting)  # type: ignore[arg-type]
    alone: list[bytes] = []
    batched: list[int] = []

    def read_chunk(digest: bytes, size: int) -> bytes:
        alone.append(digest)
        return fresh.read_chunk(digest, size)

    def read_chunks(wanted: Sequence[tuple[bytes, int]]) -> list[bytes | IntegrityError]:
        batched.append(len(wanted))
        return fresh.read_chunks(wanted)

    img = SnapshotImage(read_chunk, index, "s d", read_ahead=32, cache_chunks=64,
                        read_chunks=read_chunks, batch=8, workers=4)  # fmt: skip
    out = bytearray(img.size)

    def read(offset: int) -> None:
        img.pread(memoryview(out)[offset : offset + 4 * CS], offset)

    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(read, range(0, img.size, 4 * CS)))
    finally:
        img.close()
    assert bytes(out) == want
    assert alone == []
    assert sum(batched) == 256
