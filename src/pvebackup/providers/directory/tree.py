"""A container's file system as a plain directory tree (``ct-format directory``).

The copy is made with os calls only and keeps what the tar format keeps, plus
sockets: regular files, directories, symlinks, hard links (re-linked inside the
copy), device nodes, fifos; ownership as *container* ids (so the tree is what
``restore_directory_init`` hands back), modes, xattrs with ACL ids mapped, and
nanosecond mtimes. Directory mtimes are set last, deepest first, because
creating their entries changes them.

Threat: the copy is storage content while we write it. The container's own
symlinks are copied into it, and whoever can write the storage can swap a
directory of the copy for a symlink while we work; a path such as
``<copy>/srv/data/x`` could then lead outside the storage. So the copy is built
only relative to directory fds opened without following symlinks
(:mod:`pvebackup.kit.safefs`): every object is created as one name in its held
parent, its metadata set through an fd of the object itself or with
``AT_SYMLINK_NOFOLLOW``. A symlink where a directory of the copy should be (a
mount point source below a container symlink, or a swap) raises
:class:`~pvebackup.api.errors.UnsafeStorageError`.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Sequence

from pvebackup.api.errors import UnsafeStorageError
from pvebackup.api.types import LogFunction
from pvebackup.kit import safefs
from pvebackup.kit.fswalk import Entry, SourceWalker, WalkStats
from pvebackup.kit.fsxattrs import ContainerIds, IdTranslator, read_xattrs
from pvebackup.kit.pacing import MIB, PacedReader, ProgressLog, TokenBucket
from pvebackup.kit.safefs import owned_fd

__all__ = ["copy_tree"]

_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _DirCache:
    """Fds of the copy's directories along the path of the current entry.

    The walk is depth first, so the directories it needs next are mostly the
    ones it needed last: fds of the current entry's ancestors stay open, the
    others are closed (at most one fd per level).
    """

    def __init__(self, root_fd: int) -> None:
        self._root = root_fd
        self._open: dict[str, int] = {}

    def get(self, relpath: str) -> int:
        """A borrowed fd of the copy's directory ``relpath`` (``""`` is the root)."""
        if not relpath:
            return self._root
        fd = self._open.get(relpath)
        if fd is not None:
            return fd
        for other in [k for k in self._open if not (relpath + "/").startswith(k + "/")]:
            os.close(self._open.pop(other))
        parts = safefs.split_relpath(relpath)
        fd, start = self._root, 0
        for depth in range(len(parts) - 1, 0, -1):
            ancestor = self._open.get("/".join(parts[:depth]))
            if ancestor is not None:
                fd, start = ancestor, depth
                break
        for depth in range(start, len(parts)):
            fd = safefs.open_dir(fd, (parts[depth],))
            self._open["/".join(parts[: depth + 1])] = fd
        return fd

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()


