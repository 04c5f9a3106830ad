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
workers, each at most one chunk: a few MiB whatever the disk size. The reads,
their reused buffers (:class:`~pvebackup.kit.nbdsource.BufferPool`) and the joined
discards are the kit's (:mod:`pvebackup.kit.nbdsource`); a buffer goes back to the
pool when its chunk is stored. Chunks the plan marks as zero are never read. All
libnbd calls stay on the main thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from pvebackup.kit.crashpoint import crash_point
from pvebackup.kit.nbdsource import (
    READS_IN_FLIGHT,
    BlockSource,
    BufferPool,
    Trimmer,
    read_in_order,
)
from pvebackup.kit.pacing import TokenBucket
from pvebackup.providers.store.plan import ChunkJob
from pvebackup.providers.store.progress import BackupStats

__all__ = ["ChunkSink", "ChunkResult", "READS_IN_FLIGHT", "QUEUED_CHUNKS", "run_pipeline"]

WORKERS = 2
# Chunks handed to the workers but not collected yet (bounds memory with the reads).
QUEUED_CHUNKS = 2 * WORKERS + 2


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


def _build(sink: ChunkSink, job: ChunkJob, buf: memoryview) -> ChunkResult:
    if job.base is not None:
        # Partly dirty chunk: clean bytes from the previous chunk, dirty bytes as read.
        merged = bytearray(sink.load_chunk(job.base, job.length))
        for offset, length in job.reads:
            start = offset - job.offset
            merged[start : start + length] = buf[start : start + length]
        return sink.store_chunk(merged)
    return sink.store_chunk(buf)


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
    work: deque[tuple[ChunkJob, Future[ChunkResult], bytearray]] = deque()
    trimmer = Trimmer(source)
    buffers = BufferPool()

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

    def to_read() -> Iterator[ChunkJob]:
        # Zero chunks are recorded as they come by, without a read.
        for job in jobs:
            if job.is_zero:
                set_digest(job.index, zero_digest)
                stats.zero += job.length
                stats.done += job.length
                continue
            yield job

    pace = limiter.consume if limiter is not None else None
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="pvebackup-chunk") as pool:
        try:
            for job, buf, view in read_in_order(source, to_read(), buffers, pace=pace):
                stats.read += job.read_bytes
                while len(work) >= QUEUED_CHUNKS:
                    collect_one()
                work.append((job, pool.submit(_build, sink, job, view), buf))
            while work:
                collect_one()
            trimmer.flush()
        except BaseException:
            for _, fut, _ in work:
                fut.cancel()
            raise
