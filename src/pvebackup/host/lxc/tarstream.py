"""Container file trees as tar streams: parsing (hostile input) and writing.

Every container restore reads a tar stream: a provider's archive (zstd, gzip,
bzip2, xz or plain, recognised by magic), or the PAX stream the host makes of a
provider's directory to hand it to the restore helper in the container's user
namespace (:mod:`pvebackup.host.lxc.userns`). Python's ``tarfile`` only parses
(``mode="r|"``); :class:`~pvebackup.host.lxc.writer.SafeTreeWriter` creates the
objects (``tarfile``'s ``extract*`` have no filters before 3.12 and follow
symlinks).

The stream comes from backup storage, so it is hostile. What ``tarfile`` alone
would let it do, and what stops it here:

- *Unbounded memory*: a PAX or GNU long-name header is read whole, whatever size
  it claims; headers may chain (each PAX header recursing into the next); global
  headers accumulate; the old GNU sparse format and GNU sparse 1.0 read maps of
  any length; ``tarfile`` keeps every member ever read; the ``r|*`` decompressors
  inflate a whole input block at once (16 KiB of bzip2 can be gigabytes). Here
  header sizes, chain depth, global headers and sparse maps are bounded, members
  are dropped once written, and decompression goes through streaming readers with
  bounded output per read.
- *Silent truncation*: ``tarfile`` ends the archive without a word at a damaged
  header in the middle; here that is an :class:`IntegrityError`.
- *Stray exceptions*: malformed numbers and maps raise ``ValueError`` and friends
  deep inside ``tarfile``; every parse failure becomes :class:`IntegrityError`.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from decimal import Decimal, InvalidOperation
from typing import IO, Any, BinaryIO

import zstandard

from pvebackup.api.acl import acl_text_to_xattr
from pvebackup.api.errors import IntegrityError, PveBackupError
from pvebackup.api.types import LogFunction
from pvebackup.host.lxc.writer import Entry, EntryKind, Reader, SafeTreeWriter
from pvebackup.kit.oserrors import os_error

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_SPARSE_SEGMENTS",
    "iter_tar",
    "restore_tar_stream",
    "write_pax_stream",
]

MAX_HEADER_BYTES = 1 << 20
"""Largest PAX or GNU long-name header accepted. Linux caps a path at 4 KiB and a
file's xattrs at 64 KiB each; a MiB is generous and keeps memory bounded."""

MAX_HEADER_CHAIN = 8
"""Headers (PAX, long name, long link) in front of one member; real archives use 3."""

MAX_SPARSE_SEGMENTS = 1 << 18
"""Data segments of one sparse member (a map of this size is ~35 MiB in memory)."""

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b\x08"  # and deflate
_BZIP2_BLOCK = b"1AY&SY"  # BCD pi: the magic of a bzip2 block, after "BZh" and a level
_XZ_MAGIC = b"\xfd7zXZ\x00"
_XATTR_PREFIX = "SCHILY.xattr."
_ACL_TEXT = {
    "SCHILY.acl.access": "system.posix_acl_access",
    "SCHILY.acl.default": "system.posix_acl_default",
}
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to chown
_MAX_TIME_NS = 2**63 - 1
# The parts of tarfile that typeshed does not describe (its header errors, nti).
_tar: Any = tarfile
_EXTENDED_TYPES = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)

# Everything the parsing side of tarfile, zstandard and the stdlib decompressors
# raise on malformed input (OSError: gzip's BadGzipFile, bz2's "Invalid data stream").
_PARSE_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError,
    zstandard.ZstdError,
    lzma.LZMAError,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    OverflowError,
    IndexError,
    KeyError,
    RecursionError,
)


