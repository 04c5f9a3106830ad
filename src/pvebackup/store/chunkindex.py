"""The chunk index: digest -> (pack, offset, length, size).

Authoritative: index objects in the store, ``index/<sha256 hex of the stored
bytes>``, written by a writer for the packs it wrote (at every snapshot commit,
and whenever ``MAX_CHUNK_INDEX_ENTRIES`` would be exceeded), each one blob whose
plaintext is ``CHUNK_INDEX_HEADER``, the pack names, then ``CHUNK_INDEX_ENTRY``
rows. An index object is put only after every pack it names is durable, and
before the manifest that needs its chunks. Packs describe themselves, so the
index objects can always be rebuilt from the packs.

Local: a cache (``MemoryChunkIndex`` here; ``chunkcache.SortedChunkIndex`` on
disk for big stores) that remembers which index objects it has ingested, so that
opening a store reads only the new ones.

Threat: an index object is storage content anyone with write access may have
forged: its name must be its hash, its sizes and counts must agree exactly, pack
numbers must be in range and lengths within the blob limits, before any entry is
used. Entries only steer reads; every chunk read is verified against its digest.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from pvebackup.api.errors import CorruptChunkError, CorruptIndexError
from pvebackup.store.blob import ChunkCodec
from pvebackup.store.formats import (
    BLOB_HEADER,
    BLOB_TAG_SIZE,
    CHUNK_INDEX_ENTRY,
    CHUNK_INDEX_HEADER,
    CHUNK_INDEX_MAGIC,
    DIGEST_SIZE,
    MAX_CHUNK_INDEX_ENTRIES,
    MAX_CHUNK_SIZE,
    MAX_PACK_SIZE,
    ZERO_DIGEST,
)
from pvebackup.store.pack import PackEntry

__all__ = [
    "INDEX_PREFIX",
    "MAX_INDEX_OBJECT_SIZE",
    "ChunkIndexCache",
    "ChunkLocation",
    "IndexObject",
    "MemoryChunkIndex",
    "encode_index_object",
    "index_key",
    "index_name_from_key",
    "parse_index_object",
]

INDEX_PREFIX: Final = "index/"
MAX_INDEX_OBJECT_SIZE: Final = BLOB_HEADER.size + MAX_CHUNK_SIZE + BLOB_TAG_SIZE
_HDR = CHUNK_INDEX_HEADER.struct
_ENT = CHUNK_INDEX_ENTRY.struct


@dataclass(frozen=True, slots=True)
class ChunkLocation:
    """Where a chunk's blob is: pack name, offset and length in it, plaintext size."""

    pack: bytes
    offset: int
    length: int
    size: int


@dataclass(frozen=True, slots=True)
class IndexObject:
    """A parsed index object."""

    session: bytes
    created: int
    entries: list[tuple[bytes, ChunkLocation]]


def index_key(name: bytes) -> str:
    return f"{INDEX_PREFIX}{name.hex()}"


def index_name_from_key(key: str) -> bytes | None:
    """The name of an index object's key, None if the key is not one."""
    h = key[len(INDEX_PREFIX) :] if key.startswith(INDEX_PREFIX) else ""
    if len(h) != 2 * DIGEST_SIZE or h != h.lower():
        return None
    try:
        return bytes.fromhex(h)
    except ValueError:
        return None


def encode_index_object(
    codec: ChunkCodec,
    session: bytes,
    packs: Sequence[tuple[bytes, Sequence[PackEntry]]],
    *,
    created: int | None = None,
) -> tuple[bytes, bytes]:
    """``(name, stored bytes)`` of the index object listing ``packs``' chunks."""
    count = sum(len(entries) for _, entries in packs)
    if count > MAX_CHUNK_INDEX_ENTRIES:
        raise ValueError(f"{count} entries do not fit one index object")
    when = int(time.time()) if created is None else created
    plain = bytearray(_HDR.pack(CHUNK_INDEX_MAGIC, session, when, len(packs), count))
    for name, _ in packs:
        plain += name
    for i, (_, entries) in enumerate(packs):
        for e in entries:
            plain += _ENT.pack(e.digest, i, e.offset, e.length, e.size)
    data = codec.encode(bytes(plain))
    return hashlib.sha256(data).digest(), data


