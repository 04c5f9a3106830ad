"""The disk backup pipeline with the kit's fake NBD source and an in-memory sink."""

from __future__ import annotations

import hashlib

from pvebackup.kit.nbdfake import FakeNbdSource
from pvebackup.kit.nbdsource import merge_ranges
from pvebackup.providers.store.pipeline import (
    QUEUED_CHUNKS,
    READS_IN_FLIGHT,
    ChunkResult,
    run_pipeline,
)
from pvebackup.providers.store.plan import full_jobs, incremental_jobs
from pvebackup.providers.store.progress import BackupStats

CHUNK = 4096
ZERO = bytes(32)


class MemorySink:
    def __init__(self) -> None:
        self.chunks: dict[bytes, bytes] = {}

    def store_chunk(self, data: bytes | bytearray | memoryview) -> ChunkResult:
        data = bytes(data)
        if data == bytes(len(data)):
            return ChunkResult(ZERO, False, 0, zero=True)
        digest = hashlib.sha256(data).digest()
        new = digest not in self.chunks
        self.chunks[digest] = data
        return ChunkResult(digest, new, len(data) if new else 0)

    def load_chunk(self, digest: bytes, size: int) -> bytes:
        return bytes(size) if digest == ZERO else self.chunks[digest]


def backup(source: FakeNbdSource, sink: MemorySink) -> bytes:
    digests: dict[int, bytes] = {}
    jobs = full_jobs(source.size, CHUNK, source.data_extents())
    run_pipeline(
        source, sink, jobs, digests.__setitem__, BackupStats(source.size), zero_digest=ZERO
    )
    return b"".join(sink.load_chunk(digests[i], CHUNK) for i in range(len(digests)))


def test_buffers_are_reused_so_memory_stays_bounded() -> None:
    chunks = 200
    data = b"".join(bytes([i % 251 + 1]) * CHUNK for i in range(chunks))
    source = FakeNbdSource(data)
    assert backup(source, MemorySink()) == data
    assert len(source.buffers) <= READS_IN_FLIGHT + QUEUED_CHUNKS + 1
    assert merge_ranges(source.trims) == [(0, len(data))]


def test_unallocated_parts_of_a_chunk_read_as_zeros_after_buffer_reuse() -> None:
    # every chunk but the last is full of data; the last one is half a hole, so
    # its buffer (reused, holding an earlier chunk) must be zeroed where not read
    data = bytearray(b"\xaa" * CHUNK * 20)
    data[-CHUNK // 2 :] = bytes(CHUNK // 2)
    allocated = [(0, len(data) - CHUNK // 2)]
    source = FakeNbdSource(bytes(data), allocated=allocated)
    assert backup(source, MemorySink()) == bytes(data)


def test_incremental_reads_only_dirty_bytes_and_merges_the_rest() -> None:
    old = b"".join(bytes([i + 1]) * CHUNK for i in range(8))
    sink = MemorySink()
    digests: dict[int, bytes] = {}
    full = FakeNbdSource(old)
    jobs = full_jobs(full.size, CHUNK, full.data_extents())
    run_pipeline(full, sink, jobs, digests.__setitem__, BackupStats(full.size), zero_digest=ZERO)
    new = bytearray(old)
    new[CHUNK + 100 : CHUNK + 200] = b"\xee" * 100  # partly dirty chunk 1
    new[5 * CHUNK : 6 * CHUNK] = b"\xdd" * CHUNK  # whole chunk 5
    # The fake refuses reads outside these, as qemu's export does in reuse mode.
    source = FakeNbdSource(bytes(new), dirty=[(CHUNK + 100, 100), (5 * CHUNK, CHUNK)])
    jobs = incremental_jobs(source.size, CHUNK, source.dirty_extents(), digests.__getitem__)
    stats = BackupStats(source.size)
    run_pipeline(source, sink, jobs, digests.__setitem__, stats, zero_digest=ZERO)
    assert source.reads == [(CHUNK + 100, 100), (5 * CHUNK, CHUNK)]
    assert stats.read == stats.done == CHUNK + 100
    got = b"".join(sink.load_chunk(digests[i], CHUNK) for i in range(8))
    assert got == bytes(new)
    # no stored range holds a whole 64 KiB block: nothing may be discarded
    assert source.trims == []
