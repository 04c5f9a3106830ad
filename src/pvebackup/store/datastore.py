"""The datastore: chunks and snapshots on one backend, with one optional key.

Key layout on the backend (store format 2)::

    config.json                                   store config (format, chunk size, key check)
    packs/<hex[0:2]>/<sha256 hex>                 chunk blobs plus their description
    index/<sha256 hex>                            chunk index object: digest -> pack, offset
    snapshots/<vm|ct>/<vmid>/<time>/<file>        indexes, blobs, manifest.json (last)
    sessions/<hex>, gc/condemned/<hex>            writer sessions (with pins), GC records
    bad/records/<hex>, bad/data/<hex>             chunk locations verify moved aside

A datastore is one writer session: new chunks go into an open pack (in memory)
that is handed to a pack writer thread when it reaches ``pack_size`` (named and
put durably there, beside the chunk work); ``flush`` (called by
``SnapshotWriter.commit`` before the manifest) puts the open pack, waits for
the pack writer, and then puts one index object naming this session's packs.
Lookups go to a local cache of the index objects (``chunkindex``), refreshed
from the store on the first miss.

Opening checks the config against the key before anything else is read:
an encrypted store without a key is ``MissingKeyError``, with another key
``WrongKeyError`` (both name the fingerprints), a key for a plain store
``WrongKeyError`` too.

Threads: a ``Datastore`` is safe to share between threads (the codec keeps its
zstd/AES contexts per thread, backends are thread-safe). Split the work as you
like: ``prepare_chunk`` (CPU only: digest, compress, encrypt) on worker threads,
``store_prepared`` wherever; or ``insert_chunk`` (checks existence first, so a
chunk already stored is neither compressed nor encrypted again). Processes:
several writers may insert into one store at once; each writes its own packs
(two writers storing the same new chunk store it twice, harmless), snapshots of
different guests never share a key.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pvebackup.api.errors import (
    CorruptChunkError,
    IntegrityError,
    MissingKeyError,
    ObjectNotFoundError,
    StateError,
    WrongKeyError,
)
from pvebackup.kit.crashpoint import crash_point
from pvebackup.store import badchunk, chunkcache  # modules: chunkcache imports store first
from pvebackup.store.backends.base import Backend
from pvebackup.store.blob import (
    DEFAULT_COMPRESSION_LEVEL,
    BytesLike,
    ChunkCodec,
    PreparedChunk,
    is_zero,
)
from pvebackup.store.chunkindex import (
    INDEX_PREFIX,
    MAX_INDEX_OBJECT_SIZE,
    ChunkIndexCache,
    ChunkLocation,
    MemoryChunkIndex,
    encode_index_object,
    index_key,
    index_name_from_key,
    parse_index_object,
)
from pvebackup.store.formats import (
    MAX_CHUNK_INDEX_ENTRIES,
    MAX_CONFIG_SIZE,
    ZERO_DIGEST,
)
from pvebackup.store.gcrecord import (
    SESSION_TTL,
    encode_session,
    load_condemned_digests,
    session_key,
)
from pvebackup.store.index import check_chunk_size
from pvebackup.store.keys import EncryptionKey
from pvebackup.store.pack import (
    DEFAULT_PACK_SIZE,
    MAX_TARGET_PACK_SIZE,
    MIN_PACK_SIZE,
    PACKS_PREFIX,
    PackBuilder,
    PackEntry,
    pack_key,
    pack_name_from_key,
    read_pack_entries,
)
from pvebackup.store.readplan import plan_spans
from pvebackup.store.snapshot import (
    SnapshotId,
    SnapshotWriter,
)
from pvebackup.store.snapshotops import SnapshotOps
from pvebackup.store.storeconfig import CONFIG_KEY, StoreConfig, get_bounded

__all__ = [
    "CONFIG_KEY",
    "DEFAULT_CHUNK_SIZE",
    "Datastore",
    "InsertResult",
    "StoreConfig",
]

DEFAULT_CHUNK_SIZE: Final = 256 * 1024
"""See docs/design.md, "Chunk size": scattered small writes must not cost much."""
_PACK_ENTRY_LIMIT: Final = 65536
"""Most chunks per pack (compressible chunks are tiny): keeps descriptions small."""
_REFRESH_JOBS: Final = 8
"""Index objects read at once when the chunk index is refreshed."""


@dataclass(frozen=True, slots=True)
class InsertResult:
    """Outcome of a chunk insert.

    ``stored_size``: size of the chunk's blob in the store (0 for a zero chunk),
    whether this call wrote it or found it. ``is_new``: this call wrote it.
    """

    digest: bytes
    stored_size: int
    is_new: bool


class Datastore(SnapshotOps):
    """A chunk store. Make one with ``create`` or ``open``, not the constructor."""

    def __init__(
        self,
        backend: Backend,
        config: StoreConfig,
        key: EncryptionKey | None,
        *,
        index: ChunkIndexCache | None = None,
        cache_dir: Path | None = None,
    ):
        """``index``: the lookup cache to use; else, with ``cache_dir``, the persistent
        one in ``cache_dir/<store id>`` (the store id, so that a store made anew at
        the same place never meets the old one's entries); else one in memory."""
        self.backend = backend
        self.config = config
        self._key = key
        self.codec = ChunkCodec(key, level=config.compression_level)
        self.pack_size = config.pack_size
        self.session = secrets.token_bytes(16)
        """Random id of this writer session, recorded in its index objects."""
        if index is None:
            index = (MemoryChunkIndex() if cache_dir is None
                     else chunkcache.open_chunk_cache(cache_dir / config.store_id))
        self._index: ChunkIndexCache = index
        self._lock = threading.RLock()
        self._pack: PackBuilder | None = None
        # The full pack being put by the pack writer thread, and that put. Its chunks
        # count as present (a read finds their blob here) but no index object may
        # name it before the put returned: ``_collect_pack`` waits for it first.
        self._sealed: PackBuilder | None = None
        self._sealed_put: Future[bytes] | None = None
        self._pack_writer: ThreadPoolExecutor | None = None
        self._written: dict[bytes, ChunkLocation] = {}  # in durable packs, not yet indexed
        self._unindexed: list[tuple[bytes, list[PackEntry]]] = []
        self._unindexed_count = 0
        self._refreshed = False
        self.session_ttl = SESSION_TTL
        self._session_started: float | None = None
        self._last_beat = 0.0
        self._condemned: frozenset[bytes] = frozenset()
        self._bad: badchunk.BadMap | None = None  # loaded on first need
        self._healed: dict[bytes, ChunkLocation] = {}  # good copies of bad digests
        self._healed_scanned = False
        self._session_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._session_ready = False
        self._pins: dict[str, int] = {}  # snapshot prefix -> how many users

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
        pack_size: int = DEFAULT_PACK_SIZE,
        index: ChunkIndexCache | None = None,
        cache_dir: Path | None = None,
    ) -> Datastore:
        """Initialise a new store on ``backend`` (``StateError`` if one exists)."""
        if not MIN_PACK_SIZE <= pack_size <= MAX_TARGET_PACK_SIZE:
            raise ValueError(f"pack size {pack_size} out of range")
        store_id = str(uuid.uuid4())
        config = StoreConfig(
            store_id=store_id,
            created=int(time.time()),
            chunk_size=check_chunk_size(chunk_size),
            compression_level=compression_level,
            encrypted=key is not None,
            key_fingerprint=None if key is None else key.fingerprint,
            key_check=None if key is None else key.check_value(store_id),
            pack_size=pack_size,
        )
        if not backend.put(CONFIG_KEY, config.to_bytes(), overwrite=False):
            raise StateError(f"{backend!r} holds a store already")
        return cls(backend, config, key, index=index, cache_dir=cache_dir)

    @classmethod
    def open(
        cls,
        backend: Backend,
        *,
        key: EncryptionKey | None = None,
        index: ChunkIndexCache | None = None,
        cache_dir: Path | None = None,
    ) -> Datastore:
        """Open the store on ``backend``; checks ``key`` before touching any data."""
        try:
            raw = get_bounded(backend, CONFIG_KEY, MAX_CONFIG_SIZE)
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
        return cls(backend, config, key, index=index, cache_dir=cache_dir)

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

    def prepare_chunk(self, data: BytesLike) -> PreparedChunk:
        """Digest and blob of ``data``: CPU only, no backend; for worker threads."""
        return self.codec.prepare(data)

    # --- writer session (see docs/design.md, "Garbage collection") --------------------

    def _ensure_session(self) -> None:
        """Register this writer before its first dedup lookup; heartbeat later on.

        Order matters (GC relies on it): the session object (its start time) is
        visible first, then the condemned records are read, then the index, so
        a chunk condemned before we started is never deduplicated against, and
        one condemned later is not deleted while we live.
        """
        now = time.time()
        if self._session_ready:
            if now - self._last_beat > self.session_ttl / 4:
                with self._lock:
                    self._beat(now)
            return
        with self._session_lock:  # other threads wait until the session is ready
            if self._session_ready:
                return
            with self._lock:
                self._session_started = now
                self._beat(now)
            condemned = load_condemned_digests(self.backend, self.codec)
            with self._lock:
                self._condemned = frozenset(condemned)
            self._bad_map()
            self.refresh_index(check_vanished=True)
            self._session_ready = True

    def _beat(self, now: float) -> None:
        assert self._session_started is not None
        self.backend.put(
            session_key(self.session),
            encode_session(
                self.session, self._session_started, now, self.session_ttl, self._pins
            ),
            overwrite=True,
            durable=True,
        )
        self._last_beat = now

    def pin_snapshot(self, snapshot: SnapshotId) -> None:
        """Name ``snapshot`` in this writer's session object: ``remove_snapshot`` in
        any process refuses it while the session lives (a running backup's base)."""
        self._ensure_session()
        with self._lock:
            self._pins[snapshot.prefix] = self._pins.get(snapshot.prefix, 0) + 1
            self._beat(time.time())

    def unpin_snapshot(self, snapshot: SnapshotId) -> None:
        with self._lock:
            n = self._pins.pop(snapshot.prefix, 0) - 1
            if n > 0:
                self._pins[snapshot.prefix] = n
            if self._session_started is not None:
                self._beat(time.time())

    def _check_session(self) -> None:
        """Before a manifest: a session silent past its TTL may have been taken for dead."""
        with self._lock:
            if self._session_started is None:
                return
            now = time.time()
            if now - self._last_beat > self.session_ttl:
                raise StateError(
                    f"writer session {self.session.hex()} was silent for "
                    f"{now - self._last_beat:.0f} s (more than its {self.session_ttl:.0f} s): "
                    "garbage collection may have removed chunks it reused; back up again"
                )
            self._beat(now)

    def close(self) -> None:
        """End the writer session: write what is open, drop the session object.

        The chunk index cache is saved (a persistent one stays open and locked:
        the store may be used again; ``close_cache`` lets it go)."""
        with self._lock:
            try:
                self._write_pack()
                self._collect_pack()
            finally:
                if self._pack_writer is not None:
                    self._pack_writer.shutdown(wait=True)
                    self._pack_writer = None
            self._write_index_object()
            self._index.save()
            if self._session_started is not None:
                self.backend.delete(session_key(self.session))
                self._session_started = None
                self._session_ready = False
            self._pins.clear()

    def close_cache(self) -> None:
        """Save the chunk index cache and release it (its lock) for other processes;
        the store goes on with an empty one in memory."""
        with self._lock:
            self._index.close()
            self._index = MemoryChunkIndex()

    def _known(self, digest: bytes) -> int:
        """Stored size of the chunk's blob if this store has it, else -1 (lock held).

        A chunk garbage collection condemned counts as absent: it may be deleted
        once the sessions that could have seen it are gone, so a new copy is
        written (this resurrects it).
        """
        blob = self._pending_blob(digest)
        if blob is not None:
            return len(blob)
        loc = self._written.get(digest)
        if loc is None and digest not in self._condemned:
            loc = self._usable(digest, self._healed.get(digest) or self._index.lookup(digest))
        return -1 if loc is None else loc.length

    def _lookup_size(self, digest: bytes) -> int:
        self._ensure_session()
        with self._lock:
            size = self._known(digest)
            if size >= 0 or self._refreshed:
                return size
        self.refresh_index()
        with self._lock:
            return self._known(digest)

    def _add(self, digest: bytes, blob: bytes, size: int) -> InsertResult:
        self._ensure_session()
        with self._lock:
            known = self._known(digest)  # another thread may have added it meanwhile
            if known >= 0:
                return InsertResult(digest, known, False)
            if self._pack is None:
                self._pack = PackBuilder(self.codec)
            self._pack.add(digest, blob, size)
            if self._pack.size >= self.pack_size or len(self._pack) >= _PACK_ENTRY_LIMIT:
                self._write_pack()
        return InsertResult(digest, len(blob), True)

    def _pending_blob(self, digest: bytes) -> bytes | None:
        """The blob of a chunk in the open or the sealed pack (lock held)."""
        for pack in (self._pack, self._sealed):
            if pack is not None:
                blob = pack.blob(digest)
                if blob is not None:
                    return blob
        return None

    def _write_pack(self) -> None:
        """Hand the open pack to the pack writer thread. Lock held.

        The pack's hash (its name) and its durable put run there, beside the
        chunk work: a put waits for an fsync of up to a pack's bytes, and with the
        lock held every worker would wait with it. One pack at a time: the
        previous one is collected first (memory stays at two packs).
        """
        pack, self._pack = self._pack, None
        if pack is None or not len(pack):
            return
        # A failed previous put raises here and this pack is dropped with it: the
        # caller's snapshot fails, later ones store these chunks again.
        self._collect_pack()
        if self._pack_writer is None:
            self._pack_writer = ThreadPoolExecutor(1, thread_name_prefix="pvebackup-pack")
        self._sealed = pack
        self._sealed_put = self._pack_writer.submit(self._put_pack, pack)

    def _put_pack(self, pack: PackBuilder) -> bytes:
        """Pack writer thread: name the pack, put it durably; returns its name."""
        name, data = pack.finish()
        self.backend.put(pack_key(name), data, overwrite=False, durable=True)
        crash_point("pack-durable")
        return name

    def wait_packs(self) -> None:
        """Wait until the full packs handed to the pack writer are stored (durably).

        Writes no index object and not the open pack (``flush`` does both)."""
        with self._lock:
            self._collect_pack()

    def _collect_pack(self) -> None:
        """Wait for the sealed pack's put, then record its chunks (lock held).

        Only from here on may an index object name the pack. A failed put raises
        here, once, and the pack is dropped: its chunks are never indexed and
        count as absent from then on (stored again if met again). Every snapshot
        that referenced one of them commits after this point (``flush`` collects
        first), so the failure fails it instead of losing its data.
        """
        if self._sealed_put is None:
            return
        pack, put = self._sealed, self._sealed_put
        self._sealed = self._sealed_put = None
        name = put.result()
        assert pack is not None
        for e in pack.entries:
            self._written[e.digest] = ChunkLocation(name, e.offset, e.length, e.size)
        self._unindexed.append((name, pack.entries))
        self._unindexed_count += len(pack.entries)
        if self._unindexed_count > MAX_CHUNK_INDEX_ENTRIES - _PACK_ENTRY_LIMIT:
            self._write_index_object()

    def _write_index_object(self) -> None:
        """Put an index object for the packs written since the last one. Lock held."""
        if not self._unindexed:
            return
        name, data = encode_index_object(self.codec, self.session, self._unindexed)
        key = index_key(name)
        self.backend.put(key, data, overwrite=False, durable=True)
        self._index.add(self._written.items())
        bad = self._bad or {}
        # A new copy of a digest moved aside: the cache keeps the first location
        # it met (the bad one), so remember the good one for this session.
        self._healed.update((d, loc) for d, loc in self._written.items() if d in bad)
        self._index.mark_ingested(key)
        self._written.clear()
        self._unindexed.clear()
        self._unindexed_count = 0

    def flush(self) -> None:
        """Write the open pack and an index object for this writer's new packs.

        Both durably, pack first: an index object never names a pack a crash could
        lose. ``SnapshotWriter.commit`` calls this before the manifest.
        """
        self._check_session()
        with self._lock:
            self._write_pack()
            self._collect_pack()
            self._write_index_object()

    def refresh_index(self, *, check_vanished: bool = False) -> int:
        """Ingest index objects other writers stored since; returns how many.

        ``check_vanished``: if an index object the cache ingested is gone (garbage
        collection compacted it), start the cache over: it may list chunks that
        were deleted since.
        """
        # One refresh at a time: the restore's read-ahead threads all miss at
        # first, and the later ones then find everything ingested already.
        with self._refresh_lock:
            return self._refresh_index(check_vanished)

    def _refresh_index(self, check_vanished: bool) -> int:
        keys = sorted(self.backend.list(INDEX_PREFIX))
        with self._lock:
            seen = self._index.ingested()
            if check_vanished and not seen <= set(keys):
                self._index.clear()
                seen = set()
            self._refreshed = True
        todo: list[tuple[str, bytes]] = []
        for key in keys:
            name = None if key in seen else index_name_from_key(key)
            if name is not None:  # None: ingested, or not ours (never read)
                todo.append((key, name))

        def fetch(item: tuple[str, bytes]) -> bytes | None:
            try:
                return get_bounded(self.backend, item[0], MAX_INDEX_OBJECT_SIZE)
            except ObjectNotFoundError:
                return None  # compacted away meanwhile

        new = 0
        # Several reads at once: on S3 each is a round trip, and a host without a
        # cache (a restore, a new node) reads every index object of the store.
        # In slices, so that at most 2 * _REFRESH_JOBS objects wait in memory.
        with ThreadPoolExecutor(_REFRESH_JOBS, thread_name_prefix="pvebackup-index") as pool:
            for first in range(0, len(todo), 2 * _REFRESH_JOBS):
                part = todo[first : first + 2 * _REFRESH_JOBS]
                for (key, name), data in zip(part, pool.map(fetch, part), strict=True):
                    if data is None:
                        continue
                    parsed = parse_index_object(self.codec, data, name)
                    with self._lock:
                        self._index.add(parsed.entries)
                        self._index.mark_ingested(key)
                    new += 1
        return new

    def index_entries(self) -> dict[bytes, ChunkLocation]:
        """Every chunk the store's index objects list (read fresh from the store)."""
        out: dict[bytes, ChunkLocation] = {}
        for key in sorted(self.backend.list(INDEX_PREFIX)):
            name = index_name_from_key(key)
            if name is not None:
                data = get_bounded(self.backend, key, MAX_INDEX_OBJECT_SIZE)
                for digest, loc in parse_index_object(self.codec, data, name).entries:
                    out.setdefault(digest, loc)
        return out

    def pack_names(self) -> list[bytes]:
        """Names of the stored packs."""
        names = (pack_name_from_key(k) for k in self.backend.list(PACKS_PREFIX))
        return sorted(n for n in names if n is not None)

    def rebuild_index_from_packs(self) -> dict[bytes, ChunkLocation]:
        """The chunk index as the packs' own descriptions give it."""
        out: dict[bytes, ChunkLocation] = {}
        for name in self.pack_names():
            for e in read_pack_entries(self.backend, self.codec, name):
                out.setdefault(e.digest, ChunkLocation(name, e.offset, e.length, e.size))
        return out

    def store_prepared(self, chunk: PreparedChunk) -> InsertResult:
        """Insert a prepared chunk (idempotent; a zero chunk is not stored)."""
        if chunk.blob is None:
            return InsertResult(ZERO_DIGEST, 0, False)
        size = self._lookup_size(chunk.digest)
        if size >= 0:
            return InsertResult(chunk.digest, size, False)
        return self._add(chunk.digest, chunk.blob, chunk.size)

    def insert_chunk(self, data: BytesLike) -> InsertResult:
        """Digest ``data`` and store it unless present (then it is not even encoded)."""
        if is_zero(data):
            return InsertResult(ZERO_DIGEST, 0, False)
        digest = self.codec.digest(data)
        size = self._lookup_size(digest)
        if size >= 0:
            return InsertResult(digest, size, False)
        return self._add(digest, self.codec.encode(data), len(data))

    def has_chunk(self, digest: bytes) -> bool:
        """True if the chunk is stored (always for ``ZERO_DIGEST``)."""
        return digest == ZERO_DIGEST or self._lookup_size(digest) >= 0

    def locate_chunk(self, digest: bytes) -> ChunkLocation | None:
        """Where the chunk is stored; None if not (or still in the open pack, or
        only at locations verify moved aside)."""
        with self._lock:
            loc = self._written.get(digest) or self._healed.get(digest)
            loc = loc or self._index.lookup(digest)
        if loc is None:
            self.refresh_index()
            with self._lock:
                loc = self._written.get(digest) or self._index.lookup(digest)
        self._bad_map()
        with self._lock:
            return self._usable(digest, loc)

    def _locate_for_read(self, digest: bytes) -> ChunkLocation | None:
        """``locate_chunk``, and once more on a cache started over: a miss on a read
        is rare (the index said the chunk exists), and a persistent cache another
        process saved over may lack entries it claims to have ingested."""
        loc = self.locate_chunk(digest)
        if loc is None and digest not in self._bad_map():
            with self._lock:
                self._index.clear()
            loc = self.locate_chunk(digest)
        return loc

    # --- chunks moved aside by verify (store/badchunk.py) ---------------------------

    def _bad_map(self) -> badchunk.BadMap:
        """The locations moved aside, read once per datastore (a writer: at its start)."""
        if self._bad is None:
            found = badchunk.bad_map(badchunk.read_bad_chunks(self.backend, self.codec))
            with self._lock:
                if self._bad is None:
                    self._bad = found
        assert self._bad is not None
        return self._bad

    def _usable(self, digest: bytes, loc: ChunkLocation | None) -> ChunkLocation | None:
        """``loc`` unless verify moved it aside; then another copy, if any (lock held).

        One pass over the index objects per datastore finds the other copies of
        every bad digest; it happens only when a bad location is met at all."""
        bad = self._bad or {}
        if loc is None or loc.pack not in bad.get(digest, ()):
            return loc
        if digest not in self._healed and not self._healed_scanned:
            self._healed.update(badchunk.good_locations(self.backend, self.codec, bad))
            self._healed_scanned = True
        return self._healed.get(digest)

    def bad_reason(self, digest: bytes) -> str | None:
        """Why verify moved the chunk aside (None if it did not)."""
        reasons = self._bad_map().get(digest)
        return None if not reasons else "; ".join(sorted(set(reasons.values())))

    def is_moved_aside(self, digest: bytes, pack: bytes) -> bool:
        return pack in self._bad_map().get(digest, ())

    def move_chunk_aside(
        self, digest: bytes, loc: ChunkLocation, reason: str
    ) -> badchunk.BadChunk:
        """Record ``loc`` of ``digest`` as bad (bytes kept in ``bad/data/``): from now
        on this datastore, and every one opened later, treats it as absent."""
        record = badchunk.move_aside(self.backend, self.codec, digest, loc, reason)
        bad = self._bad_map()
        with self._lock:
            bad.setdefault(digest, {})[loc.pack] = record.reason
            if (h := self._healed.get(digest)) is not None and h.pack == loc.pack:
                del self._healed[digest]
            self._healed_scanned = False
        return record

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
        with self._lock:
            blob = self._pending_blob(digest)
        if blob is None:
            loc = self._locate_for_read(digest)
            if loc is None:
                why = self.bad_reason(digest)
                if why is not None:
                    raise CorruptChunkError(
                        f"chunk {digest.hex()}: moved aside as bad ({why}); a backup "
                        "that stores it again heals the store"
                    )
                raise CorruptChunkError(f"chunk {digest.hex()}: missing from the store")
            try:
                blob = self.backend.get_range(pack_key(loc.pack), loc.offset, loc.length)
            except ObjectNotFoundError:
                # Garbage collection may have repacked it since we cached its place.
                self.refresh_index(check_vanished=True)
                loc = self.locate_chunk(digest) or loc
                try:
                    blob = self.backend.get_range(pack_key(loc.pack), loc.offset, loc.length)
                except ObjectNotFoundError as exc:
                    raise CorruptChunkError(
                        f"chunk {digest.hex()}: its pack {loc.pack.hex()} is missing"
                    ) from exc
            if len(blob) != loc.length:
                raise CorruptChunkError(f"chunk {digest.hex()}: pack {loc.pack.hex()} cut short")
        return self._decode(blob, digest, size)

    def _decode(self, blob: BytesLike, digest: bytes, size: int | None) -> bytes:
        data = self.codec.decode_chunk(blob, digest)
        if size is not None and len(data) != size:
            raise CorruptChunkError(
                f"chunk {digest.hex()}: {len(data)} bytes, the index expects {size}"
            )
        return data

    def read_chunks(self, wanted: Sequence[tuple[bytes, int]]) -> list[bytes | IntegrityError]:
        """``read_chunk(digest, size)`` of each of ``wanted``, with few backend reads.

        Chunks that lie close together in one pack are fetched with one ranged
        read (:mod:`.readplan`): a restore's read-ahead asks for a few MiB of an
        image at a time, which a full backup stored in one run of one pack. Each
        result is the plaintext or the ``IntegrityError`` that ``read_chunk`` would
        raise for that chunk (one damaged chunk does not fail its neighbours);
        backend failures other than a missing pack are raised.
        """
        results: list[bytes | IntegrityError | None] = [None] * len(wanted)
        located: list[tuple[int, ChunkLocation]] = []
        for pos, (digest, size) in enumerate(wanted):
            with self._lock:
                pending = self._pack is not None and self._pack.blob(digest) is not None
            loc = None if digest == ZERO_DIGEST or pending else self._locate_for_read(digest)
            if loc is None:  # zero, in the open pack, or missing: read_chunk says which
                results[pos] = self._read_one(digest, size)
            else:
                located.append((pos, loc))
        for span in plan_spans(located):
            try:
                data = memoryview(
                    self.backend.get_range(pack_key(span.pack), span.start, span.end - span.start)
                )
            except ObjectNotFoundError:
                data = memoryview(b"")  # repacked since? read_chunk refreshes and retries
            for pos, loc in span.members:
                digest, size = wanted[pos]
                rel = loc.offset - span.start
                if len(data) < rel + loc.length:
                    results[pos] = self._read_one(digest, size)
                    continue
                try:
                    results[pos] = self._decode(data[rel : rel + loc.length], digest, size)
                except IntegrityError as exc:
                    results[pos] = exc
        done: list[bytes | IntegrityError] = []
        for r in results:
            assert r is not None
            done.append(r)
        return done

    def _read_one(self, digest: bytes, size: int) -> bytes | IntegrityError:
        try:
            return self.read_chunk(digest, size)
        except IntegrityError as exc:
            return exc

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
            flush=self.flush,
        )
