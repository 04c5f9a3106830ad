"""What a userspace file system reader gives the listing and the extraction."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Entry", "FsReader"]


@dataclass(frozen=True, slots=True)
class Entry:
    """One directory entry as the guest file system describes it (untrusted)."""

    name: bytes
    inode: int
    mode: int
    uid: int
    gid: int
    size: int

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
    """A guest file system read in userspace (ext4 by debugfs, xfs by xfs_db).

    Every method raises :class:`~pvebackup.api.errors.CorruptFilesystemError` when
    the file system cannot be read there.
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
        """A regular file's contents, exactly ``entry.size`` bytes, in chunks."""
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
