"""Writer sessions and condemned-chunk records: the objects garbage collection reads.

``sessions/<session hex>``: a small JSON object a writer puts before its first
dedup lookup and overwrites as a heartbeat (``started``, ``heartbeat``, ``ttl``,
seconds since the epoch; ``pins``: the snapshots the writer builds on, which
removal refuses to remove); deleted when the writer ends. A session whose
``heartbeat + ttl`` has passed is dead (the writer crashed or hung).

``gc/condemned/<hex>``: a blob (encrypted in an encrypted store) of
``GC_RECORD_HEADER`` and ``GC_RECORD_ENTRY`` rows, written by ``gc`` for chunk
locations no snapshot referenced (and packs no index object named) at
``created``. See docs/design.md, "Garbage collection".

Threat: both are storage content. Sizes are bounded before reading, types and
counts checked exactly; a session object that does not parse is reported and
ignored by GC (only someone with write access can plant it, and they could
delete the data outright).
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from pvebackup.api.errors import CorruptChunkError, CorruptIndexError, ObjectNotFoundError
from pvebackup.store.backends.base import Backend
from pvebackup.store.blob import ChunkCodec
from pvebackup.store.formats import (
    BLOB_HEADER,
    BLOB_TAG_SIZE,
    DIGEST_SIZE,
    GC_RECORD_ENTRY,
    GC_RECORD_HEADER,
    GC_RECORD_MAGIC,
    MAX_CHUNK_SIZE,
    MAX_GC_RECORD_ENTRIES,
)

__all__ = [
    "CONDEMNED_PREFIX",
    "SESSIONS_PREFIX",
    "MAX_PINS",
    "MAX_SESSION_SIZE",
    "SESSION_TTL",
    "CondemnedRecord",
    "SessionInfo",
    "encode_record",
    "encode_session",
    "load_condemned_digests",
    "parse_record",
    "parse_session",
    "read_records",
    "session_key",
]

SESSIONS_PREFIX: Final = "sessions/"
CONDEMNED_PREFIX: Final = "gc/condemned/"
SESSION_TTL: Final = 3600.0
"""A writer heartbeats every quarter of this while it inserts chunks."""
MAX_SESSION_SIZE: Final = 4096
MAX_RECORD_SIZE: Final = BLOB_HEADER.size + MAX_CHUNK_SIZE + BLOB_TAG_SIZE
_HDR = GC_RECORD_HEADER.struct
_ENT = GC_RECORD_ENTRY.struct


def session_key(session: bytes) -> str:
    return f"{SESSIONS_PREFIX}{session.hex()}"


@dataclass(frozen=True, slots=True)
class SessionInfo:
    session: str
    started: float
    heartbeat: float
    ttl: float
    pins: tuple[str, ...] = ()

    def alive(self, now: float) -> bool:
        return self.heartbeat + self.ttl >= now


MAX_PINS: Final = 32
"""A writer pins one base per guest it backs up at once: a few."""


def encode_session(
    session: bytes, started: float, heartbeat: float, ttl: float, pins: Iterable[str] = ()
) -> bytes:
    doc: dict[str, Any] = {
        "session": session.hex(), "started": started, "heartbeat": heartbeat, "ttl": ttl
    }
    pinned = sorted(pins)
    if pinned:
        if len(pinned) > MAX_PINS:
            raise ValueError(f"{len(pinned)} pinned snapshots, at most {MAX_PINS}")
        doc["pins"] = pinned
    return json.dumps(doc, sort_keys=True).encode("ascii")


def parse_session(data: bytes) -> SessionInfo:
    """A session object; ``CorruptIndexError`` unless every field is right."""
    if len(data) > MAX_SESSION_SIZE:
        raise CorruptIndexError("session object too large")
    try:
        doc: Any = json.loads(data)
        if not isinstance(doc, dict) or not isinstance(doc.get("session"), str):
            raise ValueError("not a session object")
        times = [doc[k] for k in ("started", "heartbeat", "ttl")]
        if not all(
            isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t)
            for t in times
        ):
            raise ValueError("times must be finite numbers")
        pins = doc.get("pins", [])
        if not isinstance(pins, list) or len(pins) > MAX_PINS or not all(
            isinstance(p, str) and 0 < len(p) <= 128 for p in pins
        ):
            raise ValueError("pins must be a short list of snapshot names")
        started, heartbeat, ttl = (float(t) for t in times)
        return SessionInfo(doc["session"], started, heartbeat, ttl, tuple(pins))
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise CorruptIndexError(f"session object: {exc}") from exc


@dataclass(frozen=True, slots=True)
class CondemnedRecord:
    key: str
    created: float
    pairs: frozenset[tuple[bytes, bytes]]
    """(digest, pack); digest all zero: the whole pack."""


def encode_record(
    codec: ChunkCodec, created: float, pairs: Iterable[tuple[bytes, bytes]]
) -> list[tuple[str, bytes]]:
    """``(key, stored bytes)`` of the record(s) holding ``pairs`` (split to fit a blob)."""
    items = sorted(pairs)
    out: list[tuple[str, bytes]] = []
    for start in range(0, len(items), MAX_GC_RECORD_ENTRIES):
        part = items[start : start + MAX_GC_RECORD_ENTRIES]
        plain = bytearray(_HDR.pack(GC_RECORD_MAGIC, created, len(part), 0))
        for digest, pack in part:
            plain += _ENT.pack(digest, pack)
        out.append((f"{CONDEMNED_PREFIX}{secrets.token_hex(16)}", codec.encode(bytes(plain))))
    return out


def parse_record(codec: ChunkCodec, key: str, data: bytes) -> CondemnedRecord:
    """A condemned record read from the store (hostile: everything checked)."""
    if len(data) > MAX_RECORD_SIZE:
        raise CorruptIndexError(f"{key}: too large")
    try:
        plain = codec.decode(data, name=key)
    except CorruptChunkError as exc:
        raise CorruptIndexError(str(exc)) from exc
    if len(plain) < _HDR.size:
        raise CorruptIndexError(f"{key}: shorter than its header")
    magic, created, count, reserved = _HDR.unpack_from(plain)
    if magic != GC_RECORD_MAGIC or reserved or not math.isfinite(created):
        raise CorruptIndexError(f"{key}: bad header")
    if count > MAX_GC_RECORD_ENTRIES or len(plain) != _HDR.size + count * _ENT.size:
        raise CorruptIndexError(f"{key}: size does not match {count} entries")
    pairs = frozenset(
        _ENT.unpack_from(plain, _HDR.size + i * _ENT.size) for i in range(count)
    )
    return CondemnedRecord(key, created, pairs)


def read_records(backend: Backend, codec: ChunkCodec) -> Iterator[CondemnedRecord]:
    for key in sorted(backend.list(CONDEMNED_PREFIX)):
        try:
            if backend.stat(key).size > MAX_RECORD_SIZE:
                raise CorruptIndexError(f"{key}: too large")
            data = backend.get(key)
        except ObjectNotFoundError:
            continue  # processed by a GC meanwhile
        yield parse_record(codec, key, data)


def load_condemned_digests(backend: Backend, codec: ChunkCodec) -> set[bytes]:
    """Every digest a condemned record names (what a new writer must not reuse)."""
    zero = bytes(DIGEST_SIZE)
    out: set[bytes] = set()
    for record in read_records(backend, codec):
        out.update(d for d, _ in record.pairs if d != zero)
    return out


