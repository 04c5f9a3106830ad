"""Content-defined chunking of a stream into the store, with forced boundaries.

:class:`CdcSink` is a write-only file object: bytes written to it are cut by
FastCDC (``pyfastcdc``, compiled; ~2.4 GB/s here, faster than the SHA-256 that
names each chunk) and every chunk is stored and appended to a
:class:`~pvebackup.store.dynindex.DynamicIndexWriter`. :meth:`CdcSink.cut` ends
the current chunk where the stream is now: the container archive puts a boundary
before and after the data of every large file, so an unchanged file's data is a
run of whole chunks (see ``docs/file-formats.md``, "Container archives").

Determinism: the chunker restarts at every boundary, and a boundary depends only
on the bytes since the previous one. Buffering does not change where cuts fall:
the last piece of a buffer (cut only because the buffer ended) is kept and
chunked again with what follows.

Digest, compression (and encryption) run on :data:`WORKERS` threads, as in the
disk pipeline (hashlib and zstd release the GIL); the index gets the digests in
stream order.

Average size: 1 MiB (min 256 KiB, max 4 MiB), chosen by measurement
(``docs/benchmarks.md``): the store's packs and chunk index cost per chunk, and
smaller chunks bought little extra dedup on the container tree.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from pvebackup.kit.optdeps import require
from pvebackup.store.datastore import Datastore, InsertResult
from pvebackup.store.dynindex import DynamicIndexWriter

__all__ = ["CDC_AVG_SIZE", "CdcSink", "SinkStats"]

CDC_AVG_SIZE = 1 << 20
_HIGH_WATER = 16 << 20
"""Buffered bytes that trigger chunking (at least four maximal chunks)."""
WORKERS = 2
_QUEUED = 2 * WORKERS + 2
"""Chunks handed to the workers and not collected yet: bounds memory (4 MiB each)."""


class SinkStats:
    """Bytes through one sink: all, newly stored (plain and encoded), deduplicated."""

    __slots__ = ("size", "new", "stored", "reused", "chunks")

    def __init__(self) -> None:
        self.size = self.new = self.stored = self.reused = self.chunks = 0


class CdcSink:
    """Cuts what is written into content-defined chunks, stored and indexed."""

    def __init__(
        self,
        store: Datastore,
        index: DynamicIndexWriter,
        stats: SinkStats | None = None,
        avg_size: int = CDC_AVG_SIZE,
    ) -> None:
        self._store = store
        self._index = index
        # Imported here: pyfastcdc is in no Debian release (docs/proxmox-ve.md).
        fastcdc = require("pyfastcdc", "a container archive in a backup-store")
        self._cdc = fastcdc.FastCDC(avg_size, min_size=avg_size // 4, max_size=avg_size * 4)
        self._buf = bytearray()
        self.stats = stats if stats is not None else SinkStats()
        self.offset = 0
        """Bytes written so far (the stream offset of the next byte)."""
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="cdc")
        self._pending: deque[tuple[int, Future[InsertResult]]] = deque()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._buf += data
        self.offset += len(data)
        if len(self._buf) >= _HIGH_WATER:
            self._chunk(final=False)
        return len(data)

    def flush(self) -> None:
        pass

    def cut(self) -> None:
        """End the current chunk here (nothing happens at a boundary already)."""
        self._chunk(final=True)

    def finish(self) -> None:
        """Store what is buffered; the index then covers the whole stream."""
        self._chunk(final=True)
        while self._pending:
            self._collect()
        self.close()

    def close(self) -> None:
        """Stop the workers (after an error: chunks in flight are dropped)."""
        for _, future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)

    def _chunk(self, final: bool) -> None:
        if not self._buf:
            return
        # Only offsets leave the generator: a Chunk's memoryview into the buffer
        # would forbid resizing it below.
        cuts = [(c.offset, c.length) for c in self._cdc.cut_buf(self._buf)]
        if not final:
            cuts.pop()  # ends only because the buffer does: chunked again later
        done = 0
        with memoryview(self._buf) as view:
            for offset, length in cuts:
                self._store_chunk(view[offset : offset + length])
                done = offset + length
        del self._buf[:done]

    def _store_chunk(self, chunk: memoryview) -> None:
        # A copy: the buffer moves on while the worker digests and compresses.
        future = self._pool.submit(self._store.insert_chunk, bytes(chunk))
        self._pending.append((len(chunk), future))
        while len(self._pending) > _QUEUED:
            self._collect()

    def append_known(self, length: int, digest: bytes) -> None:
        """Append a stored chunk without its bytes (metadata-mode reuse).

        Only at a boundary (call :meth:`cut` first); the caller has checked that
        the store has the chunk.
        """
        if self._buf:
            raise RuntimeError("append_known needs a chunk boundary: call cut() first")
        done: Future[InsertResult] = Future()
        done.set_result(InsertResult(digest, 0, False))
        self._pending.append((length, done))
        self.offset += length
        # Bounded like stored chunks: an unchanged re-run appends only known chunks,
        # and a Future per chunk of a million-file tree held ~1 GiB until finish().
        while len(self._pending) > _QUEUED:
            self._collect()

    def _collect(self) -> None:
        length, future = self._pending.popleft()
        r = future.result()
        self._index.append(length, r.digest)
        s = self.stats
        s.size += length
        s.chunks += 1
        if r.is_new:
            s.new += length
            s.stored += r.stored_size
        else:
            s.reused += length
