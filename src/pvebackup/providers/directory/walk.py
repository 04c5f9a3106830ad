"""Walk a container's sources the way rsync/vzdump would, in archive order.

The host hands over ``directory`` (an unchanging copy of the container's file
system) and ``sources``: ``"."`` for the root plus one entry per separate mount
point (``"./srv/data"``). :class:`SourceWalker` yields every entry to store:

- each source's root first (it is never excluded), then its tree in pre-order,
  names sorted, so archives are reproducible;
- ``exclude_paths`` (rsync semantics, :class:`~pvebackup.api.excludes.ExcludeMatcher`)
  are matched against paths relative to the container root; an excluded
  directory is not descended into;
- a directory that is itself another source is skipped (its own source stores
  it, so nothing is stored twice);
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
        self.matcher = ExcludeMatcher(list(exclude_paths))
        self.excluded = 0
        """Entries left out because an exclude pattern matched (counted while walking)."""

    def _host_path(self, relpath: str) -> str:
        return os.path.join(self.directory, relpath) if relpath else self.directory

    def __iter__(self) -> Iterator[Entry]:
        for source in self.sources:
            yield from self._walk_source(source)

    def _walk_source(self, source: str) -> Iterator[Entry]:
        root = Entry(source, self._host_path(source), os.lstat(self._host_path(source)))
        yield root
        if not root.is_dir:
            return
        device = root.st.st_dev
        others = set(self.sources) - {source}
        stack = [root]
        while stack:
            parent = stack.pop()
            children = []
            with os.scandir(parent.path) as listing:
                names = sorted(item.name for item in listing)
            for name in names:
                relpath = f"{parent.relpath}/{name}" if parent.relpath else name
                if relpath in others:
                    continue
                path = os.path.join(parent.path, name)
                entry = Entry(relpath, path, os.lstat(path))
                if self.matcher.excluded(relpath, entry.is_dir):
                    self.excluded += 1
                    continue
                yield entry
                if entry.is_dir and entry.st.st_dev == device:
                    children.append(entry)
            # Reversed onto the stack, so the first name is walked first.
            stack.extend(reversed(children))


@dataclass(slots=True)
class WalkStats:
    """What a container backup stored."""

    entries: int = 0
    data: int = 0
    """Bytes of regular file contents."""
    excluded: int = 0
    skipped: int = 0
    """Entries the format cannot hold (sockets in a tar)."""
