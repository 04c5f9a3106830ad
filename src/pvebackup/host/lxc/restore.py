"""Container restore: fill new target directories from a tar archive or a directory.

The two restore mechanisms of the seed for containers. Both read objects with
*container* ids (what a provider stores) and write them through
:class:`~pvebackup.host.lxc.writer.SafeTreeWriter`, which maps the ids to the
target container's host ids and refuses hostile entries (see that module).

``targets`` maps container paths to the host directories to fill: ``"/"`` for the
root file system, ``"/srv/data"`` for a mount point; each entry goes to the target
with the longest matching prefix. On any error the restore stops; the targets
then hold a partial tree which the caller removes.

Python's ``tarfile`` is used only to parse the stream (``mode="r|"``): its
``extract*`` functions are not used, since before 3.12 (Debian 12 has 3.11.2)
they have no extraction filters and follow symlinks.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import BinaryIO

import zstandard

from pvebackup.api.acl import acl_text_to_xattr
from pvebackup.api.errors import IntegrityError, PveBackupError
from pvebackup.api.types import IdMapEntry, LogFunction
from pvebackup.host.lxc.writer import Entry, EntryKind, SafeTreeWriter

__all__ = ["copy_directory", "extract_tar"]

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_XATTR_PREFIX = "SCHILY.xattr."
_ACL_TEXT = {
    "SCHILY.acl.access": "system.posix_acl_access",
    "SCHILY.acl.default": "system.posix_acl_default",
}


def _pax_time_ns(pax: Mapping[str, str], key: str) -> int | None:
    value = pax.get(key)
    if value is None:
        return None
    try:
        return int(Decimal(value) * 1_000_000_000)
    except InvalidOperation:
        return None


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
            xattrs[key[len(_XATTR_PREFIX) :]] = value.encode("utf-8", "surrogateescape")
    for key, xattr in _ACL_TEXT.items():
        text = member.pax_headers.get(key)
        if text and xattr not in xattrs:
            try:
                xattrs[xattr] = acl_text_to_xattr(text)
            except ValueError as exc:
                log("warn", f"{member.name}: ACL {text!r} skipped: {exc}")
    return xattrs


def _tar_entry(member: tarfile.TarInfo, kind: EntryKind, log: LogFunction) -> Entry:
    mtime = _pax_time_ns(member.pax_headers, "mtime")
    return Entry(
        name=member.name,
        kind=kind,
        mode=member.mode & 0o7777,
        uid=member.uid,
        gid=member.gid,
        mtime_ns=mtime if mtime is not None else int(member.mtime) * 1_000_000_000,
        atime_ns=_pax_time_ns(member.pax_headers, "atime"),
        linkname=member.linkname,
        rdev=os.makedev(member.devmajor, member.devminor)
        if kind in (EntryKind.CHR, EntryKind.BLK)
        else 0,
        size=member.size,
        xattrs=_tar_xattrs(member, log),
    )


def _open_tar_stream(raw: BinaryIO) -> tuple[tarfile.TarFile, BinaryIO | None]:
    magic = raw.read(4)
    raw.seek(0)
    if magic == _ZSTD_MAGIC:
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        tf = tarfile.open(fileobj=reader, mode="r|", encoding="utf-8", errors="surrogateescape")
        return tf, reader
    # "r|*" recognises gzip, bzip2, xz and plain tar by their magic.
    tf = tarfile.open(fileobj=raw, mode="r|*", encoding="utf-8", errors="surrogateescape")
    return tf, None


def extract_tar(
    archive: Path,
    targets: Mapping[str, Path],
    id_map: Sequence[IdMapEntry],
    *,
    log: LogFunction,
) -> None:
    """Extract a (zstd, gzip, bzip2, xz or plain) tar archive into ``targets``.

    Member names are relative container paths (``./etc/passwd`` or ``etc/passwd``)
    with container ids. PAX ``SCHILY.xattr.*`` records become xattrs (POSIX ACLs
    as ``system.posix_acl_*`` raw values, their ids mapped); GNU tar's text ACLs
    (``SCHILY.acl.access``/``default``) are used when no raw value is present.
    Sockets and unknown member types are skipped with a warning.

    Raises :class:`UnsafeArchiveError` for a hostile member,
    :class:`IntegrityError` for an unreadable archive, :class:`PveBackupError`
    when writing fails.
    """
    with open(archive, "rb") as raw, SafeTreeWriter(targets, id_map, log) as writer:
        try:
            tf, reader = _open_tar_stream(raw)
        except (tarfile.TarError, zstandard.ZstdError) as exc:
            raise IntegrityError(f"{archive}: not a readable tar archive: {exc}") from exc
        count = 0
        try:
            with tf:
                for member in tf:
                    kind = _tar_kind(member)
                    if kind is None:
                        log("warn", f"{member.name}: unsupported tar member type, skipped")
                        continue
                    entry = _tar_entry(member, kind, log)
                    data = tf.extractfile(member) if kind is EntryKind.FILE else None
                    writer.write(entry, data)
                    count += 1
        except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
            raise IntegrityError(f"{archive}: corrupt tar archive: {exc}") from exc
        finally:
            if reader is not None:
                reader.close()
        writer.finish()
    log("info", f"restored {count} entries from {archive.name}")


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Yield (relative path, lstat) top-down, parents before children, sorted."""
    yield "", os.lstat(root)
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(root / rel if rel else root) as it:
            children = sorted(it, key=lambda e: e.name)
        subdirs = []
        for child in children:
            child_rel = f"{rel}/{child.name}" if rel else child.name
            st = child.stat(follow_symlinks=False)
            yield child_rel, st
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(child_rel)
        stack.extend(reversed(subdirs))