def parse_index_object(codec: ChunkCodec, data: bytes, name: bytes) -> IndexObject:
    """Parse and check an index object read from the store (hostile input)."""
    label = f"index object {name.hex()}"
    if len(data) > MAX_INDEX_OBJECT_SIZE:
        raise CorruptIndexError(f"{label}: too large")
    if hashlib.sha256(data).digest() != name:
        raise CorruptIndexError(f"{label}: content does not match its name")
    try:
        plain = codec.decode(data, name=label)
    except CorruptChunkError as exc:
        raise CorruptIndexError(str(exc)) from exc
    if len(plain) < _HDR.size:
        raise CorruptIndexError(f"{label}: shorter than its header")
    magic, session, created, pack_count, count = _HDR.unpack_from(plain)
    if magic != CHUNK_INDEX_MAGIC:
        raise CorruptIndexError(f"{label}: bad magic")
    if count > MAX_CHUNK_INDEX_ENTRIES or pack_count > max(count, 1):
        raise CorruptIndexError(f"{label}: {pack_count} packs, {count} entries: too many")
    if len(plain) != _HDR.size + pack_count * DIGEST_SIZE + count * _ENT.size:
        raise CorruptIndexError(f"{label}: size does not match its counts")
    packs = [
        plain[_HDR.size + i * DIGEST_SIZE : _HDR.size + (i + 1) * DIGEST_SIZE]
        for i in range(pack_count)
    ]
    base = _HDR.size + pack_count * DIGEST_SIZE
    entries: list[tuple[bytes, ChunkLocation]] = []
    for i in range(count):
        digest, pack, offset, length, size = _ENT.unpack_from(plain, base + i * _ENT.size)
        if (
            digest == ZERO_DIGEST
            or pack >= pack_count
            or length < BLOB_HEADER.size
            or offset + length > MAX_PACK_SIZE
            or size > MAX_CHUNK_SIZE
        ):
            raise CorruptIndexError(f"{label}: entry {i} is out of bounds")
        entries.append((digest, ChunkLocation(packs[pack], offset, length, size)))
    return IndexObject(session, created, entries)


class ChunkIndexCache(Protocol):
    """The local lookup table; not thread-safe (the datastore locks around it)."""

    def lookup(self, digest: bytes) -> ChunkLocation | None: ...

    def add(self, entries: Iterable[tuple[bytes, ChunkLocation]]) -> None: ...

    def ingested(self) -> set[str]:
        """Keys of the index objects whose entries are in the cache."""
        ...

    def mark_ingested(self, key: str) -> None: ...

    def clear(self) -> None:
        """Forget everything (index objects were compacted away)."""
        ...

    def save(self) -> None:
        """Make what was added durable (a no-op in memory)."""
        ...

    def close(self) -> None:
        """Save and let go of the cache (another process may open it then)."""
        ...


class MemoryChunkIndex:
    """A dict: fine for tests and small stores (about 200 bytes per chunk)."""

    def __init__(self) -> None:
        self._packs: dict[bytes, bytes] = {}  # interned pack names
        self._map: dict[bytes, ChunkLocation] = {}
        self._seen: set[str] = set()

    def __len__(self) -> int:
        return len(self._map)

    def lookup(self, digest: bytes) -> ChunkLocation | None:
        return self._map.get(digest)

    def add(self, entries: Iterable[tuple[bytes, ChunkLocation]]) -> None:
        for digest, loc in entries:
            pack = self._packs.setdefault(loc.pack, loc.pack)
            self._map.setdefault(digest, ChunkLocation(pack, loc.offset, loc.length, loc.size))

    def ingested(self) -> set[str]:
        return set(self._seen)

    def mark_ingested(self, key: str) -> None:
        self._seen.add(key)

    def clear(self) -> None:
        self._map.clear()
        self._seen.clear()

    def save(self) -> None:
        return None

    def close(self) -> None:
        return None
