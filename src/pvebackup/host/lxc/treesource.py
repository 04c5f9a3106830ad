"""Read a provider's restore directory (the ``directory`` mechanism) without leaving it.

The directory lies on backup storage, which may be changed by others while we
read it: a directory swapped for a symlink to ``/etc`` between our look and our
open must not copy the host's files into the container. So the tree is walked
from file descriptors, never by path:

- the root is opened ``O_DIRECTORY|O_NOFOLLOW``; every entry below is opened
  ``O_PATH|O_NOFOLLOW`` relative to its parent's descriptor (never following a
  symlink, never opening a device or a fifo), and its ``fstat`` decides what it
  is; directories and regular files are then re-opened through that very
  descriptor (``/proc/self/fd/N``), so their metadata, contents and children all
  come from the inode that was checked;
- a symlink is read with ``readlinkat(fd, "")``, xattrs through the descriptor;
- hard links (same device and inode, seen before) become hard link entries.

What changes under us can at worst give another object of the same tree; nothing
outside the directory is ever read. Nesting deeper than :data:`MAX_DEPTH` is
refused (each level holds a descriptor).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from pvebackup.api.errors import UnsafeArchiveError
from pvebackup.api.types import LogFunction
from pvebackup.host.lxc.writer import Entry, EntryKind, Reader
from pvebackup.kit.oserrors import os_error

__all__ = ["MAX_DEPTH", "walk_source"]

MAX_DEPTH = 512
"""Directory levels read below the root; a real root file system has a few dozen."""

_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_KINDS = {
    stat.S_IFREG: EntryKind.FILE,
    stat.S_IFDIR: EntryKind.DIR,
    stat.S_IFLNK: EntryKind.SYMLINK,
    stat.S_IFCHR: EntryKind.CHR,
    stat.S_IFBLK: EntryKind.BLK,
    stat.S_IFIFO: EntryKind.FIFO,
}


def _xattrs(target: int | str) -> dict[str, bytes]:
    try:
        names = os.listxattr(target)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return {}
        raise
    values = {}
    for name in names:
        try:
            values[name] = os.getxattr(target, name)
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # removed meanwhile
                raise
    return values


def _entry(rel: str, st: os.stat_result, kind: EntryKind) -> Entry:
    return Entry(
        name=rel,
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime_ns=st.st_mtime_ns,
        atime_ns=st.st_atime_ns,
        rdev=st.st_rdev,
        size=st.st_size,
    )


def _reopen(fd: int, flags: int) -> int:
    # Through the magic link: the inode behind fd itself, not a new path lookup.
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)


def _open_root(root: Path) -> int:
    try:
        return os.open(root, _ROOT_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeArchiveError(
                f"restore source {root} is a symlink or not a directory"
            ) from exc
        raise os_error(exc, f"cannot read restore source {root}") from exc


def walk_source(root: Path, log: LogFunction) -> Iterator[tuple[Entry, Reader | None]]:
    """Yield the entries of the directory ``root`` (container ids), parents first.

    Names are relative (``""`` is the root itself), sorted within a directory. A
    regular file comes with an open reader: read it before asking for the next
    entry. Sockets are skipped with a warning, entries that vanish meanwhile with
    another. Raises :class:`UnsafeArchiveError` for a root that is a symlink or
    nesting beyond :data:`MAX_DEPTH`, :class:`PveBackupError` when reading fails.
    """
    root_fd = _open_root(root)
    stack: list[tuple[int, str, Iterator[str]]] = [(root_fd, "", iter(()))]
    seen: dict[tuple[int, int], str] = {}
    try:
        entry = _entry("", os.fstat(root_fd), EntryKind.DIR)
        entry.xattrs = _xattrs(root_fd)
        listing = sorted(os.listdir(root_fd))
        stack[0] = (root_fd, "", iter(listing))
        yield entry, None
        while stack:
            dir_fd, rel, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                os.close(dir_fd)
                continue
            child = f"{rel}/{name}" if rel else name
            try:
                path_fd = os.open(name, _PATH_FLAGS, dir_fd=dir_fd)
            except FileNotFoundError:
                log("warn", f"{child}: vanished from the restore source, skipped")
                continue
            try:
                yield from _one(path_fd, child, stack, seen, log)
            finally:
                os.close(path_fd)
    except OSError as exc:
        raise os_error(exc, f"cannot read restore source {root}") from exc
    finally:
        for fd, _rel, _names in stack:
            os.close(fd)


def _one(
    path_fd: int,
    rel: str,
    stack: list[tuple[int, str, Iterator[str]]],
    seen: dict[tuple[int, int], str],
    log: LogFunction,
) -> Iterator[tuple[Entry, Reader | None]]:
    """The entry behind ``path_fd`` (an ``O_PATH`` descriptor); a directory is pushed."""
    st = os.fstat(path_fd)
    kind = _KINDS.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        log("warn", f"{rel}: sockets are not restored, skipped")
        return
    if kind is not EntryKind.DIR and st.st_nlink > 1:
        first = seen.setdefault((st.st_dev, st.st_ino), rel)
        if first != rel:
            link = _entry(rel, st, EntryKind.HARDLINK)
            link.linkname = first
            yield link, None
            return
    entry = _entry(rel, st, kind)
    if kind is EntryKind.DIR:
        if len(stack) > MAX_DEPTH:
            raise UnsafeArchiveError(f"{rel!r}: directories nested deeper than {MAX_DEPTH}")
        sub = _reopen(path_fd, os.O_RDONLY | os.O_DIRECTORY)
        try:
            entry.xattrs = _xattrs(sub)
            listing = sorted(os.listdir(sub))
        except BaseException:
            os.close(sub)
            raise
        stack.append((sub, rel, iter(listing)))  # closed by the walker, also on errors
        yield entry, None
    elif kind is EntryKind.FILE:
        with os.fdopen(_reopen(path_fd, os.O_RDONLY), "rb") as data:
            entry.xattrs = _xattrs(data.fileno())
            yield entry, data
    else:
        if kind is EntryKind.SYMLINK:
            entry.linkname = os.readlink("", dir_fd=path_fd)
        # Following the magic link reaches the object itself, even a symlink.
        entry.xattrs = _xattrs(f"/proc/self/fd/{path_fd}")
        yield entry, None
