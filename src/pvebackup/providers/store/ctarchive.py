"""Container archives in the chunk store (archive format 2).

Backup: the container's directory becomes one plain PAX tar stream (members as
:func:`pvebackup.kit.paxtar.tar_info` makes them, the same as ``backup-dir``'s),
written here member by member so that the writer knows every offset:

- the stream is cut by content (:mod:`.cdc`, FastCDC, 1 MiB average) into chunks
  stored like all others, with a dynamic index (device ``root.tar``, ``.didx``);
- the data of every regular file of at least :data:`ALIGN_MIN` bytes starts and
  (padded) ends on a chunk boundary, so an unchanged file's data is whole chunks
  shared with the previous backup, whatever changed around it;
- sparse files are stored as PAX sparse 1.0 members (GNU tar's format: the map
  of data segments first, then only the data; holes cost nothing); GNU tar and
  Python's tarfile both restore the holes;
- a catalog (:mod:`.catalog`, device ``root.catalog``) lists every member with
  its offsets.

Manifest metadata ``ct-archive-format`` is ``2``; archives of format 1 (fixed
chunks, ``root.tar.fidx``, no catalog) are still restored: readers go through
the index interface both kinds share.

Restore: :class:`TarFeeder` makes a FIFO in a private temporary directory and
writes the stream into it from a thread, chunk by verified chunk, so nothing
large lands on disk. The stream is uncompressed tar. :func:`extract_directory`
extracts it with GNU tar into a private temporary directory (mechanism
``directory``).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import threading
import zlib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pvebackup.api.errors import CorruptChunkError, ExternalToolError, PveBackupError
from pvebackup.api.types import LogFunction
from pvebackup.kit import proc
from pvebackup.kit.fswalk import Entry, SourceWalker, WalkStats
from pvebackup.kit.fsxattrs import ContainerIds
from pvebackup.kit.pacing import ProgressLog, TokenBucket
from pvebackup.kit.paxtar import hardlink_target, tar_info
from pvebackup.providers.store.catalog import (
    ALIGNED,
    CATALOG_DEVICE,
    CATALOG_MAGIC,
    SPARSE,
    CatalogEntry,
    encode_entry,
    iter_catalog,
)
from pvebackup.providers.store.cdc import CdcSink, SinkStats
from pvebackup.store.datastore import Datastore
from pvebackup.store.dynindex import DynamicIndex
from pvebackup.store.formats import ZERO_DIGEST
from pvebackup.store.index import FixedIndex
from pvebackup.store.snapshot import Snapshot, SnapshotWriter

if TYPE_CHECKING:
    from pvebackup.providers.store.ctreuse import PreviousArchive

__all__ = [
    "ALIGN_MIN",
    "ARCHIVE_DEVICE",
    "ARCHIVE_FORMAT_KEY",
    "ArchiveStats",
    "TarFeeder",
    "backup_archive",
    "extract_directory",
    "read_catalog",
    "stream_catalog",
]

ARCHIVE_DEVICE = "root.tar"
ARCHIVE_FORMAT_KEY = "ct-archive-format"
ARCHIVE_FORMAT = "2"
ALIGN_MIN = 16 * 1024
"""Regular files with at least this much data get chunk boundaries around it."""
RUN_SPACING = 2
"""A run of members also starts at a member whose path's CRC-32 is a multiple of
this: runs of ~2 small files, so that one changed file costs the store one short
run, not a directory's worth; chosen by name, so an added or removed file moves
no other run's start. Measured (docs/benchmarks.md): 8 -> 2 halves the growth
after a 1% change for 2.7x the chunks; 1 (restic-like, a chunk per file) saves
another 30% for 1.7x the chunks again."""
CATALOG_CDC_AVG = 64 * 1024
"""The catalog is cut finer than the archive: a changed record costs ~64 KiB."""
_BLOCK = 512
_READ = 1 << 20
_ENCODING = tarfile.ENCODING


@dataclass
class ArchiveStats:
    """What one archive cost: stream bytes, new chunk bytes, stored blob bytes."""

    walk: WalkStats
    size: int = 0
    new: int = 0
    stored: int = 0
    reused: int = 0
    chunks: int = 0
    reused_entries: int = 0
    """Members whose headers (and data, for small files) were reused unread."""
    reused_files: int = 0
    """Large files whose data chunks were reused without reading (:mod:`.ctreuse`)."""
    reused_data: int = 0
    sparse_files: int = 0
    holes: int = 0
    """Bytes of holes not stored."""
    catalog: SinkStats = field(default_factory=SinkStats)


def _run_start(relpath: str) -> bool:
    return zlib.crc32(relpath.encode("utf-8", "surrogateescape")) % RUN_SPACING == 0


def _segments(fd: int, size: int) -> list[tuple[int, int]]:
    """The data segments ``(offset, length)`` of a file, holes left out."""
    segments: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from pos to the end
                break
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        segments.append((start, end - start))
        pos = end
    return segments


def _sparse_map(segments: list[tuple[int, int]], size: int) -> bytes:
    """GNU tar's PAX sparse 1.0 map: count, then offset/length lines, padded."""
    if not segments or sum(segments[-1]) < size:
        segments = [*segments, (size, 0)]  # a trailing hole: GNU tar's convention
    text = f"{len(segments)}\n" + "".join(f"{o}\n{n}\n" for o, n in segments)
    raw = text.encode("ascii")
    return raw + bytes(-len(raw) % _BLOCK)