def _read_xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in names}


_MODE_KINDS = {
    stat.S_IFREG: EntryKind.FILE,
    stat.S_IFDIR: EntryKind.DIR,
    stat.S_IFLNK: EntryKind.SYMLINK,
    stat.S_IFCHR: EntryKind.CHR,
    stat.S_IFBLK: EntryKind.BLK,
    stat.S_IFIFO: EntryKind.FIFO,
}


def copy_directory(
    source: Path,
    targets: Mapping[str, Path],
    id_map: Sequence[IdMapEntry],
    *,
    log: LogFunction,
) -> None:
    """Copy a directory holding a container's file system (with container ids).

    The same rules as :func:`extract_tar` apply: owners are mapped, hard links
    inside ``source`` (same inode) stay hard links, xattrs and ACLs are copied,
    symlinks are copied as they are and never followed, sockets are skipped.
    Raises :class:`UnsafeArchiveError` for a symlink leaving the root,
    :class:`PveBackupError` when reading or writing fails.
    """
    seen: dict[tuple[int, int], str] = {}
    count = 0
    with SafeTreeWriter(targets, id_map, log) as writer:
        try:
            for rel, st in _walk(source):
                path = source / rel if rel else source
                kind = _MODE_KINDS.get(stat.S_IFMT(st.st_mode))
                if kind is None:
                    log("warn", f"{rel}: sockets are not restored, skipped")
                    continue
                entry = Entry(
                    name=rel,
                    kind=kind,
                    mode=stat.S_IMODE(st.st_mode),
                    uid=st.st_uid,
                    gid=st.st_gid,
                    mtime_ns=st.st_mtime_ns,
                    atime_ns=st.st_atime_ns,
                    rdev=st.st_rdev,
                    size=st.st_size,
                    xattrs=_read_xattrs(path),
                )
                if kind is not EntryKind.DIR and st.st_nlink > 1:
                    first = seen.setdefault((st.st_dev, st.st_ino), rel)
                    if first != rel:
                        entry.kind = EntryKind.HARDLINK
                        entry.linkname = first
                        writer.write(entry)
                        count += 1
                        continue
                if kind is EntryKind.SYMLINK:
                    entry.linkname = os.readlink(path)
                if kind is EntryKind.FILE:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    with os.fdopen(fd, "rb") as data:
                        writer.write(entry, data)
                else:
                    writer.write(entry)
                count += 1
            writer.finish()
        except OSError as exc:
            raise PveBackupError(f"cannot read restore source {source}: {exc}") from exc
    log("info", f"restored {count} entries from {source}")
