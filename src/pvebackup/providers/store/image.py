"""A disk image served from a snapshot's fixed index: verified chunks, read ahead.

:class:`SnapshotImage` answers the two questions an NBD server asks: which ranges
are zero (``extents``: zero chunks are reported as holes, so ``qemu-img convert``
keeps the restored image sparse) and what bytes are at an offset (``pread``).
Chunks are decoded and verified by the datastore's ``read_chunk``; a few decoded
chunks are kept in an LRU, and the chunks after each request are fetched ahead on
a small thread pool, so that sequential readers find them ready.

Read-ahead goes in aligned *batches* of ``batch`` chunks: the first time the
window touches a batch, its missing chunks are fetched by one job through
``read_chunks`` (the datastore's, which turns chunks that lie next to each other
in a pack into one ranged read: on S3 one GET per few MiB instead of one per
chunk). Memory is bounded: at most ``cache_chunks`` (raised to cover the window)
decoded chunks are cached, plus those of the batches in flight (``workers``).

A chunk that fails verification makes the read fail with :class:`CorruptChunkError`
naming the snapshot, the device, the chunk number and its digest; there is never a
silent substitute. It is safe to call from many threads at once (nbdkit's
``THREAD_MODEL_PARALLEL``).
"""

from __future__ import annotations

import heapq
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from pvebackup.api.errors import CorruptChunkError, IntegrityError
from pvebackup.store.formats import ZERO_DIGEST
from pvebackup.store.index import FixedIndex

__all__ = ["EXTENT_DATA", "EXTENT_HOLE_ZERO", "SnapshotImage"]

EXTENT_DATA = 0
EXTENT_HOLE_ZERO = 3
"""nbdkit extent type: hole and zero (``NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO``)."""

ReadChunk = Callable[[bytes, int], bytes]
ReadChunks = Callable[[Sequence[tuple[bytes, int]]], Sequence[bytes | IntegrityError]]


