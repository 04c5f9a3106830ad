"""A container's file system as a plain directory tree (``ct-format directory``).

The copy is made with os calls only and keeps what the tar format keeps, plus
sockets: regular files, directories, symlinks, hard links (re-linked inside the
copy), device nodes, fifos; ownership as *container* ids (so the tree is what
``restore_directory_init`` hands back), modes, xattrs with ACL ids mapped, and
nanosecond mtimes. Directory mtimes are set last, deepest first, because
creating their entries changes them.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

from pvebackup.api.types import IdMapEntry, LogFunction
from pvebackup.providers.directory.transfer import MIB, LimitedReader, ProgressLog, RateLimiter
from pvebackup.providers.directory.walk import Entry, SourceWalker, WalkStats
from pvebackup.providers.directory.xattrs import ContainerIds, IdTranslator, read_xattrs

__all__ = ["copy_tree"]


def _create(entry: Entry, dest: str, limiter: RateLimiter, progress: ProgressLog) -> None:
    """Create ``dest`` as the same kind of object as ``entry`` (without metadata)."""
    mode = entry.st.st_mode
    if stat.S_ISDIR(mode):
        os.mkdir(dest, 0o700)
    elif stat.S_ISREG(mode):
        with open(entry.path, "rb") as src, open(dest, "xb") as out:
            shutil.copyfileobj(LimitedReader(src, limiter, progress), out, MIB)
    elif stat.S_ISLNK(mode):
        os.symlink(os.readlink(entry.path), dest)
    else:  # character/block device, fifo, socket
        os.mknod(dest, stat.S_IFMT(mode) | 0o600, entry.st.st_rdev)


def _apply_metadata(entry: Entry, dest: str, ids: IdTranslator) -> None:
    """Ownership (container ids), xattrs, mode; in that order, as chown clears setuid."""
    st = entry.st
    os.chown(dest, ids.uid(st.st_uid), ids.gid(st.st_gid), follow_symlinks=False)
    for name, value in read_xattrs(entry.path, ids).items():
        os.setxattr(dest, name, value, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dest, stat.S_IMODE(st.st_mode))
    if not stat.S_ISDIR(st.st_mode):
        os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def copy_tree(
    directory: str,
    sources: Sequence[str],
    id_map: Sequence[IdMapEntry],
    exclude_paths: Sequence[str],
    target: Path,
    bandwidth_limit: int | None,
    log_function: LogFunction,
) -> WalkStats:
    """Copy ``sources`` below ``directory`` into the new directory ``target``.

    :returns: what was stored: entries, bytes of file data, excluded entries.
    :raises OSError: reading the source or writing the copy failed.
    """
    walker = SourceWalker(directory, sources, exclude_paths)
    ids = ContainerIds(id_map)
    limiter = RateLimiter(bandwidth_limit)
    progress = ProgressLog(log_function, "container copy", None)
    stats = WalkStats()
    links: dict[tuple[int, int], str] = {}
    directories: list[tuple[Entry, str]] = []
    for entry in walker:
        dest = os.path.join(target, entry.relpath) if entry.relpath else str(target)
        if not entry.is_dir and entry.st.st_nlink > 1:
            key = (entry.st.st_dev, entry.st.st_ino)
            if key in links:
                os.link(links[key], dest)
                stats.entries += 1
                continue
            links[key] = dest
        if entry.is_dir and os.path.isdir(dest):
            pass  # a source's root whose parent source created it already
        else:
            _create(entry, dest, limiter, progress)
        _apply_metadata(entry, dest, ids)
        stats.entries += 1
        if entry.is_dir:
            directories.append((entry, dest))
        elif stat.S_ISREG(entry.st.st_mode):
            stats.data += entry.st.st_size
    for entry, dest in reversed(directories):
        os.utime(dest, ns=(entry.st.st_atime_ns, entry.st.st_mtime_ns))
    stats.excluded = walker.excluded
    progress.finish()
    return stats
