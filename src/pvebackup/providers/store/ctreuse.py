"""Metadata-mode reuse: unchanged large files keep their chunks without being read.

Like Proxmox Backup Server's "metadata" change detection. With the previous
format-2 archive of the same container, a regular file whose data is
chunk-aligned there (flag ``ALIGNED``, not sparse, not a hard link member) and
whose size, mtime (ns), ctime (ns), inode, mode and owner (container ids) are
unchanged gets its previous data chunks appended to the new index; only its
headers are written anew (from the current ``lstat`` and xattrs).

Why it is safe: a write to a file changes its mtime and ctime; resetting the
mtime (``touch -d``, ``utime``) sets the ctime to now, and nothing but the
kernel sets a ctime; an inode replaced by a rename has another number; an xattr
or ACL change moves the ctime (headers are rebuilt anyway). So equal metadata
means equal content, unless someone writes the block device under the file
system or sets the clock back: the same assumption rsync and PBS make.

Falls back to reading (always correct, only slower) when: there is no previous
snapshot of the container, it is format 1 or has no catalog, its catalog or
index cannot be read (logged), the file is not in it or any field differs, the
range is not on chunk boundaries in the previous index or its lengths disagree
(a hostile catalog), or one of its chunks is not in the store (any more: garbage
collection condemned it before this writer's session started, see
:mod:`pvebackup.store.gc`). When the host hands a fresh copy each time (ctime
and inode new on every run), nothing is reused and every file is read.
"""

from __future__ import annotations

import stat
import tarfile
from collections import deque
from collections.abc import Iterable

from pvebackup.api.errors import PveBackupError
from pvebackup.api.types import GuestType, LogFunction
from pvebackup.kit.fswalk import Entry
from pvebackup.kit.fsxattrs import IdTranslator
from pvebackup.providers.store.catalog import ALIGNED, CatalogEntry
from pvebackup.providers.store.ctarchive import (
    ARCHIVE_DEVICE,
    ARCHIVE_FORMAT,
    ARCHIVE_FORMAT_KEY,
    stream_catalog,
)
from pvebackup.store.datastore import Datastore
from pvebackup.store.dynindex import DynamicIndex

__all__ = ["PreviousArchive", "find_previous"]

_KIND = {
    stat.S_IFREG: "0", stat.S_IFDIR: "5", stat.S_IFLNK: "2", stat.S_IFCHR: "3",
    stat.S_IFBLK: "4", stat.S_IFIFO: "6",
}  # fmt: skip


def _walk_key(path: str) -> tuple[str, ...]:
    """Where ``path`` comes in walk order (depth first, names sorted: component-wise)."""
    return tuple(path.split("/")) if path else ()


