"""A container's file system as a PAX tar stream; shared by both providers.

``backup-dir`` writes it zstd-compressed (``ct-format tar``, :func:`write_tar`);
``backup-store`` cuts the plain stream into chunks (:func:`write_pax_stream`).

What goes into each member, so that ``tar --xattrs --acls --numeric-owner -xpf``
restores the container exactly:

- names relative: ``./`` for the root, ``./etc/hostname`` below it;
- uid/gid as *container* ids (the reverse of ``id_map``), no user/group names;
- mode bits (with setuid/setgid/sticky) and mtimes with sub-second precision;
- symlinks, hard links (the second and later names of an inode become link
  members pointing at the first), character and block devices, fifos; sockets
  cannot be stored in tar and are skipped (counted in the log);
- every xattr as a ``SCHILY.xattr.<name>`` PAX record (raw bytes; values that
  are not UTF-8 make tarfile add ``hdrcharset=BINARY``), POSIX ACLs in addition
  as ``SCHILY.acl.access``/``SCHILY.acl.default`` text, both with container ids.

:func:`write_tar` sends the stream through zstandard (level 3, on all cores)
straight into the file; nothing is buffered beyond one read.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from pvebackup.api.types import LogFunction
from pvebackup.kit.fswalk import Entry, SourceWalker, WalkStats
from pvebackup.kit.fsxattrs import (
    ACL_XATTRS,
    ContainerIds,
    IdTranslator,
    acl_to_text,
    read_xattrs,
)
from pvebackup.kit.pacing import PacedReader, ProgressLog, TokenBucket

__all__ = ["ZSTD_LEVEL", "hardlink_target", "tar_info", "write_pax_stream", "write_tar"]

ZSTD_LEVEL = 3
_TYPES = {
    stat.S_IFDIR: tarfile.DIRTYPE,
    stat.S_IFREG: tarfile.REGTYPE,
    stat.S_IFLNK: tarfile.SYMTYPE,
    stat.S_IFCHR: tarfile.CHRTYPE,
    stat.S_IFBLK: tarfile.BLKTYPE,
    stat.S_IFIFO: tarfile.FIFOTYPE,
}


def tar_info(entry: Entry, ids: IdTranslator, first_name: str | None) -> tarfile.TarInfo | None:
    """The tar member for ``entry``; None for what tar cannot hold (sockets).

    :param first_name: archive name of an earlier entry with the same inode: the
        member then becomes a hard link to it.
    """
    st = entry.st
    kind = _TYPES.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        return None
    info = tarfile.TarInfo(entry.archive_name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid = ids.uid(st.st_uid)
    info.gid = ids.gid(st.st_gid)
    info.uname = info.gname = ""
    seconds, nanoseconds = divmod(st.st_mtime_ns, 1_000_000_000)
    info.mtime = seconds
    if first_name is not None:
        info.type = tarfile.LNKTYPE
        info.linkname = first_name
    else:
        info.type = kind
        if kind == tarfile.REGTYPE:
            info.size = st.st_size
        elif kind == tarfile.SYMTYPE:
            info.linkname = os.readlink(entry.path)
        elif kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            info.devmajor = os.major(st.st_rdev)
            info.devminor = os.minor(st.st_rdev)
    headers: dict[str, str] = {}
    if nanoseconds:
        # tarfile would write str(float) and lose the last digits; an explicit pax
        # "mtime" keeps the exact nanoseconds (our pax headers take priority).
        headers["mtime"] = f"{seconds}.{nanoseconds:09d}".rstrip("0")
    for name, value in read_xattrs(entry.path, ids).items():
        # surrogateescape keeps non-UTF-8 bytes; tarfile writes them back raw.
        headers[f"SCHILY.xattr.{name}"] = value.decode("utf-8", "surrogateescape")
        if name in ACL_XATTRS:
            kind_name = "access" if name.endswith("access") else "default"
            headers[f"SCHILY.acl.{kind_name}"] = acl_to_text(value)
    info.pax_headers = headers
    return info


def hardlink_target(inodes: dict[tuple[int, int], str], entry: Entry) -> str | None:
    """The earlier archive name of ``entry``'s inode, remembering it if it is new."""
    if entry.is_dir or entry.st.st_nlink < 2:
        return None
    first = inodes.setdefault((entry.st.st_dev, entry.st.st_ino), entry.archive_name)
    return None if first == entry.archive_name else first


def write_pax_stream(
    out: BinaryIO,
    directory: str,
    sources: Sequence[str],
    id_map: Sequence[Sequence[str]],
    exclude_paths: Sequence[str],
    bandwidth_limit: int | None,
    log_function: LogFunction,
) -> WalkStats:
    """Write ``sources`` below ``directory`` to ``out`` as one plain PAX tar stream.

    :returns: what was stored: entries, bytes of file data, excluded entries.
    :raises OSError: reading the source or writing to ``out`` failed.
    """
    walker = SourceWalker(directory, sources, exclude_paths)
    ids = ContainerIds(id_map)
    limiter = TokenBucket(bandwidth_limit)
    progress = ProgressLog(log_function, "container archive", None)
    stats = WalkStats()
    inodes: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for entry in walker:
            info = tar_info(entry, ids, hardlink_target(inodes, entry))
            if info is None:
                stats.skipped += 1
                continue
            stats.entries += 1
            if info.type == tarfile.REGTYPE and info.size:
                with open(entry.path, "rb") as data:
                    tar.addfile(info, PacedReader(data, limiter, progress))
                stats.data += info.size
            else:
                tar.addfile(info)
    stats.excluded = walker.excluded
    progress.finish()
    return stats


def write_tar(
    directory: str,
    sources: Sequence[str],
    id_map: Sequence[Sequence[str]],
    exclude_paths: Sequence[str],
    target: Path,
    bandwidth_limit: int | None,
    log_function: LogFunction,
) -> WalkStats:
    """Archive ``sources`` below ``directory`` into ``target`` (a new ``.tar.zst``).

    :returns: what was stored: entries, bytes of file data, excluded entries.
    :raises OSError: reading the source or writing the archive failed.
    """
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1)
    with open(target, "xb") as raw:
        with compressor.stream_writer(raw, closefd=False) as compressed:
            stats = write_pax_stream(
                cast(BinaryIO, compressed), directory, sources, id_map, exclude_paths,
                bandwidth_limit, log_function,
            )  # fmt: skip
        raw.flush()
        os.fsync(raw.fileno())
    return stats