class _ArchiveWriter:
    """Writes the members of one archive into ``sink``, the catalog into ``cat``."""

    def __init__(
        self,
        sink: CdcSink,
        cat: CdcSink,
        limiter: TokenBucket,
        progress: ProgressLog,
        stats: ArchiveStats,
        store: Datastore,
        previous: PreviousArchive | None,
        ids: ContainerIds,
    ) -> None:
        self.store = store
        self.previous = previous
        self.ids = ids
        self.inodes: dict[tuple[int, int], str] = {}
        self.group: list[tuple[Entry, str | None]] = []
        self.sink = sink
        self.cat = cat
        self.limiter = limiter
        self.progress = progress
        self.stats = stats
        cat.write(CATALOG_MAGIC)

    def feed(self, entry: Entry) -> None:
        """Take the next entry in walk order (members are written run by run).

        A run of members starts on a chunk boundary at a directory or a member
        :func:`_run_start` picks, and ends before the next run or with the headers
        of a large file (whose data starts on a boundary). An unchanged run is
        reused whole from the previous archive.
        """
        st = entry.st
        if stat.S_ISSOCK(st.st_mode):
            self.stats.walk.skipped += 1  # tar cannot hold sockets
            return
        if entry.is_dir or _run_start(entry.relpath):
            self._flush(data_follows=False)
            self.sink.cut()
        link = hardlink_target(self.inodes, entry)
        self.group.append((entry, link))
        if stat.S_ISREG(st.st_mode) and link is None and st.st_size >= ALIGN_MIN:
            self._flush(data_follows=True)

    def finish(self) -> None:
        self._flush(data_follows=False)

    def _flush(self, data_follows: bool) -> None:
        group, self.group = self.group, []
        if not group:
            return
        found = None
        if self.previous is not None:
            found = self.previous.group(self.store, group, self.ids, data_follows)
        if found is None:
            for entry, link in group:
                info = tar_info(entry, self.ids, link)
                if info is None:
                    self.stats.walk.skipped += 1
                    continue
                self.stats.walk.entries += 1
                if info.type == tarfile.REGTYPE:
                    self.stats.walk.data += info.size
                self.add(entry, info)
            return
        prevs, chunks = found
        self.sink.cut()
        shift = self.sink.offset - prevs[0].header_offset
        for length, digest in chunks:
            self.sink.append_known(length, digest)
        for n, prev in enumerate(prevs, 1):
            self.cat.write(encode_entry(prev, shift))
            self.stats.walk.entries += 1
            self.stats.reused_entries += 1
            if prev.kind == "0":
                self.stats.walk.data += prev.size
                if not (data_follows and n == len(prevs)):  # that one's data: below
                    self.stats.reused_data += prev.size
        if data_follows:
            self._file_data(group[-1][0], prevs[-1])

    def _file_data(self, entry: Entry, prev: CatalogEntry) -> None:
        """The data of a large file whose headers were reused; its run's end."""
        assert self.previous is not None
        chunks = self.previous.file_data(self.store, prev)
        if chunks is not None:
            for length, digest in chunks:
                self.sink.append_known(length, digest)
            self.stats.reused_files += 1
            self.stats.reused_data += prev.size
        else:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                self._copy(fd, 0, prev.size)
            finally:
                os.close(fd)
            self.sink.write(bytes(-prev.size % _BLOCK))
        self.sink.cut()

    def add(self, entry: Entry, info: tarfile.TarInfo) -> None:
        header_offset = self.sink.offset
        flags = 0
        aligned = info.type == tarfile.REGTYPE and info.size >= ALIGN_MIN
        segments: list[tuple[int, int]] | None = None
        sparse_map = b""
        fd = -1
        reuse = None
        if self.previous is not None and info.type == tarfile.REGTYPE and info.size >= ALIGN_MIN:
            reuse = self.previous.chunks_for(self.store, entry, info)
        try:
            if reuse is not None:
                pass  # the data comes from the previous archive's chunks, unread
            elif info.type == tarfile.REGTYPE and info.size:
                fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                segments = [(0, info.size)]
                if entry.st.st_blocks * 512 < info.size:
                    found = _segments(fd, info.size)
                    if sum(n for _, n in found) < info.size:
                        segments, flags = found, SPARSE
                        sparse_map = self._make_sparse(info, segments)
            data_size = info.size
            self.sink.write(info.tobuf(tarfile.PAX_FORMAT, _ENCODING, "surrogateescape"))
            if aligned:
                flags |= ALIGNED
                self.sink.cut()
            data_offset = self.sink.offset
            if reuse is not None:
                for length, digest in reuse:
                    self.sink.append_known(length, digest)
                self.stats.reused_files += 1
                self.stats.reused_data += data_size
            elif segments is not None:
                self.sink.write(sparse_map)
                for offset, length in segments:
                    self._copy(fd, offset, length)
                self.sink.write(bytes(-data_size % _BLOCK))
            if flags & ALIGNED:
                self.sink.cut()
        finally:
            if fd >= 0:
                os.close(fd)
        st = entry.st
        real_size = int(info.pax_headers.get("GNU.sparse.realsize", data_size))
        self.cat.write(
            encode_entry(
                CatalogEntry(
                    entry.relpath, info.type.decode("ascii"), info.mode, info.uid, info.gid,
                    real_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                    header_offset, data_offset, data_size, flags, info.linkname,
                )  # fmt: skip
            )
        )

    def _make_sparse(self, info: tarfile.TarInfo, segments: list[tuple[int, int]]) -> bytes:
        real_name, size = info.name, info.size
        head, _, tail = real_name.rpartition("/")
        sparse_map = _sparse_map(segments, size)
        stored = sum(n for _, n in segments)
        # "path" first: GNU tar lets GNU.sparse.name win over a later path anyway,
        # and tarfile then keeps our placeholder instead of adding its own.
        info.pax_headers = {
            "path": f"{head}/GNUSparseFile.0/{tail}",
            "GNU.sparse.major": "1",
            "GNU.sparse.minor": "0",
            "GNU.sparse.name": real_name,
            "GNU.sparse.realsize": str(size),
            **info.pax_headers,
        }
        info.size = len(sparse_map) + stored
        self.stats.sparse_files += 1
        self.stats.holes += size - stored
        return sparse_map

    def _copy(self, fd: int, offset: int, length: int) -> None:
        """Exactly ``length`` bytes from ``offset``: a file that shrank while we read
        is padded with zeros (the header is written already), one that grew is cut."""
        done = 0
        while done < length:
            want = min(_READ, length - done)
            self.limiter.consume(want)
            data = os.pread(fd, want, offset + done)
            if not data:
                self.sink.write(bytes(length - done))
                break
            self.sink.write(data)
            done += len(data)
            self.progress.advance(len(data))


