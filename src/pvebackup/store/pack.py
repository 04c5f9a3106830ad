"""Packs: many chunk blobs in one immutable object, with their own description.

A pack is ``PACK_HEADER``, the blobs of its chunks back to back, the description
(one blob: ``PACK_DESCRIPTION_HEADER`` and one ``PACK_ENTRY`` per chunk; encrypted
in an encrypted store, so digests, sizes and the chunk count do not leak beyond
the pack's size), then ``PACK_TRAILER`` (magic, stored size of the description).
Its name is the SHA-256 of all its bytes (``packs/<hex[0:2]>/<hex>``), so a pack
is written once, with ``overwrite=False``, and never changes. The description
makes the chunk index rebuildable from the packs alone.

Threat: a pack comes from storage anyone with write access may have forged.
``parse_description`` bounds every field (entries inside the pack's blob area,
in order, not overlapping, sizes within the blob limits) before anything is used,
and a chunk read from a pack is verified against its digest by the codec.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

from pvebackup.api.errors import CorruptChunkError, CorruptIndexError
from pvebackup.store.backends.base import Backend
from pvebackup.store.blob import ChunkCodec
from pvebackup.store.formats import (
    BLOB_FLAGS_KNOWN,
    BLOB_HEADER,
    BLOB_TAG_SIZE,
    DIGEST_SIZE,
    MAX_CHUNK_SIZE,
    MAX_PACK_ENTRIES,
    MAX_PACK_SIZE,
    PACK_DESCRIPTION_HEADER,
    PACK_DESCRIPTION_MAGIC,
    PACK_ENTRY,
    PACK_HEADER,
    PACK_MAGIC,
    PACK_TRAILER,
    ZERO_DIGEST,
)

__all__ = [
    "DEFAULT_PACK_SIZE",
    "PACKS_PREFIX",
    "PackBuilder",
    "PackEntry",
    "pack_key",
    "pack_name_from_key",
    "parse_description",
    "read_pack_entries",
    "verify_pack",
]

PACKS_PREFIX: Final = "packs/"
DEFAULT_PACK_SIZE: Final = 16 * 1024 * 1024
"""Target size of a pack; see docs/design.md ("Packs") for the measurement."""
MIN_PACK_SIZE: Final = 1024 * 1024
MAX_TARGET_PACK_SIZE: Final = 256 * 1024 * 1024

_MAX_DESCRIPTION: Final = BLOB_HEADER.size + MAX_CHUNK_SIZE + BLOB_TAG_SIZE
_ENTRY = PACK_ENTRY.struct
_DESC = PACK_DESCRIPTION_HEADER.struct
_TRAILER = PACK_TRAILER.struct
_HEADER_BYTES: Final = PACK_HEADER.struct.pack(PACK_MAGIC, bytes(8))


def pack_key(name: bytes) -> str:
    """Backend key of the pack ``name`` (its 32-byte SHA-256)."""
    if len(name) != DIGEST_SIZE:
        raise ValueError(f"a pack name has {DIGEST_SIZE} bytes")
    h = name.hex()
    return f"{PACKS_PREFIX}{h[:2]}/{h}"


def pack_name_from_key(key: str) -> bytes | None:
    """The pack name of a backend key, None if the key is no pack's."""
    if not key.startswith(PACKS_PREFIX):
        return None
    rest = key[len(PACKS_PREFIX) :]
    sub, _, h = rest.partition("/")
    if len(h) != 2 * DIGEST_SIZE or h[:2] != sub or h != h.lower():
        return None
    try:
        return bytes.fromhex(h)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class PackEntry:
    """One chunk in a pack: where its blob is, how long, its plaintext size, flags."""

    digest: bytes
    offset: int
    length: int
    size: int
    flags: int


class PackBuilder:
    """Collects blobs in memory until ``finish`` makes the pack's bytes and name.

    Not thread-safe: the datastore holds its lock around it.
    """

    def __init__(self, codec: ChunkCodec) -> None:
        self._codec = codec
        self._parts: list[bytes] = [_HEADER_BYTES]
        self._size = len(_HEADER_BYTES)
        self.entries: list[PackEntry] = []
        self._by_digest: dict[bytes, int] = {}

    @property
    def size(self) -> int:
        """Bytes of header and blobs so far."""
        return self._size

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, digest: object) -> bool:
        return digest in self._by_digest

    def add(self, digest: bytes, blob: bytes, size: int) -> PackEntry:
        """Append the blob of chunk ``digest`` (plaintext ``size`` bytes)."""
        if len(self.entries) >= MAX_PACK_ENTRIES:
            raise ValueError("pack is full")
        entry = PackEntry(digest, self._size, len(blob), size, blob[8])
        self._by_digest[digest] = len(self.entries)
        self.entries.append(entry)
        self._parts.append(blob)
        self._size += len(blob)
        return entry

    def blob(self, digest: bytes) -> bytes | None:
        """The blob of a chunk added here, None if not."""
        i = self._by_digest.get(digest)
        return None if i is None else self._parts[i + 1]

    def finish(self) -> tuple[bytes, bytes]:
        """``(name, data)`` of the finished pack: blobs, description, trailer."""
        plain = bytearray(_DESC.pack(PACK_DESCRIPTION_MAGIC, len(self.entries), 0))
        for e in self.entries:
            plain += _ENTRY.pack(e.digest, e.offset, e.length, e.size, e.flags)
        description = self._codec.encode(bytes(plain))
        data = b"".join([*self._parts, description, _TRAILER.pack(PACK_MAGIC, len(description), 0)])
        return hashlib.sha256(data).digest(), data