def _copy_file(
    entry: Entry, parent_fd: int, name: str, limiter: TokenBucket, progress: ProgressLog
) -> int:
    """Create ``name`` in ``parent_fd`` with ``entry``'s content; return its fd."""
    fd = os.open(name, _NEW_FILE, 0o600, dir_fd=parent_fd)
    try:
        with open(entry.path, "rb") as src, open(fd, "wb", closefd=False) as out:
            shutil.copyfileobj(PacedReader(src, limiter, progress), out, MIB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _make_dir(parent_fd: int, name: str) -> int:
    """Create (or, for a source's root made by its parent source, reuse) a directory."""
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    except FileExistsError:
        pass  # a source's root whose parent source created it already
    return safefs.open_dir(parent_fd, (name,))


def _set_by_fd(fd: int, entry: Entry, ids: IdTranslator, utime: bool) -> None:
    """Ownership (container ids), xattrs, mode, mtime, on an fd of the object itself."""
    st = entry.st
    os.chown(fd, ids.uid(st.st_uid), ids.gid(st.st_gid))
    for xname, value in read_xattrs(entry.path, ids).items():
        os.setxattr(fd, xname, value)
    os.chmod(fd, stat.S_IMODE(st.st_mode))
    if utime:
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _set_by_name(entry: Entry, parent_fd: int, name: str, ids: IdTranslator) -> None:
    """The same for a symlink or special file, which cannot be opened for that.

    Every call names the object in its held parent without following it; the
    mode of a special file is set through an ``O_PATH`` fd whose type was checked,
    as a path could be a symlink swapped in by now.
    """
    st = entry.st
    uid, gid = ids.uid(st.st_uid), ids.gid(st.st_gid)
    os.chown(name, uid, gid, dir_fd=parent_fd, follow_symlinks=False)
    in_parent = safefs.fd_path(parent_fd, name)
    for xname, value in read_xattrs(entry.path, ids).items():
        os.setxattr(in_parent, xname, value, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
        with owned_fd(os.open(name, flags, dir_fd=parent_fd)) as fd:
            if stat.S_IFMT(os.fstat(fd).st_mode) != stat.S_IFMT(st.st_mode):
                raise UnsafeStorageError(f"{entry.archive_name}: replaced while it was copied")
            os.chmod(safefs.fd_path(fd), stat.S_IMODE(st.st_mode))
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=parent_fd, follow_symlinks=False)


def _copy_entry(
    entry: Entry,
    parent_fd: int,
    name: str,
    ids: IdTranslator,
    limiter: TokenBucket,
    progress: ProgressLog,
) -> None:
    """Create ``name`` in ``parent_fd`` as a copy of ``entry`` (a directory's mtime waits)."""
    mode = entry.st.st_mode
    if stat.S_ISDIR(mode):
        with owned_fd(_make_dir(parent_fd, name)) as fd:
            _set_by_fd(fd, entry, ids, utime=False)
    elif stat.S_ISREG(mode):
        with owned_fd(_copy_file(entry, parent_fd, name, limiter, progress)) as fd:
            _set_by_fd(fd, entry, ids, utime=True)
    else:
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(entry.path), name, dir_fd=parent_fd)
        else:  # character/block device, fifo, socket
            os.mknod(name, stat.S_IFMT(mode) | 0o600, entry.st.st_rdev, dir_fd=parent_fd)
        _set_by_name(entry, parent_fd, name, ids)


def copy_tree(
    directory: str,
    sources: Sequence[str],
    id_map: Sequence[Sequence[str]],
    exclude_paths: Sequence[str],
    target_dir_fd: int,
    target_name: str,
    bandwidth_limit: int | None,
    log_function: LogFunction,
) -> WalkStats:
    """Copy ``sources`` below ``directory`` into the new directory ``target_name``
    of ``target_dir_fd``.

    :returns: what was stored: entries, bytes of file data, excluded entries.
    :raises UnsafeStorageError: a directory of the copy is a symlink by now.
    :raises OSError: reading the source or writing the copy failed.
    """
    walker = SourceWalker(directory, sources, exclude_paths)
    ids = ContainerIds(id_map)
    limiter = TokenBucket(bandwidth_limit)
    progress = ProgressLog(log_function, "container copy", None)
    stats = WalkStats()
    links: dict[tuple[int, int], str] = {}
    directories: list[Entry] = []
    with owned_fd(safefs.make_dir_at(target_dir_fd, target_name, 0o700)) as root_fd:
        dirs = _DirCache(root_fd)
        try:
            for entry in walker:
                if not entry.relpath:
                    _set_by_fd(root_fd, entry, ids, utime=False)
                    stats.entries += 1
                    directories.append(entry)
                    continue
                parent, _, name = entry.relpath.rpartition("/")
                parent_fd = dirs.get(parent)
                if not entry.is_dir and entry.st.st_nlink > 1:
                    key = (entry.st.st_dev, entry.st.st_ino)
                    if key in links:
                        _link(root_fd, links[key], parent_fd, name)
                        stats.entries += 1
                        continue
                    links[key] = entry.relpath
                _copy_entry(entry, parent_fd, name, ids, limiter, progress)
                stats.entries += 1
                if entry.is_dir:
                    directories.append(entry)
                elif stat.S_ISREG(entry.st.st_mode):
                    stats.data += entry.st.st_size
            for entry in reversed(directories):
                times = (entry.st.st_atime_ns, entry.st.st_mtime_ns)
                os.utime(dirs.get(entry.relpath), ns=times)
        finally:
            dirs.close()
    stats.excluded = walker.excluded
    progress.finish()
    return stats


def _link(root_fd: int, first: str, parent_fd: int, name: str) -> None:
    """Hard-link ``name`` in ``parent_fd`` to the copy's ``first`` (a path below the root)."""
    first_parent, _, first_name = first.rpartition("/")
    with owned_fd(safefs.open_dir(root_fd, first_parent)) as first_fd:
        os.link(first_name, name, src_dir_fd=first_fd, dst_dir_fd=parent_fd, follow_symlinks=False)