def backup_archive(
    store: Datastore,
    writer: SnapshotWriter,
    directory: str,
    sources: Sequence[str],
    id_map: Sequence[Sequence[str]],
    exclude_paths: Sequence[str],
    bandwidth_limit: int | None,
    log: LogFunction,
    previous: PreviousArchive | None = None,
) -> ArchiveStats:
    """Store ``directory``'s ``sources`` as device :data:`ARCHIVE_DEVICE` of ``writer``.

    ``previous``: the container's previous archive; unchanged large files reuse
    its chunks without being read (:mod:`.ctreuse`).

    :raises OSError: reading the source failed.
    """
    stats = ArchiveStats(WalkStats())
    walker = SourceWalker(directory, sources, exclude_paths)
    ids = ContainerIds(id_map)
    with (
        ExitStack() as stack,
        writer.dynamic_index_writer(ARCHIVE_DEVICE) as index,
        writer.dynamic_index_writer(CATALOG_DEVICE) as cat_index,
    ):
        sink = CdcSink(store, index)
        cat = CdcSink(store, cat_index, stats.catalog, avg_size=CATALOG_CDC_AVG)
        stack.callback(sink.close)
        stack.callback(cat.close)
        progress = ProgressLog(log, "container archive", None)
        out = _ArchiveWriter(
            sink, cat, TokenBucket(bandwidth_limit), progress, stats, store, previous, ids
        )
        for entry in walker:
            out.feed(entry)
        out.finish()
        # End of archive: two zero blocks, padded to tar's 10 KiB record, in a
        # chunk of their own (so that the last run of members can be reused).
        sink.cut()
        end = sink.offset + 2 * _BLOCK
        sink.write(bytes(2 * _BLOCK + (-end % tarfile.RECORDSIZE)))
        sink.finish()
        cat.finish()
        progress.finish()
    stats.walk.excluded = walker.excluded
    s = sink.stats
    stats.size, stats.new, stats.stored, stats.reused, stats.chunks = (
        s.size, s.new, s.stored, s.reused, s.chunks,
    )  # fmt: skip
    writer.metadata[ARCHIVE_FORMAT_KEY] = ARCHIVE_FORMAT
    return stats


