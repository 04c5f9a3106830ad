"""Single files of a container archive, through its catalog (``pvebackup ls``/``extract``).

:class:`CatalogFiles` is the provider's :class:`~pvebackup.api.files.FsReader`:
the tree comes from the catalog alone (a listing reads no archive chunk), and a
file's data from the chunks of its ``[data_offset, data_offset + data_size)``
range of the archive's dynamic index, each read and verified by the datastore.
The host writes what it reads with its safe extractor.

Threat: the catalog and the stream come from storage. A path with ``..``, empty
or ``.`` components is never placed in the tree (it is reported as unreachable;
a last component of ``..`` reaches the extractor, which refuses unsafe names); a
record whose parent is missing or not a directory is unreachable too; a hard
link resolves only to an earlier regular file; a file's data must be exactly its
size, and a sparse map is parsed with bounds (segments in order, inside the
file, their sum the stored data). A chunk that fails its check is
:class:`CorruptChunkError` (the extraction stops); a record that does not add up
is :class:`CorruptFilesystemError` (that file is skipped, the rest extracted).
"""

from __future__ import annotations

import stat
from collections.abc import Iterator

from pvebackup.api.errors import CorruptFilesystemError, UnsupportedError
from pvebackup.api.files import Entry
from pvebackup.providers.store.catalog import SPARSE, CatalogEntry
from pvebackup.providers.store.ctarchive import (
    ARCHIVE_DEVICE,
    ARCHIVE_FORMAT,
    ARCHIVE_FORMAT_KEY,
    read_catalog,
)
from pvebackup.store.datastore import Datastore
from pvebackup.store.dynindex import DynamicIndex
from pvebackup.store.snapshot import Snapshot

__all__ = ["CatalogFiles"]

ROOT_INODE = 0
_TYPE = {
    "0": stat.S_IFREG, "1": stat.S_IFREG, "5": stat.S_IFDIR, "2": stat.S_IFLNK,
    "3": stat.S_IFCHR, "4": stat.S_IFBLK, "6": stat.S_IFIFO,
}  # fmt: skip
_HOLE_PIECE = 1 << 20
_MAX_NUMBER = 20  # digits of a u64: a longer line in a sparse map is forged


def _unsafe(part: str) -> bool:
    return part in ("", ".", "..")


