"""Chunks verify found damaged, moved aside: a record and the bad bytes, never deleted.

In store format 2 a chunk lives inside an immutable pack beside healthy chunks, so
"moving it aside" cannot mean renaming a file (as PBS does with ``.bad`` chunk
files). Instead verify writes, per damaged *location* (digest and pack):

``bad/data/<id>``
    the bytes found at the location (the raw blob as stored, cut short or empty
    when the pack was; never interpreted), kept for inspection;
``bad/records/<id>``
    one blob (encrypted in an encrypted store) whose plaintext is JSON: digest,
    pack, offset, length, size, reason, time and the data key. Put after the data,
    so a record never names data a crash lost.

What a record does: every ``Datastore`` treats a location a record names as absent.
A writer that produces the same digest stores a new copy (healing the store, as a
later PBS backup does), a reader takes another indexed copy of the digest or fails
naming the record, and garbage collection condemns the bad location like an
unreferenced one (its bytes are in ``bad/data/``), so a later run repacks the pack
without it. Records are never deleted by the tool.

Threat: records are storage content. In an encrypted store the record is
authenticated, in a plain one anyone with write access can plant one; a record can
only make us store a chunk once more or read another copy, never skip a chunk, so a
forged record costs space, not data. Sizes are bounded before reading and every
field is typed; a record that does not parse is reported and ignored.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final

from pvebackup.api.errors import CorruptChunkError, CorruptIndexError, ObjectNotFoundError
from pvebackup.store.backends.base import Backend
from pvebackup.store.blob import ChunkCodec
from pvebackup.store.chunkindex import (
    INDEX_PREFIX,
    MAX_INDEX_OBJECT_SIZE,
    ChunkLocation,
    index_name_from_key,
    parse_index_object,
)
from pvebackup.store.formats import DIGEST_SIZE, MAX_CHUNK_SIZE
from pvebackup.store.pack import pack_key

__all__ = [
    "BAD_DATA_PREFIX",
    "BAD_RECORDS_PREFIX",
    "BadChunk",
    "BadMap",
    "bad_map",
    "good_locations",
    "index_locations",
    "move_aside",
    "parse_bad_record",
    "read_bad_chunks",
]

BAD_RECORDS_PREFIX: Final = "bad/records/"
BAD_DATA_PREFIX: Final = "bad/data/"
RECORD_FORMAT: Final = "pvebackup-bad-chunk"
MAX_BAD_RECORD_SIZE: Final = 64 * 1024
_MAX_REASON: Final = 2000

BadMap = dict[bytes, dict[bytes, str]]
"""digest -> {pack: reason} of the locations moved aside."""


@dataclass(frozen=True, slots=True)
class BadChunk:
    """One location moved aside."""

    key: str
    digest: bytes
    pack: bytes
    offset: int
    length: int
    size: int
    reason: str
    time: float
    data_key: str
    data_length: int


def _encode(codec: ChunkCodec, b: BadChunk) -> bytes:
    doc = {
        "format": RECORD_FORMAT,
        "version": 1,
        "digest": b.digest.hex(),
        "pack": b.pack.hex(),
        "offset": b.offset,
        "length": b.length,
        "size": b.size,
        "reason": b.reason,
        "time": b.time,
        "data": b.data_key,
        "data_length": b.data_length,
    }
    return codec.encode(json.dumps(doc, sort_keys=True).encode("utf-8"))


def parse_bad_record(codec: ChunkCodec, key: str, data: bytes) -> BadChunk:
    """A record read from the store (hostile: every field checked)."""
    if len(data) > MAX_BAD_RECORD_SIZE:
        raise CorruptIndexError(f"{key}: too large for a bad-chunk record")
    try:
        doc: Any = json.loads(codec.decode(data, name=key))
        if not isinstance(doc, dict) or doc.get("format") != RECORD_FORMAT:
            raise ValueError("not a bad-chunk record")
        if doc.get("version") != 1:
            raise ValueError(f"unknown version {doc.get('version')!r:.20}")
        ints = [doc[k] for k in ("offset", "length", "size", "data_length")]
        if not all(type(i) is int and 0 <= i < 1 << 40 for i in ints):
            raise ValueError("offsets and sizes must be integers")
        digest, pack = bytes.fromhex(doc["digest"]), bytes.fromhex(doc["pack"])
        if len(digest) != DIGEST_SIZE or len(pack) != DIGEST_SIZE:
            raise ValueError("digest and pack must be 32 bytes")
        reason, data_key, when = doc["reason"], doc["data"], doc["time"]
        if not isinstance(reason, str) or not isinstance(data_key, str):
            raise ValueError("reason and data must be strings")
        if not data_key.startswith(BAD_DATA_PREFIX) or type(when) not in (int, float):
            raise ValueError("bad data key or time")
    except CorruptChunkError as exc:
        raise CorruptIndexError(str(exc)) from exc
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise CorruptIndexError(f"{key}: {exc}") from exc
    offset, length, size, data_length = ints
    return BadChunk(key, digest, pack, offset, length, size, reason[:_MAX_REASON],
                    float(when), data_key, data_length)


def read_bad_chunks(
    backend: Backend, codec: ChunkCodec, *, on_error: Callable[[str, str], None] | None = None
) -> list[BadChunk]:
    """Every record in the store; one that does not parse goes to ``on_error`` and is
    skipped (ignoring it can only make us trust a location verify distrusted, which
    reads still check)."""
    out: list[BadChunk] = []
    for key in sorted(backend.list(BAD_RECORDS_PREFIX)):
        try:
            if backend.stat(key).size > MAX_BAD_RECORD_SIZE:
                raise CorruptIndexError(f"{key}: too large for a bad-chunk record")
            out.append(parse_bad_record(codec, key, backend.get(key)))
        except ObjectNotFoundError:
            continue
        except CorruptIndexError as exc:
            if on_error is not None:
                on_error(key, str(exc))
    return out


def bad_map(records: Collection[BadChunk]) -> BadMap:
    out: BadMap = {}
    for r in records:
        out.setdefault(r.digest, {})[r.pack] = r.reason
    return out


def move_aside(
    backend: Backend,
    codec: ChunkCodec,
    digest: bytes,
    loc: ChunkLocation,
    reason: str,
    *,
    now: float | None = None,
) -> BadChunk:
    """Record ``loc`` of ``digest`` as bad, with the bytes found there (data first)."""
    try:
        # Bounded: an index entry's length is checked to fit a blob when parsed.
        raw = backend.get_range(pack_key(loc.pack), loc.offset, min(loc.length, 2 * MAX_CHUNK_SIZE))
    except ObjectNotFoundError:
        raw = b""  # the pack is gone: the record still names where the chunk was
    ident = secrets.token_hex(16)
    record = BadChunk(
        key=f"{BAD_RECORDS_PREFIX}{ident}",
        digest=digest,
        pack=loc.pack,
        offset=loc.offset,
        length=loc.length,
        size=loc.size,
        reason=reason[:_MAX_REASON],
        time=time.time() if now is None else now,
        data_key=f"{BAD_DATA_PREFIX}{ident}",
        data_length=len(raw),
    )
    backend.put(record.data_key, raw, overwrite=False, durable=True)
    backend.put(record.key, _encode(codec, record), overwrite=False, durable=True)
    return record


def index_locations(
    backend: Backend, codec: ChunkCodec, digests: Collection[bytes]
) -> dict[bytes, list[ChunkLocation]]:
    """Every location the store's index objects give for ``digests`` (read fresh:
    the local cache keeps one location per digest). One pass over the index."""
    out: dict[bytes, list[ChunkLocation]] = {}
    if not digests:
        return out
    for key in sorted(backend.list(INDEX_PREFIX)):
        name = index_name_from_key(key)
        if name is None:
            continue
        try:
            if backend.stat(key).size > MAX_INDEX_OBJECT_SIZE:
                raise CorruptIndexError(f"{key}: too large")
            data = backend.get(key)
        except ObjectNotFoundError:
            continue  # compacted meanwhile; its entries are in the new object
        for digest, loc in parse_index_object(codec, data, name).entries:
            if digest in digests:
                found = out.setdefault(digest, [])
                if loc not in found:
                    found.append(loc)
    return out


def good_locations(
    backend: Backend, codec: ChunkCodec, bad: Mapping[bytes, Mapping[bytes, str]]
) -> dict[bytes, ChunkLocation]:
    """For each digest with a bad location: another indexed location, if one exists."""
    out: dict[bytes, ChunkLocation] = {}
    for digest, locs in index_locations(backend, codec, set(bad)).items():
        good = [loc for loc in locs if loc.pack not in bad[digest]]
        if good:
            out[digest] = good[-1]
    return out
