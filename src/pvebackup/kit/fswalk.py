"""Walk a container's sources the way rsync/vzdump would, in archive order.

The host hands over ``directory`` (an unchanging copy of the container's file
system) and ``sources``: ``"."`` for the root plus one entry per separate mount
point (``"./srv/data"``). :class:`SourceWalker` yields every entry to store:

- each source's root first (it is never excluded), then its tree depth first
  (a directory, then its contents), names sorted, so archives are reproducible;
- ``exclude_paths`` (rsync semantics, :class:`~pvebackup.api.excludes.ExcludeMatcher`)
  are matched against paths relative to the container root; an excluded
  directory is not descended into;
- another source met inside a source is walked in place, with its own file
  system; each source is walked once, so nothing is stored twice, and a source
  the walk does not reach (below an excluded directory) is walked on its own;
- other file systems are not entered: a mount point that is not a source is
  stored as an empty directory, like ``rsync -x``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pvebackup.api.errors import UsageError
from pvebackup.api.excludes import ExcludeMatcher
from pvebackup.kit.oserrors import os_error

__all__ = ["Entry", "SourceWalker", "WalkStats", "normalize_source"]


@dataclass(frozen=True, slots=True)
class Entry:
    """One file system object to store."""

    relpath: str
    """Path relative to the container root, no leading ``./``; ``""`` is the root."""
    path: str
    """Where it is on the host, inside ``directory``."""
    st: os.stat_result
    """Its ``lstat``: symlinks are never followed."""

    @property
    def archive_name(self) -> str:
        """The name inside an archive: ``.`` for the root, else ``./<relpath>``."""
        return f"./{self.relpath}" if self.relpath else "."

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)


def normalize_source(source: str) -> str:
    """``"."``, ``"./srv/data"``, ``"/srv/data/"`` -> ``""``, ``"srv/data"``.

    :raises UsageError: the source would leave the container root (``..``).
    """
    parts = [part for part in source.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UsageError(f"source {source!r} leaves the container root")
    return "/".join(parts)


class SourceWalker:
    """Iterate over the entries of all ``sources`` below ``directory``."""

    def __init__(
        self, directory: str, sources: Sequence[str], exclude_paths: Sequence[str]
    ) -> None:
        self.directory = directory
        # Parents before children, so an archive creates "srv" before "srv/data".
        normalized = {normalize_source(source) for source in sources} or {""}
        self.sources = sorted(normalized, key=lambda rel: (rel.count("/") if rel else -1, rel))
        """Normalized sources, parents first."""
        self.matcher = ExcludeMatcher(list(exclude_paths))
        self.excluded = 0
        """Entries left out because an exclude pattern matched (counted while walking)."""

    def _host_path(self, relpath: str) -> str:
        return os.path.join(self.directory, relpath) if relpath else self.directory

    def __iter__(self) -> Iterator[Entry]:
        walked: set[str] = set()
        for source in self.sources:
            if source not in walked:
                yield from self._walk_source(source, walked)

    def _walk_source(self, source: str, walked: set[str]) -> Iterator[Entry]:
        path = self._host_path(source)
        try:
            root = Entry(source, path, os.lstat(path))
        except OSError as exc:  # the directory or a source vanished (or was never there)
            raise os_error(exc, f"cannot back up {path}") from exc
        # Depth first, parents before their contents: GNU tar sets a directory's
        # mtime when extraction leaves it, so its contents must follow it directly.
        # Each entry carries the device of the source it belongs to.
        stack = [(root, root.st.st_dev)]
        while stack:
            entry, device = stack.pop()
            if entry.relpath in self.sources:
                # A mount point source met inside another: walk it right here, so
                # that its parent directory is complete before tar leaves it.
                walked.add(entry.relpath)
                device = entry.st.st_dev
            yield entry
            if entry.is_dir and entry.st.st_dev == device:
                stack.extend((child, device) for child in reversed(self._children(entry)))

    def _children(self, parent: Entry) -> list[Entry]:
        """The entries of directory ``parent`` to store, sorted by name."""
        with os.scandir(parent.path) as listing:
            names = sorted(item.name for item in listing)
        children = []
        for name in names:
            relpath = f"{parent.relpath}/{name}" if parent.relpath else name
            path = os.path.join(parent.path, name)
            entry = Entry(relpath, path, os.lstat(path))
            if relpath not in self.sources and self.matcher.excluded(relpath, entry.is_dir):
                self.excluded += 1
                continue
            children.append(entry)
        return children


@dataclass(slots=True)
class WalkStats:
    """What a container backup stored."""

    entries: int = 0
    data: int = 0
    """Bytes of regular file contents."""
    excluded: int = 0
    skipped: int = 0
    """Entries the format cannot hold (sockets in a tar)."""