class CatalogFiles:
    """The file tree of one format-2 container archive (inode = record number + 1)."""

    def __init__(
        self, store: Datastore, index: DynamicIndex, records: list[CatalogEntry], label: str
    ) -> None:
        self._store = store
        self._index = index
        self._label = label
        self._records = records
        self._by_path: dict[str, int] = {}
        self._children: dict[int, list[int]] = {ROOT_INODE: []}
        self.unreachable: list[str] = []
        """Paths of records that are in no directory of the tree (hostile or damaged)."""
        self._root_record: CatalogEntry | None = None
        self._cached: tuple[int, bytes] = (-1, b"")
        for n, rec in enumerate(self._records, 1):
            self._place(n, rec)

    @classmethod
    def open(cls, store: Datastore, snap: Snapshot) -> CatalogFiles:
        """The files of ``snap``'s archive; its catalog read (and verified) whole.

        :raises UnsupportedError: an archive without a catalog (format 1).
        :raises CorruptChunkError, CorruptIndexError: the catalog is damaged.
        """
        if snap.manifest.metadata.get(ARCHIVE_FORMAT_KEY) != ARCHIVE_FORMAT:
            raise UnsupportedError(
                f"{snap.id}: container archive of format 1 has no catalog; restore it whole"
            )
        index = snap.open_index(ARCHIVE_DEVICE)
        if not isinstance(index, DynamicIndex):
            raise UnsupportedError(f"{snap.id}: {ARCHIVE_DEVICE} is not a dynamic index")
        return cls(store, index, read_catalog(store, snap), f"{snap.id} {ARCHIVE_DEVICE}")

    def _place(self, inode: int, rec: CatalogEntry) -> None:
        if rec.path == "":
            if self._root_record is None and rec.kind == "5":
                self._root_record = rec
            return
        parent_path, _, name = rec.path.rpartition("/")
        parent = ROOT_INODE if parent_path == "" else self._by_path.get(parent_path)
        # Threat: "a/../../etc", "/etc" or "link/x" below a symlink would name a
        # place other than the one the tree shows: only clean paths below a known
        # directory count. An unsafe last component reaches the extractor, which
        # refuses it by name.
        if (
            parent is None
            or any(_unsafe(p) for p in rec.path.split("/")[:-1])
            or (parent != ROOT_INODE and self._records[parent - 1].kind != "5")
        ):
            self.unreachable.append(rec.path)
            return
        self._children.setdefault(parent, []).append(inode)
        if rec.kind == "5" and not _unsafe(name):
            self._children.setdefault(inode, [])
        self._by_path.setdefault(rec.path, inode)

    # -- FsReader ------------------------------------------------------------------

    def root(self) -> Entry:
        rec = self._root_record
        if rec is None:
            return Entry(b"/", ROOT_INODE, stat.S_IFDIR | 0o755, 0, 0, 0)
        return Entry(b"/", ROOT_INODE, stat.S_IFDIR | rec.mode & 0o7777, rec.uid, rec.gid, 0,
                     rec.mtime_ns)  # fmt: skip

    def list_dir(self, inode: int) -> list[Entry]:
        return [self._entry(n) for n in self._children.get(inode, [])]

    def _entry(self, inode: int) -> Entry:
        rec = self._records[inode - 1]
        size = rec.size
        if rec.kind == "1":
            target = self._link_target(inode, rec)
            size = 0 if target is None else target.size
        elif rec.kind != "0":
            size = 0
        name = rec.path.rpartition("/")[2].encode("utf-8", "surrogateescape")
        mode = _TYPE[rec.kind] | rec.mode & 0o7777
        return Entry(name, inode, mode, rec.uid, rec.gid, size, rec.mtime_ns)

    def _link_target(self, inode: int, rec: CatalogEntry) -> CatalogEntry | None:
        # A hard link names an earlier regular file (by its archive name, "./path"):
        # anything else is forged.
        n = self._by_path.get(rec.link.removeprefix("./"))
        if n is None or n >= inode or self._records[n - 1].kind != "0":
            return None
        return self._records[n - 1]

    def readlink(self, entry: Entry) -> bytes:
        return self._records[entry.inode - 1].link.encode("utf-8", "surrogateescape")

    def record(self, entry: Entry) -> CatalogEntry | None:
        """The catalog record behind ``entry`` (None for a synthesized root)."""
        return self._records[entry.inode - 1] if entry.inode else None

    def read(self, entry: Entry) -> Iterator[bytes]:
        rec = self._records[entry.inode - 1]
        shown = rec.path
        if rec.kind == "1":
            target = self._link_target(entry.inode, rec)
            if target is None:
                raise CorruptFilesystemError(f"{shown}: hard link to {rec.link!r}, no such file")
            rec = target
        if rec.kind != "0":
            raise CorruptFilesystemError(f"{shown}: not a regular file")
        if rec.flags & SPARSE:
            yield from self._sparse(rec, shown)
        elif rec.data_size != rec.size:
            raise CorruptFilesystemError(
                f"{shown}: {rec.data_size} bytes stored for a file of {rec.size}"
            )
        else:
            yield from self._bytes(rec.data_offset, rec.data_size)

    # -- the stream -----------------------------------------------------------------

    def _chunk(self, i: int) -> bytes:
        if self._cached[0] != i:
            _, length = self._index.extent(i)
            # Verified by the datastore: a damaged chunk is CorruptChunkError.
            self._cached = (i, self._store.read_chunk(self._index.digest(i), length))
        return self._cached[1]

    def _bytes(self, start: int, length: int) -> Iterator[bytes]:
        """Stream bytes ``[start, start + length)``, reading only their chunks."""
        if length <= 0:
            return
        end = start + length
        for i in range(self._index.chunk_at(start), self._index.chunk_at(end - 1) + 1):
            offset, size = self._index.extent(i)
            data = self._chunk(i)
            yield data[max(start, offset) - offset : min(end, offset + size) - offset]

    def _sparse(self, rec: CatalogEntry, shown: str) -> Iterator[bytes]:
        """A PAX sparse 1.0 member's data with its holes as zeros."""

        def bad(why: str) -> CorruptFilesystemError:
            return CorruptFilesystemError(f"{shown}: sparse map {why}")

        pieces = self._bytes(rec.data_offset, rec.data_size)
        buffer = b""
        numbers: list[int] = []
        want = 1
        consumed = 0
        while len(numbers) < want:
            line, nl, rest = buffer.partition(b"\n")
            if not nl:
                if len(buffer) > _MAX_NUMBER:
                    raise bad("has an overlong line")
                piece = next(pieces, None)
                if piece is None:
                    raise bad("is cut short")
                buffer += piece
                continue
            if not line.isdigit() or len(line) > _MAX_NUMBER:
                raise bad("holds a non-number")
            consumed += len(line) + 1
            numbers.append(int(line))
            buffer = rest
            if len(numbers) == 1:
                # Each segment costs at least 4 map bytes: a bigger count is forged.
                if numbers[0] > rec.data_size // 4:
                    raise bad(f"claims {numbers[0]} segments")
                want = 1 + 2 * numbers[0]
        map_size = -(-consumed // 512) * 512
        segments = list(zip(numbers[1::2], numbers[2::2], strict=True))
        pos = 0
        for offset, length in segments:
            if offset < pos or offset + length > rec.size:
                raise bad("has segments out of order or outside the file")
            pos = offset + length
        if map_size + sum(n for _, n in segments) != rec.data_size:
            raise bad("does not add up to the stored data")
        # Skip the map's padding, then hand out holes as zeros and segments as data.
        skip = map_size - consumed
        data = _Reader(pieces, buffer)
        for _ in data.take(skip):
            pass
        pos = 0
        for offset, length in segments:
            yield from _zeros(offset - pos)
            yield from data.take(length)
            pos = offset + length
        yield from _zeros(rec.size - pos)


def _zeros(n: int) -> Iterator[bytes]:
    while n > 0:
        step = min(n, _HOLE_PIECE)
        yield bytes(step)
        n -= step


class _Reader:
    """Takes exact byte counts from an iterator of pieces."""

    def __init__(self, pieces: Iterator[bytes], head: bytes) -> None:
        self._pieces = pieces
        self._head = head

    def take(self, n: int) -> Iterator[bytes]:
        while n > 0:
            if not self._head:
                piece = next(self._pieces, None)
                if piece is None:
                    raise CorruptFilesystemError("sparse data cut short")
                self._head = piece
            out, self._head = self._head[:n], self._head[n:]
            n -= len(out)
            yield out