class SnapshotImage:
    """The image of one device of one snapshot.

    :param read_chunk: ``read_chunk(digest, size)`` returns the verified plaintext
        (the datastore's ``read_chunk``).
    :param index: the device's verified fixed index.
    :param name: ``"<snapshot> <device>"``, used in error messages.
    :param cache_chunks: decoded chunks kept in memory.
    :param read_ahead: chunks fetched ahead of each request.
    :param read_chunks: reads several chunks at once (the datastore's
        ``read_chunks``); without it, read-ahead reads chunk by chunk.
    :param batch: chunks per read-ahead job (see the module docstring).
    :param workers: read-ahead jobs at once.
    """

    def __init__(
        self,
        read_chunk: ReadChunk,
        index: FixedIndex,
        name: str,
        *,
        cache_chunks: int = 64,
        read_ahead: int = 16,
        workers: int = 4,
        read_chunks: ReadChunks | None = None,
        batch: int = 1,
    ) -> None:
        self._read_chunk = read_chunk
        self._read_chunks = read_chunks
        self.index = index
        self.name = name
        self.size = index.size
        self._chunk_size = index.chunk_size
        self._batch = max(1, batch)
        self._cache_chunks = max(cache_chunks, read_ahead + 2 * self._batch + 2)
        self._read_ahead = read_ahead
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, Future[bytes]] = OrderedDict()
        self._mark = -1  # the furthest chunk read ahead so far
        self._pinned: Counter[int] = Counter()  # chunks of requests in progress
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="pvebackup-readahead")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # extents -----------------------------------------------------------------------

    def extents(self, count: int, offset: int) -> list[tuple[int, int, int]]:
        """``(offset, length, type)`` covering ``[offset, offset + count)``, merged."""
        out: list[tuple[int, int, int]] = []
        end = min(offset + count, self.size)
        pos = offset
        while pos < end:
            i = pos // self._chunk_size
            chunk_end = min((i + 1) * self._chunk_size, end)
            kind = EXTENT_HOLE_ZERO if self.index.digest(i) == ZERO_DIGEST else EXTENT_DATA
            if out and out[-1][2] == kind:
                start, length, _ = out[-1]
                out[-1] = (start, length + chunk_end - pos, kind)
            else:
                out.append((pos, chunk_end - pos, kind))
            pos = chunk_end
        return out

    # reads -------------------------------------------------------------------------

    def _load(self, i: int) -> bytes:
        digest = self.index.digest(i)
        _, length = self.index.extent(i)
        try:
            return self._read_chunk(digest, length)
        except IntegrityError as exc:
            raise self._damaged(i, exc) from exc

    def _damaged(self, i: int, exc: IntegrityError) -> CorruptChunkError:
        digest = self.index.digest(i)
        err = CorruptChunkError(f"{self.name}: chunk {i} ({digest.hex()}) is damaged: {exc}")
        err.__cause__ = exc
        return err

    def _load_batch(self, todo: list[tuple[int, Future[bytes]]]) -> None:
        """Fetch the chunks of one read-ahead batch and settle their futures."""
        assert self._read_chunks is not None
        try:
            wanted = [(self.index.digest(i), self.index.extent(i)[1]) for i, _ in todo]
            results = self._read_chunks(wanted)
        except BaseException as exc:
            for i, fut in todo:
                self._settle(i, fut, exc)
            return
        for (i, fut), result in zip(todo, results, strict=True):
            if isinstance(result, IntegrityError):
                self._settle(i, fut, self._damaged(i, result))
            else:
                fut.set_result(result)

    def _settle(self, i: int, fut: Future[bytes], exc: BaseException) -> None:
        fut.set_exception(exc)
        with self._lock:
            # A failed chunk is not cached: the next read tries again.
            if self._cache.get(i) is fut:
                del self._cache[i]

    def _evict(self) -> None:
        """Drop the lowest chunks beyond ``cache_chunks`` (the lock is held).

        Lowest, not least recently used: sequential readers are done with the
        chunks behind them, while LRU or FIFO would drop the read-ahead the
        slowest of several concurrent readers is about to use (and each such
        eviction costs a second fetch of the chunk). Chunks of requests in
        progress are pinned: a reader waiting for its first chunk must still
        find the others.
        """
        excess = len(self._cache) - self._cache_chunks
        if excess > 0:
            pinned = self._pinned
            for i in heapq.nsmallest(excess, (i for i in self._cache if i not in pinned)):
                del self._cache[i]

    def _future(self, i: int, *, run_here: bool) -> tuple[Future[bytes], bool]:
        """The future of chunk ``i``; True if the caller must compute it."""
        with self._lock:
            fut = self._cache.get(i)
            if fut is not None:
                return fut, False
            if run_here:
                fut = Future()
            else:
                fut = self._pool.submit(self._load, i)
            self._cache[i] = fut
            self._evict()
            return fut, run_here

    def _chunk(self, i: int) -> bytes:
        fut, mine = self._future(i, run_here=True)
        if mine:
            try:
                fut.set_result(self._load(i))
            except BaseException as exc:
                fut.set_exception(exc)
                with self._lock:
                    # A failed chunk is not cached: the next read tries again.
                    if self._cache.get(i) is fut:
                        del self._cache[i]
        return fut.result()

    def _prefetch(self, first: int, last: int) -> None:
        count = len(self.index)
        last = min(last, count)
        if self._read_chunks is None:
            for i in range(first, last):
                if self.index.digest(i) != ZERO_DIGEST:
                    self._future(i, run_here=False)
            return
        b = self._batch
        for start in range(first - first % b, last, b):
            todo: list[tuple[int, Future[bytes]]] = []
            with self._lock:
                # The whole batch, also past ``last``: else the window's edge,
                # moving a chunk per request, would fetch one chunk per job.
                for i in range(max(start, first), min(start + b, count)):
                    if i in self._cache or self.index.digest(i) == ZERO_DIGEST:
                        continue
                    fut: Future[bytes] = Future()
                    self._cache[i] = fut
                    todo.append((i, fut))
                self._evict()
            if todo:
                self._pool.submit(self._load_batch, todo)

    def pread(self, buf: memoryview | bytearray, offset: int) -> None:
        """Fill ``buf`` with the image bytes at ``offset`` (may raise CorruptChunkError)."""
        length = len(buf)
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"read of {length} bytes at {offset} beyond {self.size}")
        if length == 0:
            return
        first = offset // self._chunk_size
        last = (offset + length - 1) // self._chunk_size
        mine = range(first, last + 1)
        with self._lock:
            # Sequential (within what was fetched ahead, or next to it): the
            # requested chunks join the batches too, so that concurrent readers
            # that outran the read-ahead do not each fetch one chunk alone.
            sequential = self._read_chunks is not None and first <= self._mark + 1
            self._mark = max(self._mark, last + self._read_ahead)
            self._pinned.update(mine)
        try:
            self._prefetch(first if sequential else first + 1, last + 1 + self._read_ahead)
            self._fill(buf, offset, first, last)
        finally:
            with self._lock:
                self._pinned.subtract(mine)
                for i in mine:
                    if self._pinned[i] <= 0:
                        del self._pinned[i]

    def _fill(self, buf: memoryview | bytearray, offset: int, first: int, last: int) -> None:
        length = len(buf)
        view = memoryview(buf)
        pos = offset
        for i in range(first, last + 1):
            chunk_start = i * self._chunk_size
            start = pos - chunk_start
            n = min(self._chunk_size - start, offset + length - pos)
            dst = view[pos - offset : pos - offset + n]
            if self.index.digest(i) == ZERO_DIGEST:
                dst[:] = bytes(n)
            else:
                dst[:] = memoryview(self._chunk(i))[start : start + n]
            pos += n
