"""Dynamic chunk index of a stream (``.didx``): chunks of any size, in order.

``DYNAMIC_INDEX_HEADER`` (512 bytes, see ``formats``), then one 40-byte entry per
chunk: the offset just past the chunk in the stream (u64) and its digest. Chunk
``i`` covers ``[end[i-1], end[i])`` (``end[-1]`` = 0). Ends are strictly
increasing, no chunk is longer than ``MAX_CHUNK_SIZE``, and the last end is the
header's ``size``. The checksum is SHA-256 over the header with the checksum field
zeroed, then all entries, as in the fixed index.

:class:`DynamicIndex` offers the reader interface of
:class:`~pvebackup.store.index.FixedIndex` (``len``, ``digest``, ``extent``,
``chunk_at``, ``digests``), so garbage collection, verify and restore read both
kinds alike. The ends are kept in one ``array('Q')`` for binary search, the raw
bytes for the digests: no Python object per chunk.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import time
import uuid as uuidlib
from array import array
from collections.abc import Callable, Iterator
from types import TracebackType

from pvebackup.api.errors import CorruptIndexError
from pvebackup.store.formats import (
    DIGEST_SIZE,
    DYNAMIC_INDEX_ENTRY,
    DYNAMIC_INDEX_HEADER,
    DYNAMIC_INDEX_MAGIC,
    MAX_CHUNK_SIZE,
    MAX_INDEX_CHUNKS,
)

__all__ = ["DynamicIndex", "DynamicIndexWriter", "max_dynamic_index_size"]

_HDR = DYNAMIC_INDEX_HEADER.struct
_ENTRY = DYNAMIC_INDEX_ENTRY.struct
_RESERVED = bytes(dict((n, s) for n, _, s in DYNAMIC_INDEX_HEADER.offsets())["reserved"])
_NO_CHECKSUM = bytes(32)
MAX_STREAM_SIZE = MAX_INDEX_CHUNKS * MAX_CHUNK_SIZE


def max_dynamic_index_size(size: int) -> int:
    """Most bytes a valid dynamic index of a ``size``-byte stream can have.

    Every chunk holds at least one byte, and there are at most ``MAX_INDEX_CHUNKS``:
    a reader inflates a stored index only up to this (hostile storage).
    """
    return _HDR.size + min(size, MAX_INDEX_CHUNKS) * _ENTRY.size


def _checksum(header: bytes, entries: bytes | bytearray | memoryview) -> bytes:
    h = hashlib.sha256(header)
    h.update(entries)
    return h.digest()


class DynamicIndex:
    """A validated, read-only dynamic index."""

    __slots__ = ("uuid", "ctime", "size", "checksum", "_data", "_ends")

    def __init__(self, data: bytes, *, name: str = "index") -> None:
        """Parse and validate ``data``; ``CorruptIndexError`` (naming ``name``) if bad."""

        def bad(reason: str) -> CorruptIndexError:
            return CorruptIndexError(f"{name}: {reason}")

        data = bytes(data)
        if len(data) < _HDR.size:
            raise bad("shorter than an index header")
        magic, uid, ctime, size, count, flags, checksum, reserved = _HDR.unpack_from(data)
        if magic != DYNAMIC_INDEX_MAGIC:
            raise bad("not a dynamic index (bad magic)")
        if flags != 0 or reserved != _RESERVED:
            raise bad("unknown flags or reserved bytes set")
        # Bounds before anything is sized by them: a forged count must cost an error.
        if size > MAX_STREAM_SIZE or count > min(size, MAX_INDEX_CHUNKS):
            raise bad(f"size {size} or chunk count {count} out of range")
        if len(data) != _HDR.size + count * _ENTRY.size:
            raise bad(f"{len(data)} bytes, expected {_HDR.size + count * _ENTRY.size}")
        header = _HDR.pack(magic, uid, ctime, size, count, flags, _NO_CHECKSUM, reserved)
        if not hmac.compare_digest(_checksum(header, memoryview(data)[_HDR.size :]), checksum):
            raise bad("checksum mismatch")
        ends = array("Q", bytes(8 * count))
        prev = 0
        for i, (end, _) in enumerate(_ENTRY.iter_unpack(memoryview(data)[_HDR.size :])):
            # Hostile ends: backwards, empty or oversized chunks would make a reader
            # ask for negative or huge reads.
            if not prev < end <= prev + MAX_CHUNK_SIZE:
                raise bad(f"chunk {i} ends at {end} after {prev}")
            ends[i] = prev = end
        if prev != size:
            raise bad(f"chunks cover {prev} bytes, the header says {size}")
        self.uuid = uuidlib.UUID(bytes=uid)
        self.ctime: int = ctime
        self.size: int = size
        self.checksum: bytes = checksum
        self._data = data
        self._ends = ends

    def __len__(self) -> int:
        return len(self._ends)

    def __repr__(self) -> str:
        return f"DynamicIndex(uuid={self.uuid}, size={self.size}, chunks={len(self)})"

    def _check(self, i: int) -> None:
        if not 0 <= i < len(self._ends):
            raise IndexError(f"chunk {i} out of range 0..{len(self._ends) - 1}")

    def digest(self, i: int) -> bytes:
        self._check(i)
        start = _HDR.size + i * _ENTRY.size + 8
        return self._data[start : start + DIGEST_SIZE]

    def extent(self, i: int) -> tuple[int, int]:
        """``(offset, length)`` of chunk ``i`` in the stream."""
        self._check(i)
        start = self._ends[i - 1] if i else 0
        return start, self._ends[i] - start

    def chunk_at(self, offset: int) -> int:
        """Number of the chunk holding stream byte ``offset``."""
        if not 0 <= offset < self.size:
            raise IndexError(f"offset {offset} outside the stream of {self.size} bytes")
        return bisect.bisect_right(self._ends, offset)

    def is_boundary(self, offset: int) -> bool:
        """True if a chunk starts at ``offset`` (or it is the end of the stream)."""
        if offset in (0, self.size):
            return True
        i = bisect.bisect_left(self._ends, offset)
        return i < len(self._ends) and self._ends[i] == offset

    def digests(self) -> Iterator[bytes]:
        for i in range(len(self._ends)):
            yield self.digest(i)

    def to_bytes(self) -> bytes:
        return self._data


class DynamicIndexWriter:
    """Collects ``(length, digest)`` in stream order; stored when the block ends.

    As a context manager it calls ``on_commit(to_bytes())`` on a clean exit and
    drops everything on an exception, like the fixed index writer.
    """

    def __init__(self, *, on_commit: Callable[[bytes], None] | None = None) -> None:
        self.uuid = uuidlib.uuid4()
        self.ctime = int(time.time())
        self.size = 0
        self._entries = bytearray()
        self._on_commit = on_commit
        self.committed = False

    def __len__(self) -> int:
        return len(self._entries) // _ENTRY.size

    def append(self, length: int, digest: bytes) -> None:
        if not 0 < length <= MAX_CHUNK_SIZE or len(digest) != DIGEST_SIZE:
            raise ValueError(f"bad chunk: {length} bytes, digest of {len(digest)}")
        if len(self) >= MAX_INDEX_CHUNKS:
            raise ValueError(f"more than {MAX_INDEX_CHUNKS} chunks in one index")
        self.size += length
        self._entries += _ENTRY.pack(self.size, digest)

    def to_bytes(self) -> bytes:
        fields = (DYNAMIC_INDEX_MAGIC, self.uuid.bytes, self.ctime, self.size, len(self), 0)
        header = _HDR.pack(*fields, _NO_CHECKSUM, _RESERVED)
        return _HDR.pack(*fields, _checksum(header, self._entries), _RESERVED) + self._entries

    def __enter__(self) -> DynamicIndexWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None and self._on_commit is not None:
            self._on_commit(self.to_bytes())
            self.committed = True
