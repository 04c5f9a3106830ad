"""A file tree read from a backup, for listing and extracting single files.

Two kinds of readers give it: ``vm-files``' userspace readers of a guest file
system (ext4, xfs) and a provider's :meth:`BackupProvider.restore_file_reader`
for a container archive. The host's safe extractor
(:mod:`pvebackup.host.vmfiles.extract`) writes what either gives; everything in
an :class:`Entry` is untrusted (it comes from backup storage or a guest).
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Entry", "FsReader", "lookup"]


@dataclass(frozen=True, slots=True)
class Entry:
    """One directory entry as the guest file system describes it (untrusted)."""

    name: bytes
    inode: int
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int | None = None
    """Set by readers that know it; the extractor then applies it."""

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


class FsReader(Protocol):
    """A file tree read in userspace (a guest's ext4 or xfs, a container archive).

    Every method raises :class:`~pvebackup.api.errors.CorruptFilesystemError` when
    the tree cannot be read there (the extractor skips that entry and goes on), or
    :class:`~pvebackup.api.errors.IntegrityError` when stored data fails its check
    (the extraction stops).
    """

    def root(self) -> Entry:
        """The root directory."""
        ...

    def list_dir(self, inode: int) -> list[Entry]:
        """The entries of directory ``inode``, without ``.`` and ``..``."""
        ...

    def readlink(self, entry: Entry) -> bytes:
        """A symbolic link's target (bounded)."""
        ...

    def read(self, entry: Entry) -> Iterator[bytes]:
        """A regular file's contents, exactly ``entry.size`` bytes, in chunks
        (a hard link's: its target's)."""
        ...


def lookup(reader: FsReader, parts: list[bytes]) -> Entry:
    """The entry at ``parts`` below the root (the root itself for ``[]``).

    :raises FileNotFoundError: no such entry, or a parent is not a directory.
    """
    entry = reader.root()
    for part in parts:
        if not entry.is_dir:
            raise FileNotFoundError(f"{part.decode(errors='replace')}: not a directory")
        for child in reader.list_dir(entry.inode):
            if child.name == part:
                entry = child
                break
        else:
            raise FileNotFoundError(part.decode(errors="replace"))
    return entry
