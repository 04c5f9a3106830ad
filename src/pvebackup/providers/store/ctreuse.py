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

import tarfile

from pvebackup.api.errors import PveBackupError
from pvebackup.api.types import GuestType, LogFunction
from pvebackup.kit.fswalk import Entry
from pvebackup.providers.store.catalog import ALIGNED, CatalogEntry
from pvebackup.providers.store.ctarchive import (
    ARCHIVE_DEVICE,
    ARCHIVE_FORMAT,
    ARCHIVE_FORMAT_KEY,
    read_catalog,
)
from pvebackup.store.datastore import Datastore
from pvebackup.store.dynindex import DynamicIndex

__all__ = ["PreviousArchive", "find_previous"]


class PreviousArchive:
    """The previous archive's aligned regular files, by path, and its index."""

    def __init__(self, volname: str, index: DynamicIndex, entries: list[CatalogEntry]) -> None:
        self.volname = volname
        self._index = index
        self._files = {
            e.path: e for e in entries if e.kind == "0" and e.flags == ALIGNED
        }

    def chunks_for(
        self, store: Datastore, entry: Entry, info: tarfile.TarInfo
    ) -> list[tuple[int, bytes]] | None:
        """``(length, digest)`` of the data chunks ``entry`` may reuse, or None."""
        prev = self._files.get(entry.relpath)
        st = entry.st
        if (
            prev is None
            or info.type != tarfile.REGTYPE
            or "GNU.sparse.major" in info.pax_headers
            or (prev.size, prev.data_size) != (info.size, info.size)
            or (prev.mtime_ns, prev.ctime_ns, prev.ino) != (st.st_mtime_ns, st.st_ctime_ns,
                                                             st.st_ino)
            or (prev.mode, prev.uid, prev.gid) != (info.mode, info.uid, info.gid)
        ):
            return None
        index = self._index
        # The catalog is storage content: its range must be whole chunks there.
        if not (index.is_boundary(prev.data_offset) and index.is_boundary(prev.data_end)):
            return None
        if prev.data_end <= prev.data_offset:
            return None
        first, last = index.chunk_at(prev.data_offset), index.chunk_at(prev.data_end - 1)
        chunks = []
        for i in range(first, last + 1):
            digest = index.digest(i)
            if not store.has_chunk(digest):
                return None
            chunks.append((index.extent(i)[1], digest))
        return chunks


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
        entries = read_catalog(store, snap)
    except PveBackupError as exc:
        log("warn", f"previous backup {sid.volname} unusable for reuse, reading all files: {exc}")
        return None
    return PreviousArchive(sid.volname, index, entries)
