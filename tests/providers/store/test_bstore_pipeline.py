"""The disk backup pipeline with an in-memory source and sink."""

from __future__ import annotations

import hashlib

from pvebackup.providers.store.pipeline import (
    QUEUED_CHUNKS,
    READS_IN_FLIGHT,
    ChunkResult,
    run_pipeline,
)
from pvebackup.providers.store.plan import Range, full_jobs, merge_ranges
from pvebackup.providers.store.progress import BackupStats

CHUNK = 4096
ZERO = bytes(32)


class MemorySource:
    """A disk in memory; records the buffers reads went into and the discards."""

    def __init__(self, data: bytes, allocated: list[Range]) -> None:
        self.data = data
        self.size = len(data)
        self.allocated = allocated
        self.buffers: set[int] = set()
        self.trimmed: list[Range] = []
        self._pending: dict[int, tuple[memoryview, int]] = {}

    def data_extents(self) -> list[Range]:
        return self.allocated

    def dirty_extents(self) -> list[Range]:
        raise AssertionError("full backups do not ask for dirty extents")

    def submit_read(self, buf: memoryview, offset: int) -> int:
        self.buffers.add(id(buf.obj))
        cookie = len(self._pending) + len(self.buffers) * 1_000_000 + offset
        self._pending[cookie] = (buf, offset)
        return cookie

    def wait(self, cookie: int) -> None:
        buf, offset = self._pending.pop(cookie)
        buf[:] = self.data[offset : offset + len(buf)]

    def trim(self, offset: int, length: int) -> None:
        self.trimmed.append((offset, length))

    def close(self) -> None:
        pass


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


def backup(source: MemorySource, sink: MemorySink) -> bytes:
    digests: dict[int, bytes] = {}
    jobs = full_jobs(source.size, CHUNK, source.data_extents())
    run_pipeline(
        source, sink, jobs, digests.__setitem__, BackupStats(source.size), zero_digest=ZERO
    )
    return b"".join(sink.load_chunk(digests[i], CHUNK) for i in range(len(digests)))


def test_buffers_are_reused_so_memory_stays_bounded() -> None:
    chunks = 200
    data = b"".join(bytes([i % 251 + 1]) * CHUNK for i in range(chunks))
    source = MemorySource(data, [(0, len(data))])
    assert backup(source, MemorySink()) == data
    assert len(source.buffers) <= READS_IN_FLIGHT + QUEUED_CHUNKS + 1
    assert merge_ranges(source.trimmed) == [(0, len(data))]


def test_unallocated_parts_of_a_chunk_read_as_zeros_after_buffer_reuse() -> None:
    # every chunk but the last is full of data; the last one is half a hole, so
    # its buffer (reused, holding an earlier chunk) must be zeroed where not read
    data = bytearray(b"\xaa" * CHUNK * 20)
    data[-CHUNK // 2 :] = bytes(CHUNK // 2)
    allocated = [(0, len(data) - CHUNK // 2)]
    source = MemorySource(bytes(data), allocated)
    assert backup(source, MemorySink()) == bytes(data)
