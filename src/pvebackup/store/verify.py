"""Verify a backup-store: read and check every chunk of every (or one) snapshot.

Each chunk is read once per run, however many snapshots share it (the digests of
all chosen snapshots are gathered first, then read by a small thread pool), and
a damaged chunk is charged to every snapshot that uses it.

Threat: everything read here (manifests, indexes, packs) may have been altered by
anyone with write access to the storage. Nothing read is trusted: manifests and
indexes are checked by ``open_snapshot``/``open_index``, and each chunk is checked
against its digest (and its tag, in an encrypted store) by ``read_chunk``. A
damaged object is reported by name and never stops the run, so one bad pack
cannot hide the state of the rest of the store.

A bad chunk is moved aside (``store/badchunk.py``): every indexed location of its
digest is read again, and each one that fails gets a record and a copy of its bytes
under ``bad/``; from then on writers store the chunk anew (a later backup of the
same data heals the store) and readers skip the location. Nothing is deleted. See
docs/design.md ("Verify").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pvebackup.api.errors import (
    CorruptChunkError,
    CryptoError,
    IntegrityError,
    ObjectNotFoundError,
    VolumeNotFoundError,
)
from pvebackup.store.badchunk import index_locations
from pvebackup.store.datastore import Datastore
from pvebackup.store.formats import ZERO_DIGEST
from pvebackup.store.pack import pack_key
from pvebackup.store.snapshot import SnapshotId

__all__ = ["DEFAULT_WORKERS", "SnapshotResult", "VerifyReport", "verify_store"]

DEFAULT_WORKERS = 2
"""Reader threads: hashing and decryption release the GIL, two keep both cores busy."""

Log = Callable[[str, str], None]


@dataclass
class SnapshotResult:
    """The verdict on one snapshot: ``ok`` or ``failed``, with the reasons."""

    volname: str
    state: str = "ok"
    errors: list[str] = field(default_factory=list)
    bad_chunks: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    """What one verify run found. ``ok`` is False if anything at all failed."""

    started: float
    finished: float = 0.0
    chunks: int = 0
    bytes: int = 0
    bad_chunks: dict[str, str] = field(default_factory=dict)
    moved_aside: dict[str, list[str]] = field(default_factory=dict)
    """digest hex -> the records (``bad/records/<id>``) this run wrote for it."""
    snapshots: list[SnapshotResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad_chunks and all(s.state == "ok" for s in self.snapshots)

    def lines(self) -> list[str]:
        out = []
        for s in self.snapshots:
            out.append(f"{s.state:6} {s.volname}")
            out.extend(f"       {e}" for e in s.errors)
        for digest in sorted(self.bad_chunks):
            moved = self.moved_aside.get(digest)
            where = ", ".join(moved) if moved else "nothing (new) to move aside"
            out.append(f"bad    chunk {digest}: moved aside: {where}")
        out.extend(self.notes)
        out.append(
            f"verified {len(self.snapshots)} snapshots, {self.chunks} chunks "
            f"({self.bytes} bytes) in {self.finished - self.started:.1f}s: "
            + ("ok" if self.ok else f"{len(self.bad_chunks)} bad chunks, FAILED")
        )
        return out


def _check_chunk(store: Datastore, digest: bytes, size: int) -> tuple[int, str | None]:
    try:
        return len(store.read_chunk(digest, size)), None
    except (IntegrityError, CryptoError, ObjectNotFoundError) as exc:
        return 0, str(exc)


def _move_aside(store: Datastore, report: VerifyReport, bad: dict[bytes, str]) -> None:
    """Re-read every indexed location of each bad digest; record those that fail.

    Every location, not only the one the read used: the cache keeps one per digest,
    and a second (also bad) copy would otherwise be read the next time.
    """
    try:
        found = index_locations(store.backend, store.codec, set(bad))
    except (IntegrityError, CryptoError) as exc:
        # A damaged index object: nothing can be moved safely; say so, fail the run.
        report.notes.append(f"bad chunks not moved aside: {exc}")
        return
    for digest, locs in found.items():
        for loc in locs:
            try:
                blob = store.backend.get_range(pack_key(loc.pack), loc.offset, loc.length)
                if len(blob) != loc.length:
                    raise CorruptChunkError(f"chunk {digest.hex()}: its pack is cut short")
                if len(store.codec.decode_chunk(blob, digest)) != loc.size:
                    raise CorruptChunkError(f"chunk {digest.hex()}: wrong size")
                continue  # a good copy: readers will find it
            except ObjectNotFoundError:
                reason = f"chunk {digest.hex()}: its pack {loc.pack.hex()} is missing"
            except (IntegrityError, CryptoError) as exc:
                reason = str(exc)
            if store.is_moved_aside(digest, loc.pack):
                continue  # moved aside by an earlier run
            record = store.move_chunk_aside(digest, loc, reason)
            report.moved_aside.setdefault(digest.hex(), []).append(record.key)


def verify_store(
    store: Datastore,
    snapshots: Iterable[SnapshotId] | None = None,
    *,
    move_aside: bool = True,
    workers: int = DEFAULT_WORKERS,
    log: Log | None = None,
    now: Callable[[], float] = time.time,
) -> VerifyReport:
    """Check ``snapshots`` (default: all committed ones) and every chunk they use."""
    report = VerifyReport(started=now())
    chosen = list(store.list_snapshots() if snapshots is None else snapshots)
    # digest -> (expected plaintext size, snapshots using it)
    users: dict[bytes, tuple[int, list[SnapshotResult]]] = {}
    for sid in chosen:
        result = SnapshotResult(sid.volname)
        report.snapshots.append(result)
        try:
            snap = store.open_snapshot(sid)
            for device in snap.devices:
                idx = snap.open_index(device)
                for i in range(len(idx)):
                    digest = idx.digest(i)
                    if digest == ZERO_DIGEST:
                        continue
                    entry = users.setdefault(digest, (idx.extent(i)[1], []))
                    if not entry[1] or entry[1][-1] is not result:
                        entry[1].append(result)
            for name in snap.file_names():
                snap.read_file(name)
        except VolumeNotFoundError:
            if snapshots is not None:
                raise  # the one asked for does not exist
            report.snapshots.remove(result)  # removed while we ran: nothing to verify
            continue
        except (IntegrityError, CryptoError, ObjectNotFoundError) as exc:
            result.state = "failed"
            result.errors.append(str(exc))
    digests = list(users)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        outcomes = pool.map(lambda d: _check_chunk(store, d, users[d][0]), digests)
        for digest, (nbytes, error) in zip(digests, outcomes, strict=True):
            report.chunks += 1
            report.bytes += nbytes
            if error is None:
                continue
            report.bad_chunks[digest.hex()] = error
            for result in users[digest][1]:
                result.state = "failed"
                result.bad_chunks.append(digest.hex())
                result.errors.append(error)
    if move_aside and report.bad_chunks:
        _move_aside(store, report, {bytes.fromhex(d): e for d, e in report.bad_chunks.items()})
    report.finished = now()
    if log is not None:
        for result in report.snapshots:
            if result.state != "ok":
                log("err", f"verify {result.volname}: {len(result.errors)} errors")
    return report
