"""The disk backup pipeline: NBD reads in order, chunk work on two threads.

::

    main thread                               2 worker threads
    plan -> rate limit -> aio reads (<= N in flight, in order)
         -> oldest read done -> submit ------> merge with base chunk (incremental),
                                               zero check, digest, compress,
                                               encrypt, insert into the store
         <- oldest chunk done <--------------- (digest, bytes written)
         -> index entry, stats, discard the range on the export

Memory is bounded by the number of reads in flight plus the chunks queued for the
workers, each at most one chunk: a few MiB whatever the disk size. The chunk
buffers come from a small pool and are reused: libnbd 1.14's
``nbd.Buffer.from_buffer`` never releases the buffer it wraps, so a fresh
bytearray per read would keep every byte ever read alive (1 GiB of RSS for a
1 GiB disk, seen here); reused buffers make that leak a few bytes per read. Reads are
issued in disk order and results are taken in submission order, so the index and
the discards advance front to back. Chunks the plan marks as zero are never read.
All libnbd calls stay on the main thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from pvebackup.api.discard import discard_range
from pvebackup.kit.crashpoint import crash_point
from pvebackup.providers.store.nbdsource import BlockSource
from pvebackup.providers.store.plan import ChunkJob, Range
from pvebackup.providers.store.progress import BackupStats
from pvebackup.providers.store.ratelimit import TokenBucket

__all__ = ["ChunkSink", "ChunkResult", "run_pipeline"]

WORKERS = 2
READS_IN_FLIGHT = 4
# Chunks handed to the workers but not collected yet (bounds memory with the reads).
QUEUED_CHUNKS = 2 * WORKERS + 2
# Discards of consecutive stored ranges are joined up to this size.
TRIM_BATCH = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ChunkResult:
    """What storing one chunk did: its digest, whether it was new, bytes written."""

    digest: bytes
    new: bool
    written: int
    zero: bool = False


class ChunkSink(Protocol):
    """Where chunks go, and where the bytes of previous chunks come from."""

    def store_chunk(self, data: bytes | bytearray | memoryview) -> ChunkResult:
        """Digest, encode and insert one chunk (idempotent; zero chunks not stored)."""
        ...

    def load_chunk(self, digest: bytes, size: int) -> bytes:
        """The verified plaintext of a stored chunk (zeros for the zero digest)."""
        ...


class _BufferPool:
    """Chunk buffers for reads and workers, reused (see the module docstring)."""

    def __init__(self) -> None:
        self._free: list[bytearray] = []

    def take(self, length: int) -> tuple[bytearray, memoryview]:
        for i, buf in enumerate(self._free):
            if len(buf) >= length:
                del self._free[i]
                return buf, memoryview(buf)[:length]
        buf = bytearray(length)
        return buf, memoryview(buf)

    def give(self, buf: bytearray) -> None:
        self._free.append(buf)


def _build(sink: ChunkSink, job: ChunkJob, buf: memoryview) -> ChunkResult:
    if job.base is not None:
        # Partly dirty chunk: clean bytes from the previous chunk, dirty bytes as read.
        merged = bytearray(sink.load_chunk(job.base, job.length))
        for offset, length in job.reads:
            start = offset - job.offset
            merged[start : start + length] = buf[start : start + length]
        return sink.store_chunk(merged)
    return sink.store_chunk(buf)


class _Trimmer:
    """Joins discards of consecutive ranges; issues them when a gap or size says so."""

    def __init__(self, source: BlockSource) -> None:
        self._source = source
        self._start = 0
        self._end = 0

    def add(self, ranges: Iterable[Range]) -> None:
        for offset, length in ranges:
            if self._end == offset and self._end - self._start < TRIM_BATCH:
                self._end += length
                continue
            self.flush()
            self._start, self._end = offset, offset + length

    def flush(self) -> None:
        if self._end > self._start:
            part = discard_range(self._start, self._end - self._start, self._source.size)
            if part is not None:
                self._source.trim(*part)
        self._start = self._end = 0


def run_pipeline(
    source: BlockSource,
    sink: ChunkSink,
    jobs: Iterable[ChunkJob],
    set_digest: Callable[[int, bytes], None],
    stats: BackupStats,
    *,
    limiter: TokenBucket | None = None,
    tick: Callable[[], None] = lambda: None,
    zero_digest: bytes,
) -> None:
    """Build every chunk of ``jobs`` and record it with ``set_digest(job.index, digest)``.

    Chunks without a job keep what the index held (incremental). Raises whatever
    the source or the sink raise; on an exception the reads in flight are
    abandoned with the source (the caller closes it).
    """
    reads: deque[tuple[ChunkJob, bytearray, memoryview, list[int]]] = deque()
    work: deque[tuple[ChunkJob, Future[ChunkResult], bytearray]] = deque()
    trimmer = _Trimmer(source)
    buffers = _BufferPool()

    def collect_one() -> None:
        job, fut, buf = work.popleft()
        result = fut.result()
        buffers.give(buf)
        set_digest(job.index, result.digest)
        if result.zero:
            stats.zero += job.length
        elif result.new:
            stats.new += job.length
            stats.stored += result.written
        else:
            stats.reused += job.length
        stats.done += job.read_bytes if job.base is not None else job.length
        trimmer.add(job.reads)
        tick()
        crash_point("backup-mid-read")

    def submit_oldest_read(pool: ThreadPoolExecutor) -> None:
        job, buf, view, cookies = reads.popleft()
        for cookie in cookies:
            source.wait(cookie)
        stats.read += job.read_bytes
        while len(work) >= QUEUED_CHUNKS:
            collect_one()
        work.append((job, pool.submit(_build, sink, job, view), buf))

    with ThreadPoolExecutor(WORKERS, thread_name_prefix="pvebackup-chunk") as pool:
        try:
            for job in jobs:
                if job.is_zero:
                    set_digest(job.index, zero_digest)
                    stats.zero += job.length
                    stats.done += job.length
                    continue
                if limiter is not None:
                    limiter.consume(job.read_bytes)
                buf, view = buffers.take(job.length)
                if job.base is None and not job.is_whole:
                    view[:] = bytes(job.length)  # the bytes not read are holes: zeros
                cookies = [
                    source.submit_read(view[off - job.offset : off - job.offset + ln], off)
                    for off, ln in job.reads
                ]
                reads.append((job, buf, view, cookies))
                if len(reads) >= READS_IN_FLIGHT:
                    submit_oldest_read(pool)
            while reads:
                submit_oldest_read(pool)
            while work:
                collect_one()
            trimmer.flush()
        except BaseException:
            for _, fut, _ in work:
                fut.cancel()
            raise