class PreviousArchive:
    """The previous archive's catalog, read forward in walk order, and its index.

    The catalog is streamed (:func:`~.ctarchive.stream_catalog`), not loaded: a
    cursor moves forward as the walk does (both are depth first with names sorted),
    dropping records of paths the walk has passed and holding only the few records
    of the current run. A walk that jumps back (a mount point outside the root's
    tree, a catalog out of order) only misses reuse: every reuse still checks the
    path and metadata of each record. A catalog that turns out damaged mid-way
    (a chunk, a record) ends reuse there with one warning; nothing reused before
    depended on the damaged part.
    """

    def __init__(
        self,
        volname: str,
        index: DynamicIndex,
        entries: Iterable[CatalogEntry],
        log: LogFunction | None = None,
    ) -> None:
        self.volname = volname
        self._index = index
        self._source = iter(entries)
        self._ahead: deque[CatalogEntry] = deque()
        self._log = log
        self._ended = False

    def _fill(self, n: int) -> bool:
        """At least ``n`` records ahead; False if the catalog has fewer left."""
        while len(self._ahead) < n and not self._ended:
            try:
                self._ahead.append(next(self._source))
            except StopIteration:
                self._ended = True
            except PveBackupError as exc:
                self._ended = True
                if self._log is not None:
                    self._log("warn", f"previous backup {self.volname}: {exc}; reading the"
                                      " remaining files")  # fmt: skip
        return len(self._ahead) >= n

    def _seek(self, path: str) -> bool:
        """Drop the records before ``path``; True if the next one is ``path``'s."""
        key = _walk_key(path)
        while self._fill(1):
            head = self._ahead[0]
            if head.path == path:
                return True
            if _walk_key(head.path) > key:
                return False
            self._ahead.popleft()
        return False

    def _unchanged(self, prev: CatalogEntry, entry: Entry, ids: IdTranslator,
                   link: str | None) -> bool:
        st = entry.st
        kind = "1" if link is not None else _KIND.get(stat.S_IFMT(st.st_mode))
        return (
            kind == prev.kind
            and (link or "") == (prev.link if kind == "1" else "")
            and (prev.mtime_ns, prev.ctime_ns, prev.ino) == (st.st_mtime_ns, st.st_ctime_ns,
                                                             st.st_ino)
            and prev.mode == stat.S_IMODE(st.st_mode)
            and (prev.uid, prev.gid) == (ids.uid(st.st_uid), ids.gid(st.st_gid))
            and (kind != "0" or prev.size == st.st_size)
        )

    def _whole_chunks(
        self, store: Datastore, start: int, end: int
    ) -> list[tuple[int, bytes]] | None:
        """The chunks covering exactly ``[start, end)``, all in the store; else None."""
        index = self._index
        # The catalog is storage content: a range must be whole chunks of the index.
        if not (0 <= start < end <= index.size):
            return None
        if not (index.is_boundary(start) and index.is_boundary(end)):
            return None
        chunks = []
        for i in range(index.chunk_at(start), index.chunk_at(end - 1) + 1):
            digest = index.digest(i)
            if not store.has_chunk(digest):
                return None
            chunks.append((index.extent(i)[1], digest))
        return chunks

    def group(
        self,
        store: Datastore,
        entries: list[tuple[Entry, str | None]],
        ids: IdTranslator,
        data_follows: bool,
    ) -> tuple[list[CatalogEntry], list[tuple[int, bytes]]] | None:
        """Reuse for a run of members between two boundaries, or None.

        ``entries``: the run, with each one's hard link target. With
        ``data_follows`` the run ends with the headers of a large file, whose data
        starts on a boundary; else it ends where the next member starts. Returns
        the previous catalog records and the chunks of the run's bytes.
        """
        if not self._seek(entries[0][0].relpath) or not self._fill(len(entries)):
            return None
        prevs = [self._ahead[i] for i in range(len(entries))]
        try:
            for prev, (entry, link) in zip(prevs, entries, strict=True):
                if prev.path != entry.relpath or not self._unchanged(prev, entry, ids, link):
                    return None
        except ValueError:  # an id outside the map: the normal path reports it
            return None
        last = prevs[-1]
        if data_follows:
            if last.flags != ALIGNED:
                return None
            end = last.data_offset
        elif self._fill(len(entries) + 1):
            end = self._ahead[len(entries)].header_offset
        else:  # the archive's last run: the end-of-archive blocks follow a boundary
            end = last.data_end
        chunks = self._whole_chunks(store, prevs[0].header_offset, end)
        return None if chunks is None else (prevs, chunks)

    def file_data(self, store: Datastore, prev: CatalogEntry) -> list[tuple[int, bytes]] | None:
        """The chunks of an unchanged aligned file's data (padding included)."""
        if prev.flags != ALIGNED or prev.kind != "0" or prev.data_size != prev.size:
            return None
        return self._whole_chunks(store, prev.data_offset, prev.data_end)

    def chunks_for(
        self, store: Datastore, entry: Entry, info: tarfile.TarInfo
    ) -> list[tuple[int, bytes]] | None:
        """``(length, digest)`` of the data chunks ``entry`` may reuse, or None."""
        if info.type != tarfile.REGTYPE or "GNU.sparse.major" in info.pax_headers:
            return None
        if not self._seek(entry.relpath):
            return None
        prev, st = self._ahead[0], entry.st
        if (
            (prev.size, prev.mode, prev.uid, prev.gid) != (info.size, info.mode, info.uid, info.gid)
            or (prev.mtime_ns, prev.ctime_ns, prev.ino) != (st.st_mtime_ns, st.st_ctime_ns,
                                                             st.st_ino)
        ):
            return None
        return self.file_data(store, prev)


def find_previous(store: Datastore, vmid: int, log: LogFunction) -> PreviousArchive | None:
    """The newest format-2 archive of container ``vmid``, or None (then all is read)."""
    sids = store.list_snapshots(GuestType.LXC, vmid)
    if not sids:
        return None
    sid = sids[-1]
    try:
        snap = store.open_snapshot(sid)
        if snap.manifest.metadata.get(ARCHIVE_FORMAT_KEY) != ARCHIVE_FORMAT:
            return None
        index = snap.open_index(ARCHIVE_DEVICE)
        if not isinstance(index, DynamicIndex):
            return None
        entries = stream_catalog(store, snap)
    except PveBackupError as exc:
        log("warn", f"previous backup {sid.volname} unusable for reuse, reading all files: {exc}")
        return None
    return PreviousArchive(sid.volname, index, entries, log)
