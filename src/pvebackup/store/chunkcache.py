"""The on-disk chunk index cache: a sorted file of fixed records plus a small overlay.

Chosen by measurement over stdlib ``sqlite3`` (docs/design.md, "Chunk index"):
with 2 million rows sqlite answered about 65k lookups/s from Python (statement
overhead per call), below the 200k/s goal. Here a fan-out table over the first
bits of the digest (sized for about 8 records per bucket: 2**20 entries, 4 MiB, at
10 million chunks) names the bucket, one ``pread`` fetches it and ``bytes.find``
finds the digest: no per-row Python objects, and the file stays in the page cache, not in
the process's RSS (an ``mmap`` read at random counted every page it touched: 510
MiB peak RSS at 10 million chunks, against the 200 MiB goal).

Files in the cache directory (local, trusted: written by us only, never storage
content): ``chunks.idx`` (u32 fan-out bits b, u32 zero, a fan-out table of 2**b + 1
u32 counts over the first b bits of the digest, then the records sorted by digest:
digest, pack number, offset, length, size), ``packs`` (32-byte pack names,
the records' pack numbers index it) and ``ingested`` (one index object key a
line). New entries go to an in-memory overlay; ``save`` (at ``OVERLAY_LIMIT``
entries, and when the store closes) merges it into a new file (atomic replace),
streaming, so the merge never holds the whole index.
Not thread-safe: the datastore locks around it.

One owner per directory: ``save`` replaces whole files, so two processes saving
into one directory would drop each other's entries (and one could read the other's
half-replaced pair of files). ``open_chunk_cache`` takes an exclusive ``flock`` on
``DIR/lock`` (``kit.lock``: dies with its holder, so a killed backup leaves no stale
lock) for as long as the cache is open; a second process finds it taken and works
from a ``MemoryChunkIndex`` instead (correct, only neither persistent nor bounded):
waiting could block a backup behind one that runs for hours.
"""

from __future__ import annotations

import heapq
import os
import struct
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

from pvebackup.api.errors import LockedError, PveBackupError
from pvebackup.kit.lock import FileLock
from pvebackup.store.chunkindex import ChunkIndexCache, ChunkLocation, MemoryChunkIndex

__all__ = ["SortedChunkIndex", "open_chunk_cache", "write_sorted_index"]

_REC = struct.Struct("<32sIIII")
_HEAD = struct.Struct("<II")  # fan-out bits, reserved
_PREFIX = struct.Struct(">I").unpack_from  # the bits the fan-out table uses
_REC_SIZE: Final = _REC.size
_pread = os.pread
OVERLAY_LIMIT: Final = 200_000
"""Entries held in memory before they are merged into the file (~40 MiB)."""