class _BoundedTarInfo(tarfile.TarInfo):
    """A ``TarInfo`` whose parsing keeps memory bounded (see the module doc).

    The overridden ``_proc_*`` hooks are CPython 3.11's (Debian 12's Python), with
    bounds added; ``tf`` is the ``TarFile`` being read.
    """

    @classmethod
    def fromtarfile(cls, tf: Any) -> Any:
        depth = getattr(tf, "_pvb_depth", 0)
        if depth >= MAX_HEADER_CHAIN:
            raise _tar.SubsequentHeaderError(f"more than {MAX_HEADER_CHAIN} chained headers")
        tf._pvb_depth = depth + 1
        try:
            return super().fromtarfile(tf)
        except (_tar.InvalidHeaderError, _tar.TruncatedHeaderError) as exc:
            # tarfile takes a bad header after the first one for the end of the
            # archive: a damaged archive would restore half, silently.
            if tf.offset != 0:
                raise _tar.SubsequentHeaderError(str(exc)) from None
            raise
        finally:
            tf._pvb_depth = depth

    def _proc_member(self, tf: Any) -> Any:
        if self.type in _EXTENDED_TYPES and not 0 <= self.size <= MAX_HEADER_BYTES:
            raise _tar.SubsequentHeaderError(
                f"extended header of {self.size} bytes (at most {MAX_HEADER_BYTES})"
            )
        result = super()._proc_member(tf)  # type: ignore[misc]
        if sum(len(k) + len(v) for k, v in tf.pax_headers.items()) > MAX_HEADER_BYTES:
            raise _tar.SubsequentHeaderError("global headers too large")
        return result

    def _proc_sparse(self, tf: Any) -> Any:
        # CPython's loop over the extension blocks, bounded.
        structs, isextended, origsize = self._sparse_structs  # type: ignore[attr-defined]
        del self._sparse_structs  # type: ignore[attr-defined]
        while isextended:
            if len(structs) > MAX_SPARSE_SEGMENTS:
                raise _tar.SubsequentHeaderError("sparse map too long")
            buf = tf.fileobj.read(tarfile.BLOCKSIZE)
            if len(buf) != tarfile.BLOCKSIZE:
                raise _tar.SubsequentHeaderError("truncated sparse header")
            pos = 0
            for _ in range(21):
                try:
                    offset = _tar.nti(buf[pos : pos + 12])
                    numbytes = _tar.nti(buf[pos + 12 : pos + 24])
                except ValueError:
                    break
                if offset and numbytes:
                    structs.append((offset, numbytes))
                pos += 24
            isextended = bool(buf[504])
        self.sparse = structs
        self.offset_data = tf.fileobj.tell()
        tf.offset = self.offset_data + self._block(self.size)  # type: ignore[attr-defined]
        self.size = origsize
        return self

    def _proc_gnusparse_10(self, next: Any, pax_headers: Any, tf: Any) -> None:  # noqa: A002
        # CPython's reader of the map in front of the data, bounded.
        sparse: list[int] = []
        buf = tf.fileobj.read(tarfile.BLOCKSIZE)
        fields_text, buf = buf.split(b"\n", 1)
        fields = int(fields_text)
        if not 0 <= fields <= MAX_SPARSE_SEGMENTS:
            raise _tar.SubsequentHeaderError(f"sparse map of {fields} segments")
        while len(sparse) < fields * 2:
            if b"\n" not in buf:
                # A number is at most a few dozen digits; more is garbage.
                more = tf.fileobj.read(tarfile.BLOCKSIZE)
                if not more or len(buf) > 64:
                    raise _tar.SubsequentHeaderError("bad sparse map")
                buf += more
            number, buf = buf.split(b"\n", 1)
            sparse.append(int(number))
        next.offset_data = tf.fileobj.tell()
        next.sparse = list(zip(sparse[::2], sparse[1::2], strict=True))


class _CheckedReader:
    """A member's contents; a read failure is the archive's fault: IntegrityError."""

    def __init__(self, inner: IO[bytes], label: str) -> None:
        self._inner = inner
        self._label = label

    def read(self, size: int = -1, /) -> bytes:
        try:
            return self._inner.read(size)
        except _PARSE_ERRORS as exc:
            raise IntegrityError(f"{self._label}: corrupt tar archive: {exc}") from exc


def _decompressing(raw: BinaryIO) -> tuple[Any, list[Any]]:
    """The stream with its compression (by magic) undone; objects to close after."""
    buffered: Any = raw if hasattr(raw, "peek") else io.BufferedReader(raw)
    # A plain tar starts with its first member's name, which may be "BZh...":
    # magics are checked as far as they go.
    magic = buffered.peek(10)[:10]
    reader: Any
    if magic.startswith(_ZSTD_MAGIC):
        # The default window limit (128 MiB) bounds what a frame may make us hold.
        reader = zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)
    elif magic.startswith(_GZIP_MAGIC):
        reader = gzip.GzipFile(fileobj=buffered, mode="rb")
    elif magic[:3] == b"BZh" and magic[3:4] in b"123456789" and magic[4:] == _BZIP2_BLOCK:
        reader = bz2.BZ2File(buffered, mode="rb")
    elif magic.startswith(_XZ_MAGIC):
        reader = lzma.LZMAFile(buffered, mode="rb")
    else:
        reader = buffered
    closers: list[Any] = [reader] if reader is not buffered else []
    if buffered is not raw:
        closers.append(buffered)
    return reader, closers


