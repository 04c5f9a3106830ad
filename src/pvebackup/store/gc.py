"""Garbage collection beside running backups: mark, condemn, and delete a run later.

One run (``collect_garbage``), on any backend, without locks, renames or atimes:

1. list the live writer sessions (``sessions/``; dead once ``heartbeat + ttl``
   has passed by more than ``margin``);
2. mark: every chunk digest any committed snapshot references (listed *after*
   the sessions, so a writer that ended before step 1 has its manifest seen);
3. read the condemned records of earlier runs. A record made at ``created`` is
   *ripe* when every live session started after ``created + margin``: such
   writers read the record when they started and never reuse its chunks, and
   every writer that might have reused one has ended (its snapshot is marked
   now) or died. Ripe locations whose digest is marked again are resurrected
   (kept); the others are deleted: a pack left with nothing live is deleted, one
   whose dead share exceeds ``max_unused`` is repacked, others keep their dead
   bytes until a later run;
4. condemn: every indexed location whose digest is unmarked or that verify moved
   aside (``badchunk``: its bytes are kept under ``bad/``), and every pack no
   index object names (a crashed writer's) goes into a new record (not deleted);
5. compact: when anything moved or was deleted, or there are several index
   objects, the surviving entries are written as new index objects (durable),
   then the old ones deleted, then dead packs, then the ripe records.

A kill at any point leaves a consistent store: new packs and index objects are
durable before anything they replace is deleted, and until a ripe record is
deleted the next run simply does its work again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from pvebackup.api.errors import CorruptChunkError, CorruptIndexError, ObjectNotFoundError
from pvebackup.store.badchunk import read_bad_chunks
from pvebackup.store.chunkindex import (
    INDEX_PREFIX,
    MAX_INDEX_OBJECT_SIZE,
    ChunkLocation,
    encode_index_object,
    index_key,
    index_name_from_key,
    parse_index_object,
)
from pvebackup.store.datastore import Datastore
from pvebackup.store.formats import MAX_CHUNK_INDEX_ENTRIES, ZERO_DIGEST
from pvebackup.store.gcrecord import (
    SESSIONS_PREFIX,
    CondemnedRecord,
    SessionInfo,
    encode_record,
    parse_session,
    read_records,
)
from pvebackup.store.pack import PackBuilder, PackEntry, pack_key

__all__ = ["DEFAULT_MARGIN", "DEFAULT_MAX_UNUSED", "GcReport", "collect_garbage"]

DEFAULT_MARGIN: Final = 600.0
"""Seconds: clock skew between hosts plus the time a put takes to be listed."""
DEFAULT_MAX_UNUSED: Final = 0.10
"""Repack a pack when more than this share of its chunk bytes is garbage."""

Log = Callable[[str, str], None]


@dataclass
class GcReport:
    """What one run did (or, with ``dry_run``, would do)."""

    dry_run: bool = False
    live_sessions: int = 0
    snapshots: int = 0
    chunks_condemned: int = 0
    packs_condemned: int = 0
    chunks_resurrected: int = 0
    chunks_removed: int = 0
    bytes_removed: int = 0
    chunks_kept: int = 0
    bytes_kept: int = 0
    packs_removed: int = 0
    packs_written: int = 0
    packs_kept: int = 0
    records_waiting: int = 0
    index_objects_replaced: int = 0
    incomplete_removed: int = 0
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        return [
            f"{self.snapshots} snapshots, {self.live_sessions} running writers",
            f"{verb} {self.chunks_removed} chunks ({self.bytes_removed} bytes), "
            f"{self.packs_removed} packs; wrote {self.packs_written} packs",
            f"kept {self.chunks_kept} chunks ({self.bytes_kept} bytes) in {self.packs_kept} packs",
            f"condemned {self.chunks_condemned} chunks and {self.packs_condemned} packs "
            f"(removed by a later run); resurrected {self.chunks_resurrected}; "
            f"{self.records_waiting} earlier records wait for running writers",
            f"replaced {self.index_objects_replaced} index objects; removed "
            f"{self.incomplete_removed} incomplete snapshots",
            *self.notes,
        ]


def _live_sessions(store: Datastore, now: float, margin: float, report: GcReport) -> list[float]:
    """Start times of the sessions that may still be running."""
    started: list[float] = []
    for key in store.backend.list(SESSIONS_PREFIX):
        try:
            info: SessionInfo = parse_session(store.backend.get_range(key, 0, 4097))
        except ObjectNotFoundError:
            continue  # ended meanwhile
        except CorruptIndexError as exc:
            report.notes.append(f"ignored {key}: {exc}")
            continue
        if info.heartbeat + info.ttl + margin >= now:
            started.append(info.started)
    return started


def _mark(store: Datastore, report: GcReport) -> set[bytes]:
    marked: set[bytes] = set()
    for sid in store.list_snapshots():
        try:
            snap = store.open_snapshot(sid)
        except ObjectNotFoundError:
            continue  # removed meanwhile
        for device in snap.devices:
            marked.update(snap.open_index(device).digests())
        report.snapshots += 1
    marked.discard(ZERO_DIGEST)
    return marked


def _read_index(store: Datastore) -> tuple[list[str], dict[tuple[bytes, bytes], ChunkLocation]]:
    keys: list[str] = []
    locations: dict[tuple[bytes, bytes], ChunkLocation] = {}
    for key in sorted(store.backend.list(INDEX_PREFIX)):
        name = index_name_from_key(key)
        if name is None:
            continue
        try:
            if store.backend.stat(key).size > MAX_INDEX_OBJECT_SIZE:
                raise CorruptIndexError(f"{key}: too large")
            data = store.backend.get(key)
        except ObjectNotFoundError:
            continue
        for digest, loc in parse_index_object(store.codec, data, name).entries:
            locations.setdefault((digest, loc.pack), loc)
        keys.append(key)
    return keys, locations


def collect_garbage(
    store: Datastore,
    *,
    dry_run: bool = False,
    margin: float = DEFAULT_MARGIN,
    max_unused: float = DEFAULT_MAX_UNUSED,
    now: Callable[[], float] = time.time,
    log: Log | None = None,
) -> GcReport:
    """One GC run over ``store`` (see the module docstring). Never raises for
    garbage it cannot read; damage that would make deletion unsafe raises."""
    report = GcReport(dry_run=dry_run)
    started = now()
    sessions = _live_sessions(store, started, margin, report)
    report.live_sessions = len(sessions)
    marked = _mark(store, report)
    records = list(read_records(store.backend, store.codec))
    index_keys, locations = _read_index(store)
    packs = set(store.pack_names())
    indexed_packs = {p for _, p in locations}
    # Locations verify moved aside are garbage however referenced: their bytes are
    # kept under bad/, readers and writers skip them, a healed copy lives elsewhere.
    bad = {(b.digest, b.pack) for b in read_bad_chunks(store.backend, store.codec)}

    ripe: list[CondemnedRecord] = []
    pending: set[tuple[bytes, bytes]] = set()
    for r in records:
        if all(s > r.created + margin for s in sessions):
            ripe.append(r)
        else:
            pending.update(r.pairs)
            report.records_waiting += 1

    doomed: set[tuple[bytes, bytes]] = set()
    dead_packs: set[bytes] = set()
    for r in ripe:
        for digest, pack in r.pairs:
            if digest == ZERO_DIGEST:
                if pack in packs and pack not in indexed_packs:
                    dead_packs.add(pack)
            elif (digest, pack) in locations:
                if digest in marked and (digest, pack) not in bad:
                    report.chunks_resurrected += 1
                else:
                    doomed.add((digest, pack))

    # Per pack: delete when nothing live is left, repack above max_unused.
    by_pack: dict[bytes, list[tuple[bytes, ChunkLocation]]] = {}
    for (digest, pack), loc in locations.items():
        by_pack.setdefault(pack, []).append((digest, loc))
    repack: dict[bytes, list[tuple[bytes, ChunkLocation]]] = {}
    for pack in {p for _, p in doomed}:
        entries = by_pack[pack]
        dead = [(d, loc) for d, loc in entries if (d, pack) in doomed]
        live = [(d, loc) for d, loc in entries if (d, pack) not in doomed]
        dead_bytes = sum(loc.length for _, loc in dead)
        total = sum(loc.length for _, loc in entries)
        if not live:
            dead_packs.add(pack)
        elif dead_bytes > max_unused * total:
            repack[pack] = live
        else:
            doomed.difference_update((d, pack) for d, _ in dead)  # a later run
    for pack in dead_packs | set(repack):
        for d, loc in by_pack.get(pack, []):
            if (d, pack) in doomed:
                report.chunks_removed += 1
                report.bytes_removed += loc.length
    report.packs_removed = len(dead_packs) + len(repack)

    # Condemn what is unreferenced now (deleted by a later run).
    new_pairs = {
        (d, p)
        for (d, p) in locations
        if (d not in marked or (d, p) in bad) and (d, p) not in pending and (d, p) not in doomed
    }
    orphans = {
        p
        for p in packs
        if p not in indexed_packs and (ZERO_DIGEST, p) not in pending and p not in dead_packs
    }
    report.chunks_condemned = len(new_pairs)
    report.packs_condemned = len(orphans)

    surviving = {
        key: loc
        for key, loc in locations.items()
        if key not in doomed and key[1] not in dead_packs and key[1] not in repack
    }
    kept_packs = {p for _, p in surviving}
    report.packs_kept = len(kept_packs)
    report.chunks_kept = len(surviving)
    report.bytes_kept = sum(loc.length for loc in surviving.values())
    if dry_run:
        _say(log, report)
        return report

    # Repack live chunks (verified: a damaged chunk is not copied, it is reported).
    moved: dict[tuple[bytes, bytes], ChunkLocation] = {}
    builder = PackBuilder(store.codec)

    def put_pack() -> None:
        nonlocal builder
        if not len(builder):
            return
        name, data = builder.finish()
        store.backend.put(pack_key(name), data, overwrite=False, durable=True)
        for e in builder.entries:
            moved[(e.digest, name)] = ChunkLocation(name, e.offset, e.length, e.size)
        report.packs_written += 1
        builder = PackBuilder(store.codec)

    for pack, live in sorted(list(repack.items())):
        blobs: list[tuple[bytes, bytes, int]] = []
        try:
            for digest, loc in live:
                blob = store.backend.get_range(pack_key(pack), loc.offset, loc.length)
                store.codec.decode_chunk(blob, digest)  # never copy damage
                blobs.append((digest, blob, loc.size))
        except (ObjectNotFoundError, CorruptChunkError) as exc:
            # Keep the whole pack as it is: deleting it would lose what is left.
            report.notes.append(f"pack {pack.hex()} not repacked: {exc}")
            del repack[pack]
            report.packs_removed -= 1
            surviving.update({(d, pack): loc for d, loc in live})
            continue
        for digest, blob, size in blobs:
            if digest not in builder:
                builder.add(digest, blob, size)
            if builder.size >= store.pack_size or len(builder) >= 65536:
                put_pack()
    put_pack()
    surviving.update(moved)
    report.bytes_kept = sum(loc.length for loc in surviving.values())
    report.packs_kept = len({p for _, p in surviving})
    report.chunks_kept = len(surviving)

    # Compact: new index objects (durable) before the old ones go.
    changed = bool(moved or doomed or dead_packs or repack)
    if changed or len(index_keys) > 1:
        groups: dict[bytes, list[PackEntry]] = {}
        for (digest, pack), loc in sorted(surviving.items()):
            groups.setdefault(pack, []).append(
                PackEntry(digest, loc.offset, loc.length, loc.size, 0)
            )
        batch: list[tuple[bytes, list[PackEntry]]] = []
        count = 0
        written: set[str] = set()
        for pack, pack_entries in sorted(groups.items()):
            for start in range(0, len(pack_entries), MAX_CHUNK_INDEX_ENTRIES):
                part = pack_entries[start : start + MAX_CHUNK_INDEX_ENTRIES]
                if count + len(part) > MAX_CHUNK_INDEX_ENTRIES:
                    written.add(_put_index(store, batch))
                    batch, count = [], 0
                batch.append((pack, part))
                count += len(part)
        if batch:
            written.add(_put_index(store, batch))
        for key in index_keys:
            if key not in written:
                store.backend.delete(key)
                report.index_objects_replaced += 1
    for pack in sorted(dead_packs | set(repack)):
        store.backend.delete(pack_key(pack))
    # Condemn, then forget the ripe records (their work is done).
    pairs = new_pairs | {(ZERO_DIGEST, p) for p in orphans}
    if pairs:
        for key, data in encode_record(store.codec, now(), pairs):
            store.backend.put(key, data, overwrite=False, durable=True)
    for r in ripe:
        store.backend.delete(r.key)
    report.incomplete_removed = len(
        store.cleanup_incomplete(min_age=store.session_ttl + margin)
    )
    store.backend.sync()
    _say(log, report)
    return report


def _put_index(store: Datastore, batch: list[tuple[bytes, list[PackEntry]]]) -> str:
    name, data = encode_index_object(store.codec, store.session, batch)
    key = index_key(name)
    store.backend.put(key, data, overwrite=False, durable=True)
    return key


def _say(log: Log | None, report: GcReport) -> None:
    if log is not None:
        for line in report.lines():
            log("info", line)
