"""Write entries of a guest file system below a target directory, and nowhere else.

Threat: the file system is the guest's (or a forger's): a name may be ``..`` or
hold ``/``, a symlink may point at ``/etc/shadow`` and be followed by the next
entry of the same name, a file may be setuid root or a device node, a directory
may list its own ancestor, a size may exceed the disk. So:

- the target is a fresh or empty directory, held by fd; every entry is created
  relative to its parent's fd with ``O_EXCL``/``mkdirat`` and opened ``O_NOFOLLOW``,
  so nothing we write goes through a symlink (a name used twice is skipped);
- a name that is empty, ``.``, ``..``, longer than 255 bytes or holds ``/`` or NUL
  is skipped with a warning;
- symlinks are written as symlinks (their target as stored) and never followed;
  device nodes and sockets are not created; setuid and setgid bits are dropped;
  owners are applied only with ``keep_owner`` (as root);
- a directory seen before (a loop) is skipped; depth is bounded;
- a file larger than the free space is :class:`StorageFullError` before writing,
  as is ENOSPC/EDQUOT while writing.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pvebackup.api.errors import (
    CorruptFilesystemError,
    PveBackupError,
    StateError,
    StorageFullError,
    UsageError,
)
from pvebackup.api.files import Entry, FsReader

__all__ = ["ExtractResult", "Extractor", "open_target", "safe_name"]

MAX_DEPTH = 256
_NAME_MAX = 255
_KEEP_BITS = 0o1777  # permissions and sticky; setuid/setgid dropped
_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class ExtractResult:
    """What an extraction wrote and what it left out."""

    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    """Entries the damaged file system could not give (each warned about)."""


def safe_name(name: bytes) -> bool:
    """A name that is one path component: it cannot leave its directory."""
    return (
        0 < len(name) <= _NAME_MAX
        and b"/" not in name
        and b"\0" not in name
        and name not in (b".", b"..")
    )


def open_target(target: Path) -> tuple[int, bool]:
    """Create ``target`` (its parent must exist), or open it if it is an empty dir.

    Returns the directory fd and whether it was created.
    :raises StateError: it exists and is not empty, or is not a directory.
    """
    created = False
    try:
        os.mkdir(target, 0o755)
        created = True
    except FileExistsError:
        pass
    except OSError as exc:
        raise UsageError(f"cannot create target directory {target}: {exc.strerror}") from exc
    try:
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise StateError(f"target {target} is not a directory ({exc.strerror})") from exc
    if os.listdir(fd):
        os.close(fd)
        raise StateError(f"target directory {target} is not empty; give a new or empty one")
    return fd, created


def _full(exc: OSError, what: str) -> PveBackupError:
    if exc.errno in _FULL:
        return StorageFullError(f"no space left writing {what}: {exc.strerror}")
    return PveBackupError(f"cannot write {what}: {exc.strerror}")


class Extractor:
    """Writes entries read by an :class:`Ext4Reader` below a held directory fd."""

    def __init__(
        self,
        reader: FsReader,
        warn: Callable[[str], None],
        *,
        keep_owner: bool = False,
    ) -> None:
        self.reader = reader
        self.warn = warn
        self.keep_owner = keep_owner and os.geteuid() == 0
        self.result = ExtractResult()
        self._seen_dirs: set[int] = set()

    def _skip(self, shown: str, why: str) -> None:
        self.result.skipped.append(shown)
        self.warn(f"{shown}: {why}; skipped")

    def extract(self, dir_fd: int, entry: Entry, shown: str, depth: int = 0) -> None:
        """Write ``entry`` (named ``entry.name``) into ``dir_fd``."""
        name = entry.name
        if not safe_name(name):
            # Threat: "..", "a/../../etc", "" would leave the directory they are named in.
            self._skip(shown, "unsafe name")
            return
        try:
            if entry.is_dir:
                self._directory(dir_fd, entry, shown, depth)
            elif entry.is_file:
                self._file(dir_fd, entry, shown)
            elif entry.is_symlink:
                target = self.reader.readlink(entry)
                if b"\0" in target or not target:
                    self._skip(shown, "unusable symbolic link target")
                    return
                # Written, never followed: every later open here is O_NOFOLLOW/O_EXCL.
                os.symlink(target, name, dir_fd=dir_fd)
                self._owner(dir_fd, name, entry)
                self.result.symlinks += 1
            elif stat.S_ISFIFO(entry.mode):
                os.mkfifo(name, 0o600, dir_fd=dir_fd)
                self._owner(dir_fd, name, entry)
                # Just made by mkfifo (which never reuses a name): no link to follow.
                os.chmod(name, entry.mode & 0o777, dir_fd=dir_fd)
            else:
                # Threat: a device node would give the guest's author access to host devices.
                self._skip(shown, "device node or socket not created")
        except FileExistsError:
            self._skip(shown, "a second entry of the same name")
        except CorruptFilesystemError as exc:
            # One damaged inode does not cost the rest of the tree; the run fails at the end.
            self.result.unreadable.append(shown)
            self.warn(f"{shown}: {exc}; skipped")
        except OSError as exc:
            raise _full(exc, shown) from exc

    def extract_children(self, dir_fd: int, entry: Entry, shown: str, depth: int = 0) -> None:
        """Write the entries of directory ``entry`` into ``dir_fd``."""
        if entry.inode in self._seen_dirs:
            self._skip(shown, "directory seen before (a loop)")
            return
        if depth > MAX_DEPTH:
            self._skip(shown, f"deeper than {MAX_DEPTH} directories")
            return
        self._seen_dirs.add(entry.inode)
        for child in self.reader.list_dir(entry.inode):
            self.extract(dir_fd, child, _join(shown, child.name), depth + 1)

    def _directory(self, dir_fd: int, entry: Entry, shown: str, depth: int) -> None:
        if entry.inode in self._seen_dirs:
            self._skip(shown, "directory seen before (a loop)")
            return
        if depth > MAX_DEPTH:
            self._skip(shown, f"deeper than {MAX_DEPTH} directories")
            return
        os.mkdir(entry.name, 0o700, dir_fd=dir_fd)
        fd = os.open(
            entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
            dir_fd=dir_fd,
        )  # fmt: skip
        try:
            self.result.directories += 1
            self.extract_children(fd, entry, shown, depth)
            self._owner(fd, None, entry)
            os.fchmod(fd, entry.mode & _KEEP_BITS)
            self._mtime(fd, entry)
        finally:
            os.close(fd)

    def _file(self, dir_fd: int, entry: Entry, shown: str) -> None:
        fd = os.open(
            entry.name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dir_fd,
        )
        written = False
        try:
            vfs = os.fstatvfs(fd)
            free = vfs.f_bavail * vfs.f_frsize
            if entry.size > free:
                # Threat: a size the guest never had fills the host's disk.
                raise StorageFullError(
                    f"{shown} is {entry.size} bytes; {free} bytes are free at the target"
                )
            for chunk in self.reader.read(entry):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            self._owner(fd, None, entry)
            os.fchmod(fd, entry.mode & 0o777)
            self._mtime(fd, entry)
            written = True
        finally:
            os.close(fd)
            if not written:
                os.unlink(entry.name, dir_fd=dir_fd)  # no partial file stays behind
        self.result.files += 1
        self.result.bytes += entry.size

    def _mtime(self, fd: int, entry: Entry) -> None:
        if entry.mtime_ns is not None:
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))

    def _owner(self, fd: int, name: bytes | None, entry: Entry) -> None:
        if not self.keep_owner:
            return
        if name is None:
            os.fchown(fd, entry.uid, entry.gid)
        else:
            os.chown(name, entry.uid, entry.gid, dir_fd=fd, follow_symlinks=False)


def _join(parent: str, name: bytes) -> str:
    shown = name.decode(errors="backslashreplace")
    return f"{parent.rstrip('/')}/{shown}"
