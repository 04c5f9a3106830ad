"""Fixed-size chunk index of a disk image (``.fidx``).

``FIXED_INDEX_HEADER`` (512 bytes, see ``formats``), then one 32-byte digest per
chunk: chunk ``i`` covers bytes ``[i * chunk_size, min((i + 1) * chunk_size, size))``
of the image; only the last chunk may be shorter. ``ZERO_DIGEST`` marks a chunk
of zero bytes, which is not stored. The header's ``checksum`` is SHA-256 over the
header with the checksum field zeroed, followed by all digests, so a flipped bit
anywhere in the file is found.

A 64 GiB image with 256 KiB chunks has 262144 digests, 8 MiB: the reader keeps the
file as one ``bytes`` object and slices it for random access; the writer keeps one
``bytearray``. Neither creates a Python object per chunk.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from types import TracebackType

from pvebackup.api.errors import CorruptIndexError
from pvebackup.store.formats import (
    DIGEST_SIZE,
    FIXED_INDEX_HEADER,
    FIXED_INDEX_MAGIC,
    MAX_CHUNK_SIZE,
    MAX_INDEX_CHUNKS,
    MIN_CHUNK_SIZE,
    ZERO_DIGEST,
)

__all__ = [
    "FixedIndex",
    "FixedIndexWriter",
    "check_chunk_size",
    "check_image_size",
    "chunk_count",
    "index_size",
]

_HDR = FIXED_INDEX_HEADER.struct
_RESERVED = bytes(dict((n, s) for n, _, s in FIXED_INDEX_HEADER.offsets())["reserved"])
_NO_CHECKSUM = bytes(32)


def check_chunk_size(chunk_size: int) -> int:
    """Return ``chunk_size`` if valid (a power of two within the limits)."""
    if not (MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE) or chunk_size & (chunk_size - 1):
        raise ValueError(
            f"chunk size {chunk_size} is not a power of two in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]"
        )
    return chunk_size


def chunk_count(size: int, chunk_size: int) -> int:
    """Number of chunks of an image of ``size`` bytes."""
    return -(-size // chunk_size)


def check_image_size(size: int, chunk_size: int) -> int:
    """Return ``size`` if an index of it fits ``MAX_INDEX_CHUNKS``; else ``ValueError``.

    Every reader calls this on a size read from storage before it allocates
    anything derived from it: a forged size must cost an error, not memory.
    """
    if not 0 <= size or chunk_count(size, chunk_size) > MAX_INDEX_CHUNKS:
        raise ValueError(
            f"image size {size} out of range (at most {MAX_INDEX_CHUNKS} chunks of {chunk_size})"
        )
    return size


def index_size(size: int, chunk_size: int) -> int:
    """Bytes of the fixed index of an image of ``size`` bytes (header and digests)."""
    return _HDR.size + chunk_count(size, chunk_size) * DIGEST_SIZE


def _checksum(header_without_checksum: bytes, digests: bytes | bytearray | memoryview) -> bytes:
    h = hashlib.sha256(header_without_checksum)
    h.update(digests)
    return h.digest()


class FixedIndex:
    """A validated, read-only fixed index. Cheap random access by chunk number."""

    __slots__ = ("uuid", "ctime", "size", "chunk_size", "checksum", "_data", "_count")

    def __init__(self, data: bytes, *, name: str = "index") -> None:
        """Parse and validate ``data``; ``CorruptIndexError`` (naming ``name``) if bad."""

        def bad(reason: str) -> CorruptIndexError:
            return CorruptIndexError(f"{name}: {reason}")

        data = bytes(data)
        if len(data) < _HDR.size:
            raise bad("shorter than an index header")
        magic, uid, ctime, size, chunk_size, flags, checksum, reserved = _HDR.unpack_from(data)
        if magic != FIXED_INDEX_MAGIC:
            raise bad("not a fixed index (bad magic)")
        if flags != 0 or reserved != _RESERVED:
            raise bad("unknown flags or reserved bytes set")
        try:
            check_chunk_size(chunk_size)
            check_image_size(size, chunk_size)
        except ValueError as exc:
            raise bad(str(exc)) from exc
        count = chunk_count(size, chunk_size)
        if len(data) != _HDR.size + count * DIGEST_SIZE:
            raise bad(f"{len(data)} bytes, expected {_HDR.size + count * DIGEST_SIZE}")
        header = _HDR.pack(magic, uid, ctime, size, chunk_size, flags, _NO_CHECKSUM, reserved)
        if not hmac.compare_digest(_checksum(header, memoryview(data)[_HDR.size :]), checksum):
            raise bad("checksum mismatch")
        self.uuid = uuidlib.UUID(bytes=uid)
        self.ctime: int = ctime
        self.size: int = size
        self.chunk_size: int = chunk_size
        self.checksum: bytes = checksum
        self._data = data
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (
            f"FixedIndex(uuid={self.uuid}, size={self.size}, chunk_size={self.chunk_size}, "
            f"chunks={self._count})"
        )

    def digest(self, i: int) -> bytes:
        """Digest of chunk ``i`` (``ZERO_DIGEST`` for a zero chunk)."""
        if not 0 <= i < self._count:
            raise IndexError(f"chunk {i} out of range 0..{self._count - 1}")
        start = _HDR.size + i * DIGEST_SIZE
        return self._data[start : start + DIGEST_SIZE]

    def is_zero(self, i: int) -> bool:
        return self.digest(i) == ZERO_DIGEST

    def extent(self, i: int) -> tuple[int, int]:
        """``(offset, length)`` of chunk ``i`` in the image."""
        if not 0 <= i < self._count:
            raise IndexError(f"chunk {i} out of range 0..{self._count - 1}")
        offset = i * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def chunk_at(self, offset: int) -> int:
        """Number of the chunk holding image byte ``offset``."""
        if not 0 <= offset < self.size:
            raise IndexError(f"offset {offset} outside the image of {self.size} bytes")
        return offset // self.chunk_size

    def digests(self) -> Iterator[bytes]:
        """Every digest in chunk order (zero digests included)."""
        view = memoryview(self._data)
        for start in range(_HDR.size, len(self._data), DIGEST_SIZE):
            yield bytes(view[start : start + DIGEST_SIZE])

    def raw_digests(self) -> memoryview:
        """All digests as one read-only buffer (32 bytes per chunk)."""
        return memoryview(self._data)[_HDR.size :]

    def to_bytes(self) -> bytes:
        return self._data


class FixedIndexWriter:
    """Builds a fixed index in memory; every chunk starts as a zero chunk.

    Use ``set(i, digest)`` in any order, then ``to_bytes()``. As a context manager
    it calls ``on_commit(to_bytes())`` when the block ends without an exception, and
    drops everything when it ends with one, so an unfinished index is never stored.
    ``FixedIndexWriter.from_index(prev)`` starts from a previous index (incremental
    backup: only dirty chunks are set again).
    """

    def __init__(
        self,
        size: int,
        chunk_size: int,
        *,
        on_commit: Callable[[bytes], None] | None = None,
        uuid: uuidlib.UUID | None = None,
        ctime: int | None = None,
    ) -> None:
        self.chunk_size = check_chunk_size(chunk_size)
        self.size = check_image_size(size, chunk_size)
        self.uuid = uuid or uuidlib.uuid4()
        self.ctime = int(time.time()) if ctime is None else ctime
        self._count = chunk_count(size, chunk_size)
        self._digests = bytearray(self._count * DIGEST_SIZE)
        self._on_commit = on_commit
        self.committed = False

    @classmethod
    def from_index(
        cls, prev: FixedIndex, *, on_commit: Callable[[bytes], None] | None = None
    ) -> FixedIndexWriter:
        """A writer for a new index (new uuid and ctime) holding ``prev``'s digests."""
        w = cls(prev.size, prev.chunk_size, on_commit=on_commit)
        w._digests[:] = prev.raw_digests()
        return w

    def __len__(self) -> int:
        return self._count

    def set(self, i: int, digest: bytes) -> None:
        if not 0 <= i < self._count:
            raise IndexError(f"chunk {i} out of range 0..{self._count - 1}")
        if len(digest) != DIGEST_SIZE:
            raise ValueError(f"a digest has {DIGEST_SIZE} bytes")
        self._digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] = digest

    def get(self, i: int) -> bytes:
        if not 0 <= i < self._count:
            raise IndexError(f"chunk {i} out of range 0..{self._count - 1}")
        return bytes(self._digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE])

    def extent(self, i: int) -> tuple[int, int]:
        """``(offset, length)`` of chunk ``i`` in the image."""
        offset = i * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def to_bytes(self) -> bytes:
        fields = (FIXED_INDEX_MAGIC, self.uuid.bytes, self.ctime, self.size, self.chunk_size, 0)
        header = _HDR.pack(*fields, _NO_CHECKSUM, _RESERVED)
        checksum = _checksum(header, self._digests)
        return _HDR.pack(*fields, checksum, _RESERVED) + self._digests

    def __enter__(self) -> FixedIndexWriter:
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