def _pax_time_ns(pax: Mapping[str, str], key: str) -> int | None:
    value = pax.get(key)
    if value is None:
        return None
    try:
        ns = int(Decimal(value) * 1_000_000_000)
    except (InvalidOperation, ValueError, OverflowError):
        return None
    return ns if -_MAX_TIME_NS <= ns <= _MAX_TIME_NS else None


def _tar_kind(member: tarfile.TarInfo) -> EntryKind | None:
    if member.isreg():
        return EntryKind.FILE
    if member.isdir():
        return EntryKind.DIR
    if member.issym():
        return EntryKind.SYMLINK
    if member.islnk():
        return EntryKind.HARDLINK
    if member.ischr():
        return EntryKind.CHR
    if member.isblk():
        return EntryKind.BLK
    if member.isfifo():
        return EntryKind.FIFO
    return None


def _tar_xattrs(member: tarfile.TarInfo, log: LogFunction) -> dict[str, bytes]:
    xattrs: dict[str, bytes] = {}
    # tarfile decodes PAX values as UTF-8 with surrogateescape: undo it for bytes.
    for key, value in member.pax_headers.items():
        if key.startswith(_XATTR_PREFIX):
            name = key[len(_XATTR_PREFIX) :]
            if name and "\0" not in name:
                xattrs[name] = value.encode("utf-8", "surrogateescape")
    for key, xattr in _ACL_TEXT.items():
        text = member.pax_headers.get(key)
        if text and xattr not in xattrs:
            try:
                xattrs[xattr] = acl_text_to_xattr(text)
            except ValueError as exc:
                log("warn", f"{member.name}: ACL {text!r} skipped: {exc}")
    return xattrs


def _check_sparse(member: tarfile.TarInfo) -> None:
    """A sparse map must be ordered and inside the file, or reading it loops or seeks back."""
    end = 0
    sparse: Any = member.sparse
    for offset, numbytes in sparse or ():
        if offset < end or numbytes < 0 or offset + numbytes > member.size:
            raise IntegrityError(f"{member.name!r}: bad sparse map")
        end = offset + numbytes
    if sparse is not None and len(sparse) > MAX_SPARSE_SEGMENTS:
        raise IntegrityError(f"{member.name!r}: sparse map too long")


def _tar_entry(member: tarfile.TarInfo, kind: EntryKind, log: LogFunction) -> Entry:
    if not (0 <= member.uid <= _MAX_ID and 0 <= member.gid <= _MAX_ID):
        raise IntegrityError(f"{member.name!r}: owner {member.uid}:{member.gid} out of range")
    rdev = 0
    if kind in (EntryKind.CHR, EntryKind.BLK):
        if not (0 <= member.devmajor < 2**32 and 0 <= member.devminor < 2**32):
            raise IntegrityError(f"{member.name!r}: device number out of range")
        rdev = os.makedev(member.devmajor, member.devminor)
    mtime = _pax_time_ns(member.pax_headers, "mtime")
    if mtime is None:
        mtime = int(member.mtime) * 1_000_000_000
        if not -_MAX_TIME_NS <= mtime <= _MAX_TIME_NS:
            raise IntegrityError(f"{member.name!r}: mtime out of range")
    if kind is EntryKind.FILE:
        _check_sparse(member)
    return Entry(
        name=member.name,
        kind=kind,
        mode=member.mode & 0o7777,
        uid=member.uid,
        gid=member.gid,
        mtime_ns=mtime,
        atime_ns=_pax_time_ns(member.pax_headers, "atime"),
        linkname=member.linkname,
        rdev=rdev,
        size=member.size,
        xattrs=_tar_xattrs(member, log),
    )


