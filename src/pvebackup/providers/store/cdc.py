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

Average size: 1 MiB (min 256 KiB, max 4 MiB), chosen by measurement
(``docs/benchmarks.md``): the store's packs and chunk index cost per chunk, and
smaller chunks bought little extra dedup on the container tree.
"""

from __future__ import annotations

from pyfastcdc import FastCDC

from pvebackup.store.datastore import Datastore
from pvebackup.store.dynindex import DynamicIndexWriter

__all__ = ["CDC_AVG_SIZE", "CdcSink", "SinkStats"]

CDC_AVG_SIZE = 1 << 20
_HIGH_WATER = 16 << 20
"""Buffered bytes that trigger chunking (at least four maximal chunks)."""


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
        self._cdc = FastCDC(avg_size, min_size=avg_size // 4, max_size=avg_size * 4)
        self._buf = bytearray()
        self.stats = stats if stats is not None else SinkStats()
        self.offset = 0
        """Bytes written so far (the stream offset of the next byte)."""

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
        r = self._store.insert_chunk(chunk)
        self._index.append(len(chunk), r.digest)
        s = self.stats
        s.size += len(chunk)
        s.chunks += 1
        if r.is_new:
            s.new += len(chunk)
            s.stored += r.stored_size
        else:
            s.reused += len(chunk)
