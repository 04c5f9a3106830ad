"""The datastore: chunks and snapshots on one backend, with one optional key.

Key layout on the backend::

    config.json                                   store config (format, chunk size, key check)
    chunks/<hex[0:2]>/<hex digest>                one blob per chunk
    snapshots/<vm|ct>/<vmid>/<time>/<file>        indexes, blobs, manifest.json (last)

Opening checks the config against the key before anything else is read:
an encrypted store without a key is ``MissingKeyError``, with another key
``WrongKeyError`` (both name the fingerprints), a key for a plain store
``WrongKeyError`` too.

Threads: a ``Datastore`` is safe to share between threads (the codec keeps its
zstd/AES contexts per thread, backends are thread-safe). Split the work as you
like: ``prepare_chunk`` (CPU only: digest, compress, encrypt) on worker threads,
``store_prepared`` wherever; or ``insert_chunk`` (checks existence first, so a
chunk already stored is neither compressed nor encrypted again). Processes:
several writers may insert into one store at once; chunk inserts are idempotent
and atomic (``put(overwrite=False)``), snapshots of different guests never share
a key.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from pvebackup.api.errors import (
    CorruptChunkError,
    CorruptIndexError,
    MissingKeyError,
    ObjectNotFoundError,
    StateError,
    VolumeNotFoundError,
    WrongKeyError,
)
from pvebackup.api.types import GuestType
from pvebackup.store.backends.base import Backend
from pvebackup.store.blob import (
    DEFAULT_COMPRESSION_LEVEL,
    BytesLike,
    ChunkCodec,
    PreparedChunk,
    is_zero,
)
from pvebackup.store.formats import (
    BLOB_HEADER,
    CONFIG_FORMAT,
    DIGEST_SIZE,
    FORMAT_VERSION,
    MAX_CONFIG_SIZE,
    MAX_MANIFEST_SIZE,
    ZERO_DIGEST,
)
from pvebackup.store.index import check_chunk_size
from pvebackup.store.keys import EncryptionKey
from pvebackup.store.snapshot import (
    MANIFEST_NAME,
    SNAPSHOTS_PREFIX,
    Manifest,
    Snapshot,
    SnapshotId,
    SnapshotWriter,
)

__all__ = [
    "CHUNKS_PREFIX",
    "CONFIG_KEY",
    "DEFAULT_CHUNK_SIZE",
    "Datastore",
    "InsertResult",
    "StoreConfig",
]

CONFIG_KEY: Final = "config.json"
CHUNKS_PREFIX: Final = "chunks/"
DEFAULT_CHUNK_SIZE: Final = 256 * 1024
"""See docs/design.md, "Chunk size": scattered small writes must not cost much."""
_MIN_BLOB: Final = BLOB_HEADER.size
_MIN_LEVEL: Final = -7  # zstd's fast levels go lower; nobody needs them for backups
_MAX_LEVEL: Final = 22


@dataclass(frozen=True, slots=True)
class InsertResult:
    """Outcome of a chunk insert.

    ``stored_size``: size of the chunk's blob in the store (0 for a zero chunk),
    whether this call wrote it or found it. ``is_new``: this call wrote it.
    """

    digest: bytes
    stored_size: int
    is_new: bool


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """``config.json``: what a store is, fixed at creation."""

    store_id: str
    created: int
    chunk_size: int
    compression_level: int
    encrypted: bool
    key_fingerprint: str | None
    key_check: str | None

    def to_bytes(self) -> bytes:
        doc = {
            "format": CONFIG_FORMAT,
            "version": FORMAT_VERSION,
            "store_id": self.store_id,
            "created": self.created,
            "chunk_size": self.chunk_size,
            "compression_level": self.compression_level,
            "encrypted": self.encrypted,
            "key_fingerprint": self.key_fingerprint,
            "key_check": self.key_check,
        }
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes) -> StoreConfig:
        """Parse ``config.json``; ``CorruptIndexError`` if it is not one, field by field.

        Hostile input: a string for an int, a list for a dict, NaN, a nesting bomb.
        """

        def typed(value: Any, t: type | tuple[type, ...]) -> Any:
            if not isinstance(value, t) or (t is int and isinstance(value, bool)):
                raise TypeError(f"{value!r:.80} is not {t}")
            return value

        if len(data) > MAX_CONFIG_SIZE:
            raise CorruptIndexError(f"{CONFIG_KEY}: {len(data)} bytes, too large for a config")
        try:
            doc: Any = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != CONFIG_FORMAT:
                raise ValueError("not a pvebackup store config")
            if doc.get("version") != FORMAT_VERSION:
                raise ValueError(f"unsupported store version {doc.get('version')!r:.40}")
            level = typed(doc["compression_level"], int)
            if not _MIN_LEVEL <= level <= _MAX_LEVEL:
                raise ValueError(f"compression level {level} out of range")
            created = typed(doc["created"], int)
            if not 0 <= created < 1 << 62:
                raise ValueError(f"created {created} out of range")
            cfg = cls(
                store_id=str(uuid.UUID(typed(doc["store_id"], str))),
                created=created,
                chunk_size=check_chunk_size(typed(doc["chunk_size"], int)),
                compression_level=level,
                encrypted=typed(doc["encrypted"], bool),
                key_fingerprint=typed(doc["key_fingerprint"], (str, type(None))),
                key_check=typed(doc["key_check"], (str, type(None))),
            )
        except (KeyError, TypeError, ValueError, RecursionError) as exc:
            raise CorruptIndexError(f"{CONFIG_KEY}: {exc}") from exc
        if cfg.encrypted and not (
            isinstance(cfg.key_check, str) and isinstance(cfg.key_fingerprint, str)
        ):
            raise CorruptIndexError(f"{CONFIG_KEY}: encrypted store without key check")
        return cfg


class Datastore:
    """A chunk store. Make one with ``create`` or ``open``, not the constructor."""

    def __init__(self, backend: Backend, config: StoreConfig, key: EncryptionKey | None):
        self.backend = backend
        self.config = config
        self._key = key
        self.codec = ChunkCodec(key, level=config.compression_level)

    def __repr__(self) -> str:
        enc = f", key={self._key.fingerprint}" if self._key else ""
        return f"Datastore({self.backend!r}, id={self.config.store_id}{enc})"

    # --- opening ------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        backend: Backend,
        *,
        key: EncryptionKey | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        compression_level: int = DEFAULT_COMPRESSION_LEVEL,
    ) -> Datastore:
        """Initialise a new store on ``backend`` (``StateError`` if one exists)."""
        store_id = str(uuid.uuid4())
        config = StoreConfig(
            store_id=store_id,
            created=int(time.time()),
            chunk_size=check_chunk_size(chunk_size),
            compression_level=compression_level,
            encrypted=key is not None,
            key_fingerprint=None if key is None else key.fingerprint,
            key_check=None if key is None else key.check_value(store_id),
        )
        if not backend.put(CONFIG_KEY, config.to_bytes(), overwrite=False):
            raise StateError(f"{backend!r} holds a store already")
        return cls(backend, config, key)

    @classmethod
    def open(cls, backend: Backend, *, key: EncryptionKey | None = None) -> Datastore:
        """Open the store on ``backend``; checks ``key`` before touching any data."""
        try:
            raw = _get_bounded(backend, CONFIG_KEY, MAX_CONFIG_SIZE)
        except ObjectNotFoundError as exc:
            raise ObjectNotFoundError(f"no store in {backend!r} ({CONFIG_KEY} missing)") from exc
        config = StoreConfig.from_bytes(raw)
        if config.encrypted:
            if key is None:
                raise MissingKeyError(
                    f"the store is encrypted (key {config.key_fingerprint}); no key given"
                )
            if key.check_value(config.store_id) != config.key_check:
                raise WrongKeyError(
                    f"wrong key: the store needs key {config.key_fingerprint}, "
                    f"given key {key.fingerprint}"
                )
        elif key is not None:
            raise WrongKeyError(f"the store is not encrypted, but key {key.fingerprint} was given")
        return cls(backend, config, key)

    @property
    def encrypted(self) -> bool:
        return self._key is not None

    @property
    def key(self) -> EncryptionKey | None:
        """The store's key (``None`` for a plain store), for signing provider records."""
        return self._key

    @property
    def chunk_size(self) -> int:
        """The store's default chunk size for new indexes."""
        return self.config.chunk_size

    # --- chunks -------------------------------------------------------------------

    @staticmethod
    def chunk_key(digest: bytes) -> str:
        """Backend key of a chunk: ``chunks/<first 2 hex digits>/<64 hex digits>``."""
        if len(digest) != DIGEST_SIZE:
            raise ValueError(f"a digest has {DIGEST_SIZE} bytes")
        h = digest.hex()
        return f"{CHUNKS_PREFIX}{h[:2]}/{h}"

    def prepare_chunk(self, data: BytesLike) -> PreparedChunk:
        """Digest and blob of ``data``: CPU only, no backend; for worker threads."""
        return self.codec.prepare(data)

    def _probe(self, key: str) -> int:
        """Size of the stored object ``key``, -1 if missing."""
        try:
            return self.backend.stat(key).size
        except ObjectNotFoundError:
            return -1

    def _write(self, key: str, digest: bytes, blob: bytes, probed: int) -> InsertResult:
        # An existing object shorter than a header is a leftover of a crash between
        # a non-durable put and sync(): replace it instead of trusting it.
        new = self.backend.put(key, blob, overwrite=probed >= 0, durable=False)
        return InsertResult(digest, len(blob), new)

    def store_prepared(self, chunk: PreparedChunk) -> InsertResult:
        """Insert a prepared chunk (idempotent; a zero chunk is not stored)."""
        if chunk.blob is None:
            return InsertResult(ZERO_DIGEST, 0, False)
        key = self.chunk_key(chunk.digest)
        size = self._probe(key)
        if size >= _MIN_BLOB:
            return InsertResult(chunk.digest, size, False)
        return self._write(key, chunk.digest, chunk.blob, size)

    def insert_chunk(self, data: BytesLike) -> InsertResult:
        """Digest ``data`` and store it unless present (then it is not even encoded)."""
        if is_zero(data):
            return InsertResult(ZERO_DIGEST, 0, False)
        digest = self.codec.digest(data)
        key = self.chunk_key(digest)
        size = self._probe(key)
        if size >= _MIN_BLOB:
            return InsertResult(digest, size, False)
        return self._write(key, digest, self.codec.encode(data), size)

    def has_chunk(self, digest: bytes) -> bool:
        """True if the chunk is stored (always for ``ZERO_DIGEST``)."""
        return digest == ZERO_DIGEST or self._probe(self.chunk_key(digest)) >= _MIN_BLOB

    def read_chunk(self, digest: bytes, size: int | None = None) -> bytes:
        """The verified plaintext of chunk ``digest``.

        ``size`` is the expected length (required for ``ZERO_DIGEST``, which yields
        zeros). A missing, damaged or wrong-sized chunk is ``CorruptChunkError``
        naming the digest: callers read digests from indexes, so missing is damage.
        """
        if digest == ZERO_DIGEST:
            if size is None:
                raise ValueError("the size of a zero chunk must be given")
            return bytes(size)
        try:
            blob = self.backend.get(self.chunk_key(digest))
        except ObjectNotFoundError as exc:
            raise CorruptChunkError(f"chunk {digest.hex()}: missing from the store") from exc
        data = self.codec.decode_chunk(blob, digest)
        if size is not None and len(data) != size:
            raise CorruptChunkError(
                f"chunk {digest.hex()}: {len(data)} bytes, the index expects {size}"
            )
        return data

    # --- snapshots ----------------------------------------------------------------

    def new_snapshot(
        self,
        snapshot: SnapshotId,
        *,
        bitmap_id: str | None = None,
        parent: SnapshotId | None = None,
        chunk_size: int | None = None,
    ) -> SnapshotWriter:
        """A writer for a new snapshot (``SnapshotExistsError`` if the name is taken)."""
        return SnapshotWriter(
            self.backend,
            self.codec,
            self._key,
            snapshot,
            chunk_size=self.chunk_size if chunk_size is None else chunk_size,
            bitmap_id=bitmap_id,
            parent=parent,
        )

    def open_snapshot(self, snapshot: SnapshotId) -> Snapshot:
        """The committed snapshot, manifest verified (``VolumeNotFoundError`` if none)."""
        key = snapshot.prefix + MANIFEST_NAME
        try:
            raw = _get_bounded(self.backend, key, MAX_MANIFEST_SIZE)
        except ObjectNotFoundError as exc:
            raise VolumeNotFoundError(f"no snapshot {snapshot} in the store") from exc
        manifest = Manifest.from_bytes(raw, self._key, name=f"snapshot {snapshot}")
        if manifest.snapshot != snapshot:
            raise CorruptIndexError(f"snapshot {snapshot}: manifest names {manifest.snapshot}")
        return Snapshot(self.backend, self.codec, manifest, hashlib.sha256(raw).hexdigest())

    def has_snapshot(self, snapshot: SnapshotId) -> bool:
        return self.backend.exists(snapshot.prefix + MANIFEST_NAME)

    def list_snapshots(
        self,
        guest_type: GuestType | None = None,
        vmid: int | None = None,
        *,
        on_skip: Callable[[str, str], None] | None = None,
    ) -> list[SnapshotId]:
        """Committed snapshots (those with a manifest), oldest first.

        A manifest under a prefix that is no snapshot name (``vm/100/2026-02-31T...``:
        an impossible date, written by someone else) is skipped, never fatal to the
        listing; ``on_skip(key prefix, reason)`` hears of each.
        """
        prefix = SNAPSHOTS_PREFIX
        if guest_type is not None:
            prefix += SnapshotId(guest_type, 1, 0).kind + "/"
            if vmid is not None:
                prefix += f"{vmid}/"
        found: list[SnapshotId] = []
        suffix = "/" + MANIFEST_NAME
        for key in self.backend.list(prefix):
            if not key.endswith(suffix):
                continue
            try:
                sid = SnapshotId.parse(key[len(SNAPSHOTS_PREFIX) : -len(suffix)])
            except ValueError as exc:
                if on_skip is not None:
                    on_skip(key[: -len(suffix)], str(exc))
                continue  # not ours: skip rather than fail the whole listing
            if vmid is None or sid.vmid == vmid:
                found.append(sid)
        return sorted(found, key=lambda s: (s.backup_time, s.kind, s.vmid))

    def remove_snapshot(self, snapshot: SnapshotId) -> None:
        """Drop a snapshot: the manifest first (it vanishes at once), then its files.

        Its chunks stay until garbage collection.
        """
        key = snapshot.prefix + MANIFEST_NAME
        if not self.backend.exists(key):
            raise VolumeNotFoundError(f"no snapshot {snapshot} in the store")
        self.backend.delete(key)
        self.backend.sync()
        for k in list(self.backend.list(snapshot.prefix)):
            self.backend.delete(k)

    def incomplete_snapshots(self) -> Iterator[tuple[str, float]]:
        """``(prefix, newest mtime)`` of every snapshot prefix without a manifest."""
        groups: dict[str, list[str]] = {}
        for key in self.backend.list(SNAPSHOTS_PREFIX):
            parts = key[len(SNAPSHOTS_PREFIX) :].split("/")
            if len(parts) < 4:
                continue
            groups.setdefault(SNAPSHOTS_PREFIX + "/".join(parts[:3]) + "/", []).append(key)
        for prefix, keys in groups.items():
            if prefix + MANIFEST_NAME in keys:
                continue
            newest = 0.0
            for k in keys:
                try:
                    newest = max(newest, self.backend.stat(k).mtime)
                except ObjectNotFoundError:
                    continue
            yield prefix, newest

    def cleanup_incomplete(self, *, min_age: float = 86400.0) -> list[str]:
        """Delete leftovers of snapshots that never got a manifest.

        Only prefixes whose newest file is older than ``min_age`` seconds, so that a
        backup still running is left alone. Returns the removed prefixes.
        """
        cutoff = time.time() - min_age
        removed: list[str] = []
        for prefix, newest in list(self.incomplete_snapshots()):
            if newest > cutoff:
                continue
            for k in list(self.backend.list(prefix)):
                self.backend.delete(k)
            removed.append(prefix)
        return removed


def _get_bounded(backend: Backend, key: str, limit: int) -> bytes:
    """``backend.get(key)``, refused before reading when the object exceeds ``limit``.

    A metadata object replaced by a huge file must not be read into memory whole.
    """
    size = backend.stat(key).size
    if size > limit:
        raise CorruptIndexError(f"{key}: {size} bytes, more than the {limit} it may have")
    data = backend.get(key)
    if len(data) > limit:  # it grew between stat and get
        raise CorruptIndexError(f"{key}: more than the {limit} bytes it may have")
    return data