def iter_tar(
    raw: BinaryIO, log: LogFunction, *, label: str
) -> Iterator[tuple[Entry, Reader | None]]:
    """Yield the entries of a (compressed) tar stream, with a reader for file contents.

    Read a file's contents before asking for the next entry (it is a stream).
    Unsupported member types (sockets, ...) are skipped with a warning. Raises
    :class:`IntegrityError` for anything malformed; memory stays bounded (see
    the module doc).
    """
    closers: list[Any] = []
    try:
        try:
            stream, closers = _decompressing(raw)
            tf = tarfile.open(
                fileobj=stream,
                mode="r|",
                encoding="utf-8",
                errors="surrogateescape",
                tarinfo=_BoundedTarInfo,
            )
        except _PARSE_ERRORS as exc:
            raise IntegrityError(f"{label}: not a readable tar archive: {exc}") from exc
        with tf:
            while True:
                try:
                    member = tf.next()
                    # Stream mode keeps every member for random access we never do.
                    tf.members.clear()  # type: ignore[attr-defined]
                    if member is None:
                        return
                    kind = _tar_kind(member)
                    if kind is None:
                        log("warn", f"{member.name}: unsupported tar member type, skipped")
                        continue
                    entry = _tar_entry(member, kind, log)
                    data = tf.extractfile(member) if kind is EntryKind.FILE else None
                except PveBackupError:
                    raise
                except _PARSE_ERRORS as exc:
                    raise IntegrityError(f"{label}: corrupt tar archive: {exc}") from exc
                yield entry, (_CheckedReader(data, label) if data is not None else None)
    finally:
        for obj in closers:
            try:
                obj.close()
            except _PARSE_ERRORS:
                pass


def restore_tar_stream(
    raw: BinaryIO, writer: SafeTreeWriter, log: LogFunction, *, label: str
) -> int:
    """Write every entry of a tar stream through ``writer``; returns the entry count.

    Raises :class:`IntegrityError` for a malformed stream and whatever the writer
    raises (:class:`UnsafeArchiveError` for a hostile entry).
    """
    count = 0
    for entry, data in iter_tar(raw, log, label=label):
        writer.write(entry, data)
        count += 1
    writer.finish()
    return count


# -- writing -------------------------------------------------------------------

_TAR_TYPES = {
    EntryKind.FILE: tarfile.REGTYPE,
    EntryKind.DIR: tarfile.DIRTYPE,
    EntryKind.SYMLINK: tarfile.SYMTYPE,
    EntryKind.HARDLINK: tarfile.LNKTYPE,
    EntryKind.CHR: tarfile.CHRTYPE,
    EntryKind.BLK: tarfile.BLKTYPE,
    EntryKind.FIFO: tarfile.FIFOTYPE,
}


def _ns_text(ns: int) -> str:
    return format(Decimal(ns).scaleb(-9), "f")


def _tarinfo(entry: Entry, log: LogFunction) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.name or ".")
    info.type = _TAR_TYPES[entry.kind]
    info.mode = entry.mode & 0o7777
    info.uid, info.gid = entry.uid, entry.gid
    info.mtime = entry.mtime_ns // 1_000_000_000
    pax = {"mtime": _ns_text(entry.mtime_ns)}
    if entry.atime_ns is not None:
        pax["atime"] = _ns_text(entry.atime_ns)
    info.linkname = entry.linkname
    if entry.kind in (EntryKind.CHR, EntryKind.BLK):
        info.devmajor, info.devminor = os.major(entry.rdev), os.minor(entry.rdev)
    info.size = entry.size if entry.kind is EntryKind.FILE else 0
    for key, value in entry.xattrs.items():
        # A PAX record is "keyword=value\n", split at the first "=".
        if "=" in key or "\n" in key or not key.isprintable():
            log("warn", f"{entry.name}: xattr {key!r} cannot be carried, skipped")
            continue
        pax[_XATTR_PREFIX + key] = value.decode("utf-8", "surrogateescape")
    info.pax_headers = pax
    return info


def write_pax_stream(
    entries: Iterable[tuple[Entry, Reader | None]],
    out: BinaryIO,
    log: LogFunction,
    *,
    between: Callable[[], None] = lambda: None,
) -> int:
    """Write entries as a PAX tar stream that :func:`iter_tar` reads back exactly.

    Nanosecond times, xattrs (raw bytes, ACLs included) and non-UTF-8 names survive.
    A regular file must deliver ``entry.size`` bytes: one that shrank meanwhile
    raises :class:`PveBackupError`. ``between`` is called after each entry.
    Returns the number of entries.
    """
    count = 0
    with tarfile.open(
        fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8",
        errors="surrogateescape",
    ) as tf:
        for entry, data in entries:
            info = _tarinfo(entry, log)
            try:
                tf.addfile(info, data if entry.kind is EntryKind.FILE else None)
            except OSError as exc:
                if isinstance(exc, BrokenPipeError):
                    raise
                raise os_error(exc, f"{entry.name}: changed while restoring") from exc
            count += 1
            between()
    return count