def _stream(store: Datastore, index: FixedIndex | DynamicIndex) -> Iterator[bytes]:
    """The stream's chunks in order, each verified (hostile storage)."""
    for i in range(len(index)):
        _, length = index.extent(i)
        digest = index.digest(i)
        yield bytes(length) if digest == ZERO_DIGEST else store.read_chunk(digest, length)


def read_catalog(store: Datastore, snap: Snapshot) -> list[CatalogEntry]:
    """The catalog of a format-2 archive, verified chunk by chunk."""
    return list(stream_catalog(store, snap))


def stream_catalog(store: Datastore, snap: Snapshot) -> Iterator[CatalogEntry]:
    """The catalog's records in stream order, its chunks read (and verified) as the
    caller goes: memory stays at one chunk, whatever the number of files.

    The indexes are opened now; chunk and record errors come while iterating.
    """
    archive = snap.open_index(ARCHIVE_DEVICE)
    index = snap.open_index(CATALOG_DEVICE)
    name = f"{snap.id} {CATALOG_DEVICE}"
    return iter_catalog(_stream(store, index), archive.size, name=name)


class TarFeeder:
    """Serves a snapshot's archive stream through a FIFO in a private directory."""

    def __init__(self, store: Datastore, snap: Snapshot) -> None:
        # Opened before the FIFO exists: a damaged or missing index fails here, clearly.
        self._index = snap.open_index(ARCHIVE_DEVICE)
        self._store = store
        self._label = f"{snap.id} {ARCHIVE_DEVICE}"
        self.failures: list[str] = []
        self._dir = Path(tempfile.mkdtemp(prefix="pvebackup-ct-"))  # mode 0700
        self.path = self._dir / "archive.tar"
        os.mkfifo(self.path, 0o600)
        self._thread = threading.Thread(target=self._feed, name="tar-feeder", daemon=True)
        self._thread.start()

    def _feed(self) -> None:
        try:
            with open(self.path, "wb") as out:
                for chunk in _stream(self._store, self._index):
                    out.write(chunk)
        except BrokenPipeError:
            self.failures.append(f"{self._label}: the reader stopped early")
        except (OSError, PveBackupError) as exc:
            self.failures.append(f"{self._label}: {exc}")

    def close(self) -> None:
        """Stop feeding (unblocking a writer nobody reads) and remove the directory.

        :raises CorruptChunkError: a chunk could not be read or verified.
        """
        if self._thread.is_alive():
            # A reader that never came (or left): open and close our own read end so
            # the writer's open returns and its next write fails with EPIPE.
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
                os.close(fd)
            except OSError:
                pass
            self._thread.join(timeout=30)
        shutil.rmtree(self._dir, ignore_errors=True)
        corrupt = [f for f in self.failures if "stopped early" not in f]
        if corrupt:
            raise CorruptChunkError("; ".join(corrupt))


_TAR_EXTRACT = (
    "tar", "--extract", "--file=-", "--numeric-owner", "--same-owner",
    "--preserve-permissions", "--xattrs", "--xattrs-include=*", "--acls",
    "--delay-directory-restore",
)  # fmt: skip


def extract_directory(store: Datastore, snap: Snapshot, log: LogFunction) -> Path:
    """Extract the archive into a new private directory; returns ``<dir>/root``.

    Ownership is the container ids (what ``backup-dir``'s directory format holds);
    the host's copy into the target maps them, inside the container's user
    namespace for an unprivileged one. The parent is 0700 and root's: nothing in
    it (setuid files, file capabilities) is reachable by anyone but root.
    GNU tar refuses member names with ``..`` and extracts symlinks leaving the
    tree as placeholders until the end, so a hostile archive cannot write outside.

    :raises CorruptChunkError: a chunk is missing or damaged (nothing is returned).
    :raises ExternalToolError: tar failed.
    """
    index = snap.open_index(ARCHIVE_DEVICE)
    top = Path(tempfile.mkdtemp(prefix="pvebackup-ctdir-"))  # mode 0700
    root = top / "root"
    root.mkdir(mode=0o700)
    try:
        with proc.spawn(
            [*_TAR_EXTRACT, f"--directory={root}"],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as child:
            assert child.stdin is not None and child.stderr is not None
            try:
                for chunk in _stream(store, index):
                    child.stdin.write(chunk)
                child.stdin.close()
            except BrokenPipeError:
                pass  # tar stopped early: its status and message say why
            errors = child.stderr.read().decode("utf-8", "replace").strip()
            status = child.wait()
        if status != 0:
            raise ExternalToolError(f"tar could not extract {snap.id}: {errors[-2000:]}")
        if errors:
            log("warn", f"tar: {errors[-2000:]}")
        return root
    except BaseException:
        shutil.rmtree(top, ignore_errors=True)
        raise