def fan_bits(count: int) -> int:
    """Fan-out bits for ``count`` records: buckets of about 8 records, 2**8..2**22."""
    return max(8, min(22, (max(count, 1) // 8).bit_length()))


def _fan_size(bits: int) -> int:
    return _HEAD.size + 4 * ((1 << bits) + 1)


def write_sorted_index(
    path: Path, records: Iterable[tuple[bytes, int, int, int, int]], count_hint: int = 0
) -> int:
    """Write ``records`` (sorted by digest, unique) as an index file; returns the count.

    ``count_hint``: about how many records come (sizes the fan-out table).
    """
    bits = fan_bits(count_hint)
    shift = 32 - bits
    fan = array("I", bytes(4 * ((1 << bits) + 1)))
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "wb") as f:
        f.write(bytes(_fan_size(bits)))
        buf = bytearray()
        for digest, pack, offset, length, size in records:
            fan[(int.from_bytes(digest[:4], "big") >> shift) + 1] += 1
            buf += _REC.pack(digest, pack, offset, length, size)
            n += 1
            if len(buf) >= 1 << 20:
                f.write(buf)
                buf.clear()
        f.write(buf)
        for i in range(1, len(fan)):
            fan[i] += fan[i - 1]
        f.seek(0)
        f.write(_HEAD.pack(bits, 0))
        f.write(fan.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n


class SortedChunkIndex:
    """A ``ChunkIndexCache`` in directory ``root`` (created 0700 if missing)."""

    def __init__(self, root: str | os.PathLike[str], *, lock: FileLock | None = None) -> None:
        """``lock``: held (by ``open_chunk_cache``) while the cache is open; released
        by ``close``."""
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = lock
        self._file = self.root / "chunks.idx"
        self._packs_file = self.root / "packs"
        self._ingested_file = self.root / "ingested"
        self._packs: list[bytes] = []
        self._pack_no: dict[bytes, int] = {}
        if self._packs_file.exists():
            raw = self._packs_file.read_bytes()
            self._packs = [raw[i : i + 32] for i in range(0, len(raw) - len(raw) % 32, 32)]
            self._pack_no = {p: i for i, p in enumerate(self._packs)}
        self._seen: set[str] = set()
        if self._ingested_file.exists():
            self._seen = set(self._ingested_file.read_text().split())
        self._overlay: dict[bytes, tuple[int, int, int, int]] = {}
        self._fd = -1
        self._fan = array("I", [0, 0])
        self._shift = 32
        self._base = 0
        self._open()

    def _open(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._fan = array("I", [0, 0])
        self._shift = 32
        if not self._file.exists():
            return
        fd = os.open(self._file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, _HEAD.size, 0)
            bits = _HEAD.unpack(head)[0] if len(head) == _HEAD.size else 0
            fan = array("I")
            if 8 <= bits <= 22 and size >= _fan_size(bits):
                fan.frombytes(os.pread(fd, _fan_size(bits) - _HEAD.size, _HEAD.size))
            ok = len(fan) == (1 << bits) + 1 and all(
                a <= b for a, b in zip(fan, fan[1:], strict=False)
            )
            if not ok or _fan_size(bits) + fan[-1] * _REC.size != size:
                # Our own file, but a crash or a full disk may have cut it: start
                # over (the datastore re-ingests the index objects).
                os.close(fd)
                self._seen.clear()
                return
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._fan, self._shift, self._base = fd, fan, 32 - bits, _fan_size(bits)

    def close(self) -> None:
        """Save, close the file and drop the directory's lock."""
        try:
            self.save()
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self._lock is not None:
                self._lock.release()

    def __del__(self) -> None:
        # A cache dropped unclosed (a provider whose job never ended, a restore)
        # must not keep its descriptor and the directory's lock for the rest of a
        # long-lived process. Nothing is saved here: unsaved entries are
        # rebuilt from the index objects, as after a crash.
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            self._fd = -1
            os.close(fd)
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    def __len__(self) -> int:
        return self._fan[-1] + len(self._overlay)

    def _find(self, digest: bytes) -> tuple[int, int, int, int] | None:
        # One pread of the digest's fan-out bucket (~8 records), then a scan of
        # it in C: the file's pages stay page cache,
        # never this process's RSS (an mmap touched at random counted them all).
        if self._fd < 0:
            return None
        b = _PREFIX(digest)[0] >> self._shift
        fan = self._fan
        first = fan[b]
        end = fan[b + 1]
        if first == end:
            return None
        rec = _REC_SIZE
        block = _pread(self._fd, (end - first) * rec, self._base + first * rec)
        # bytes.find is a C memmem over the bucket: faster than a binary search
        # stepping in Python. A hit not on a record boundary spans two records.
        at = block.find(digest)
        while at >= 0 and at % rec:
            at = block.find(digest, at + 1)
        if at < 0:
            return None
        _, pack, offset, length, size = _REC.unpack_from(block, at)
        return pack, offset, length, size

    def lookup(self, digest: bytes) -> ChunkLocation | None:
        found = self._overlay.get(digest) or self._find(digest)
        if found is None:
            return None
        pack, offset, length, size = found
        return ChunkLocation(self._packs[pack], offset, length, size)

    def add(self, entries: Iterable[tuple[bytes, ChunkLocation]]) -> None:
        for digest, loc in entries:
            if digest in self._overlay or self._find(digest) is not None:
                continue
            no = self._pack_no.get(loc.pack)
            if no is None:
                no = self._pack_no[loc.pack] = len(self._packs)
                self._packs.append(loc.pack)
            self._overlay[digest] = (no, loc.offset, loc.length, loc.size)

    def ingested(self) -> set[str]:
        return set(self._seen)

    def mark_ingested(self, key: str) -> None:
        # Merged only here, after the entries' key is known: every saved entry
        # then has its index object's key saved too (see ``save``).
        self._seen.add(key)
        if len(self._overlay) >= OVERLAY_LIMIT:
            self.save()

    def clear(self) -> None:
        self._overlay.clear()
        self._seen.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._fan = array("I", [0, 0])
        self._shift = 32
        self._file.unlink(missing_ok=True)
        self._ingested_file.unlink(missing_ok=True)

    def _file_records(self) -> Iterator[tuple[bytes, int, int, int, int]]:
        if self._fd < 0:
            return
        step = 4096
        for first in range(0, self._fan[-1], step):
            n = min(step, self._fan[-1] - first)
            block = os.pread(self._fd, n * _REC.size, self._base + first * _REC.size)
            yield from _REC.iter_unpack(block)

    def save(self) -> None:
        """Merge the overlay into the file; write the pack list and ingested keys.

        Order: packs, ingested keys, then records. A crash in between leaves keys
        whose entries are missing (lookups miss: a chunk stored twice, a read
        that starts the cache over), never entries without their key: those
        would escape the check for index objects GC compacted away, and a backup
        could then reuse a chunk GC deleted. Callers save only after marking the
        key of every entry added (``mark_ingested``), for the same reason.
        """
        tmp = self._packs_file.with_name("packs.tmp")
        tmp.write_bytes(b"".join(self._packs))
        os.replace(tmp, self._packs_file)
        tmp = self._ingested_file.with_name("ingested.tmp")
        tmp.write_text("".join(f"{k}\n" for k in sorted(self._seen)))
        os.replace(tmp, self._ingested_file)
        if self._overlay:
            new = sorted((d, *v) for d, v in self._overlay.items())
            merged = heapq.merge(self._file_records(), new)
            write_sorted_index(self._file, merged, self._fan[-1] + len(new))
            self._overlay.clear()
            self._open()


def open_chunk_cache(root: Path) -> ChunkIndexCache:
    """The persistent cache in ``root`` if this process can own it, else a memory one.

    ``root`` is a host directory (never in the storage: its content steers which
    chunks a backup skips, so only we may write it). Unusable (cannot be created,
    locked by another process): a ``MemoryChunkIndex``, which rebuilds from the
    store's index objects, as every cache can.
    """
    lock = FileLock(root / "lock", what=f"chunk index cache {root}")
    try:
        lock.acquire()
    except (LockedError, PveBackupError):
        return MemoryChunkIndex()
    try:
        return SortedChunkIndex(root, lock=lock)
    except OSError:
        lock.release()
        return MemoryChunkIndex()