def parse_description(
    codec: ChunkCodec, blob: bytes, *, blobs_end: int, name: str
) -> list[PackEntry]:
    """The entries of a pack's description blob; every one checked against the pack.

    ``blobs_end``: where the description starts (no blob may reach past it).
    Hostile input: counts, offsets and lengths are bounded, entries must be in
    order and disjoint, so a forged description cannot point a read outside the
    pack or make us allocate more than the description itself holds.
    """
    try:
        plain = codec.decode(blob, name=f"{name} description")
    except CorruptChunkError as exc:
        raise CorruptIndexError(str(exc)) from exc
    if len(plain) < _DESC.size:
        raise CorruptIndexError(f"{name}: description shorter than its header")
    magic, count, reserved = _DESC.unpack_from(plain)
    if magic != PACK_DESCRIPTION_MAGIC or reserved:
        raise CorruptIndexError(f"{name}: bad description header")
    if count > MAX_PACK_ENTRIES or len(plain) != _DESC.size + count * _ENTRY.size:
        raise CorruptIndexError(f"{name}: description size does not match {count} entries")
    entries: list[PackEntry] = []
    end = len(_HEADER_BYTES)
    for i in range(count):
        at = _DESC.size + i * _ENTRY.size
        digest, offset, length, size, flags = _ENTRY.unpack_from(plain, at)
        if (
            digest == ZERO_DIGEST
            or offset < end
            or length < BLOB_HEADER.size
            or offset + length > blobs_end
            or size > MAX_CHUNK_SIZE
            or flags & ~BLOB_FLAGS_KNOWN
        ):
            raise CorruptIndexError(f"{name}: description entry {i} is out of bounds")
        end = offset + length
        entries.append(PackEntry(digest, offset, length, size, flags))
    return entries


def read_pack_entries(backend: Backend, codec: ChunkCodec, name: bytes) -> list[PackEntry]:
    """The verified description of the stored pack ``name`` (two ranged reads).

    :raises ObjectNotFoundError: no such pack.
    :raises CorruptIndexError: the pack or its description is damaged or forged.
    """
    key = pack_key(name)
    label = f"pack {name.hex()}"
    size = backend.stat(key).size
    if not len(_HEADER_BYTES) + _TRAILER.size <= size <= MAX_PACK_SIZE:
        raise CorruptIndexError(f"{label}: {size} bytes is no pack size")
    trailer = backend.get_range(key, size - _TRAILER.size, _TRAILER.size)
    if len(trailer) != _TRAILER.size:
        raise CorruptIndexError(f"{label}: shorter than it was a moment ago")
    magic, desc_size, reserved = _TRAILER.unpack(trailer)
    blobs_end = size - _TRAILER.size - desc_size
    if (
        magic != PACK_MAGIC
        or reserved
        or desc_size > _MAX_DESCRIPTION
        or blobs_end < len(_HEADER_BYTES)
    ):
        raise CorruptIndexError(f"{label}: bad trailer")
    description = backend.get_range(key, blobs_end, desc_size)
    if len(description) != desc_size:
        raise CorruptIndexError(f"{label}: description cut short")
    return parse_description(codec, description, blobs_end=blobs_end, name=label)


def verify_pack(backend: Backend, codec: ChunkCodec, name: bytes) -> list[PackEntry]:
    """Read the whole pack: its name must be its hash, its header intact; entries."""
    key = pack_key(name)
    if backend.stat(key).size > MAX_PACK_SIZE:
        raise CorruptIndexError(f"pack {name.hex()}: too large")
    data = backend.get(key)
    if hashlib.sha256(data).digest() != name or not data.startswith(_HEADER_BYTES):
        raise CorruptIndexError(f"pack {name.hex()}: content does not match its name")
    return read_pack_entries(backend, codec, name)
