"""The catalog of a container archive: one record per member, in stream order.

Stored as its own stream (device ``root.catalog``, a dynamic index), so that a
listing or a single-file extract reads the catalog and then only the chunks of
the members it wants, never the whole archive. Layout (``docs/file-formats.md``,
"Container archives"): the 8-byte magic, then records::

    <BxIIIQqqQQQQBHH  kind, mode, uid, gid, size, mtime_ns, ctime_ns, ino,
                      header_offset, data_offset, data_size, flags,
                      path length, link length
    path bytes, link bytes

``kind`` is the tar type byte (``0`` file, ``5`` dir, ``2`` symlink, ``1`` hard
link, ``3``/``4`` devices, ``6`` fifo). ``header_offset`` is where the member's
first header (its PAX extended header) starts; ``data_offset``/``data_size``
where its data is (for a sparse file: the sparse map, then the data segments).
Flag ``ALIGNED``: the data starts and (padded to 512) ends on chunk boundaries,
so its chunk range is ``chunk_at(data_offset) .. chunk_at(data_end - 1)``;
metadata-mode reuse builds on that. Ownership is stored as container ids.

Threat: the catalog is read from storage. Every record is bounded (fixed header,
lengths at most 65535), offsets must lie inside the archive and increase, and a
truncated record is an error, not a short listing.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pvebackup.api.errors import CorruptIndexError
from pvebackup.store.formats import derive_magic

__all__ = [
    "ALIGNED",
    "CATALOG_DEVICE",
    "CATALOG_MAGIC",
    "SPARSE",
    "CatalogEntry",
    "encode_entry",
    "iter_catalog",
    "parse_catalog",
]

CATALOG_DEVICE = "root.catalog"
CATALOG_MAGIC = derive_magic("catalog v1")
ALIGNED = 0x01
SPARSE = 0x02
_FLAGS = ALIGNED | SPARSE
_REC = struct.Struct("<BxIIIQqqQQQQBHH")
_KINDS = frozenset(b"0125346")


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One archive member (see the module docstring for the fields)."""

    path: str
    """Relative to the container root, no leading ``./``; ``""`` is the root."""
    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    header_offset: int
    data_offset: int
    data_size: int
    flags: int
    link: str = ""

    @property
    def data_end(self) -> int:
        """Offset past the data and its padding to 512 bytes."""
        return self.data_offset + -(-self.data_size // 512) * 512


def encode_entry(e: CatalogEntry, shift: int = 0) -> bytes:
    """The record of ``e``, its offsets moved by ``shift`` (a reused member)."""
    path = e.path.encode("utf-8", "surrogateescape")
    link = e.link.encode("utf-8", "surrogateescape")
    head = _REC.pack(
        ord(e.kind), e.mode, e.uid, e.gid, e.size, e.mtime_ns, e.ctime_ns, e.ino,
        e.header_offset + shift, e.data_offset + shift, e.data_size, e.flags,
        len(path), len(link),
    )  # fmt: skip
    return head + path + link


def parse_catalog(data: bytes, archive_size: int, *, name: str) -> Iterator[CatalogEntry]:
    """The records of catalog ``data`` of an archive of ``archive_size`` bytes.

    :raises CorruptIndexError: bad magic, a truncated or out-of-range record.
    """
    return iter_catalog([data], archive_size, name=name)


def iter_catalog(
    pieces: Iterable[bytes], archive_size: int, *, name: str
) -> Iterator[CatalogEntry]:
    """:func:`parse_catalog` over the catalog's bytes in pieces (its chunks), holding
    only one record and one piece at a time: a catalog of a million files is read in
    stream order without ever being whole in memory.

    :raises CorruptIndexError: bad magic, a truncated or out-of-range record.
    """

    def bad(reason: str) -> CorruptIndexError:
        return CorruptIndexError(f"{name}: {reason}")

    source = iter(pieces)
    buf = bytearray()
    pos = 0  # of buf[0] in the catalog
    at = 0  # read position in buf

    def fill(n: int) -> bool:
        """At least ``n`` bytes from ``at`` in ``buf``; False at the end of the catalog."""
        nonlocal buf, at, pos
        while len(buf) - at < n:
            piece = next(source, None)
            if piece is None:
                return False
            if at:
                del buf[:at]
                pos += at
                at = 0
            buf += piece
        return True

    if not fill(8) or bytes(buf[:8]) != CATALOG_MAGIC:
        raise bad("not a catalog (bad magic)")
    at, last = 8, -1
    while fill(1):
        here = pos + at
        if not fill(_REC.size):
            raise bad(f"truncated record at {here}")
        (kind, mode, uid, gid, size, mtime, ctime, ino,
         header, offset, dsize, flags, plen, llen) = _REC.unpack_from(buf, at)  # fmt: skip
        if not fill(_REC.size + plen + llen):
            raise bad(f"truncated record at {here}")
        # Offsets a reader will seek to: inside the archive, in stream order.
        if (
            kind not in _KINDS
            or flags & ~_FLAGS
            or not last < header <= offset
            or offset + dsize > archive_size
        ):
            raise bad(f"record at {here} is out of range")
        last = header
        body = at + _REC.size
        path = bytes(buf[body : body + plen]).decode("utf-8", "surrogateescape")
        link = bytes(buf[body + plen : body + plen + llen]).decode("utf-8", "surrogateescape")
        at = body + plen + llen
        yield CatalogEntry(
            path, chr(kind), mode, uid, gid, size, mtime, ctime, ino,
            header, offset, dsize, flags, link,
        )  # fmt: skip
