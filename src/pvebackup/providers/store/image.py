"""A disk image served from a snapshot's fixed index: verified chunks, read ahead.

:class:`SnapshotImage` answers the two questions an NBD server asks: which ranges
are zero (``extents``: zero chunks are reported as holes, so ``qemu-img convert``
keeps the restored image sparse) and what bytes are at an offset (``pread``).
Chunks are decoded and verified by the datastore's ``read_chunk``; a few decoded
chunks are kept in an LRU, and the chunks after each request are fetched ahead on
a small thread pool, so that sequential readers find them ready.

A chunk that fails verification makes the read fail with :class:`CorruptChunkError`
naming the snapshot, the device, the chunk number and its digest; there is never a
silent substitute. It is safe to call from many threads at once (nbdkit's
``THREAD_MODEL_PARALLEL``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from pvebackup.api.errors import CorruptChunkError, IntegrityError
from pvebackup.store.formats import ZERO_DIGEST
from pvebackup.store.index import FixedIndex

__all__ = ["EXTENT_DATA", "EXTENT_HOLE_ZERO", "SnapshotImage"]

EXTENT_DATA = 0
EXTENT_HOLE_ZERO = 3
"""nbdkit extent type: hole and zero (``NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO``)."""

ReadChunk = Callable[[bytes, int], bytes]


class SnapshotImage:
    """The image of one device of one snapshot.

    :param read_chunk: ``read_chunk(digest, size)`` returns the verified plaintext
        (the datastore's ``read_chunk``).
    :param index: the device's verified fixed index.
    :param name: ``"<snapshot> <device>"``, used in error messages.
    :param cache_chunks: decoded chunks kept in memory.
    :param read_ahead: chunks fetched ahead of each request.
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
    ) -> None:
        self._read_chunk = read_chunk
        self.index = index
        self.name = name
        self.size = index.size
        self._chunk_size = index.chunk_size
        self._cache_chunks = max(cache_chunks, read_ahead + 2)
        self._read_ahead = read_ahead
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, Future[bytes]] = OrderedDict()
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
            raise CorruptChunkError(
                f"{self.name}: chunk {i} ({digest.hex()}) is damaged: {exc}"
            ) from exc

    def _future(self, i: int, *, run_here: bool) -> tuple[Future[bytes], bool]:
        """The future of chunk ``i``; True if the caller must compute it."""
        with self._lock:
            fut = self._cache.get(i)
            if fut is not None:
                self._cache.move_to_end(i)
                return fut, False
            if run_here:
                fut = Future()
            else:
                fut = self._pool.submit(self._load, i)
            self._cache[i] = fut
            while len(self._cache) > self._cache_chunks:
                self._cache.popitem(last=False)
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
        for i in range(first, min(last, count)):
            if self.index.digest(i) != ZERO_DIGEST:
                self._future(i, run_here=False)

    def pread(self, buf: memoryview | bytearray, offset: int) -> None:
        """Fill ``buf`` with the image bytes at ``offset`` (may raise CorruptChunkError)."""
        length = len(buf)
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"read of {length} bytes at {offset} beyond {self.size}")
        if length == 0:
            return
        first = offset // self._chunk_size
        last = (offset + length - 1) // self._chunk_size
        self._prefetch(first + 1, last + 1 + self._read_ahead)
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
