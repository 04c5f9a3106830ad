"""Reading a committed volume from a storage that others may write (restore side).

Threat: whoever can write the backup storage (off-site, shared, a NAS) can put a
symlink, a FIFO or a device where a file of ours belongs, name a file
``../../etc/shadow`` in ``index.json``, or swap a checked file for a link between
a check and its use. A restore that follows any of them reads a host file into
a guest's disk or config (or hangs on a FIFO).

So every read of a volume goes through :class:`VolumeDir`: the components below
the storage path (``backup/``, the volume directory) are opened with
``O_NOFOLLOW | O_DIRECTORY``, files relative to that directory fd with
``O_NOFOLLOW`` after an ``lstat`` that refuses anything but a regular file
(a FIFO or device is never opened), names from storage must be one plain path
component, and reads are bounded. What is checked is then the open descriptor,
never a name looked up again.
"""

from __future__ import annotations

import errno
import os
import stat

from pvebackup.api.errors import (
    CorruptIndexError,
    IntegrityError,
    UnsafeArchiveError,
    UnsafeStorageError,
    VolumeNotFoundError,
)
from pvebackup.providers.directory.volumes import (
    INDEX_NAME,
    BackupIndex,
    VolumeLayout,
    VolumeName,
)

__all__ = ["CONFIG_LIMIT", "INDEX_LIMIT", "VolumeDir", "check_stored_name", "read_index"]

INDEX_LIMIT = 1 << 20
"""Largest ``index.json`` read (a VM's is a few hundred bytes per disk)."""
CONFIG_LIMIT = 1 << 20
"""Largest guest or firewall config read (pmxcfs holds no larger file)."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: should a FIFO appear between lstat and open, open must not hang.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def check_stored_name(name: object, what: str, volname: str) -> str:
    """``name`` if it is one plain path component, else :class:`UnsafeArchiveError`.

    Threat: a name in ``index.json`` such as ``../../etc/passwd`` or ``/dev/sda``.
    """
    if not isinstance(name, str) or not _plain_component(name):
        raise UnsafeArchiveError(
            f"backup volume {volname!r}: {what} {name!r} is not a plain file name "
            "inside the volume"
        )
    return name


def _plain_component(name: str) -> bool:
    # A leading dot covers "." and ".." and keeps clear of the provider's own
    # hidden names (.tmp-*, .last).
    if "/" in name or "\0" in name or name.startswith("."):
        return False
    try:
        return 0 < len(name.encode("utf-8")) <= 255
    except UnicodeEncodeError:  # a lone surrogate from JSON
        return False


class VolumeDir:
    """An open committed volume directory; files are opened relative to it.

    :raises VolumeNotFoundError: no such volume.
    :raises UnsafeArchiveError: ``backup/`` or the volume is a symlink or not a
        directory.
    """

    def __init__(self, layout: VolumeLayout, volname: str) -> None:
        self.volname = volname
        dirname = VolumeName.parse(volname).dirname
        # The storage path itself comes from the node's storage.cfg: trusted.
        root = os.open(layout.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            backup = self._open_dir(root, layout.backup_dir.name)
            try:
                self.fd = self._open_dir(backup, dirname)
            finally:
                os.close(backup)
        finally:
            os.close(root)

    def _open_dir(self, dir_fd: int, name: str) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError as exc:
            raise VolumeNotFoundError(f"backup volume {self.volname!r} does not exist") from exc
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafeStorageError(
                    f"backup volume {self.volname!r}: {name} is a symbolic link or not "
                    "a directory"
                ) from exc
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> VolumeDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_regular(self, name: str, what: str) -> int | None:
        """A read-only fd of regular file ``name``, or None if there is none.

        :raises UnsafeStorageError: ``name`` is a symlink, FIFO, device or
            directory, or turned into one while it was opened.
        """
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        # lstat first: a FIFO or device is refused without opening it (opening a
        # tape or a FIFO has effects of its own).
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeStorageError(
                f"backup volume {self.volname!r}: {what} {name} is {_kind(st.st_mode)}, "
                "not a regular file"
            )
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            # ELOOP, ENOENT...: swapped or removed since the lstat.
            raise UnsafeStorageError(
                f"backup volume {self.volname!r}: {what} {name} changed while it was "
                f"opened: {exc.strerror}"
            ) from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnsafeStorageError(
                f"backup volume {self.volname!r}: {what} {name} changed while it was opened"
            )
        return fd

    def read(self, name: str, what: str, limit: int) -> bytes | None:
        """The content of regular file ``name`` (None if absent), at most ``limit`` bytes.

        :raises IntegrityError: the file is larger than ``limit``.
        """
        fd = self.open_regular(name, what)
        if fd is None:
            return None
        with os.fdopen(fd, "rb") as stream:
            data = stream.read(limit + 1)
        if len(data) > limit:
            raise IntegrityError(
                f"backup volume {self.volname!r}: {what} {name} is larger than {limit} bytes"
            )
        return data

    def read_index(self) -> BackupIndex:
        """The volume's ``index.json``, checked to describe this volume.

        :raises VolumeNotFoundError: no index (the volume is not committed).
        :raises CorruptIndexError: malformed, too large, or about another volume.
        """
        try:
            data = self.read(INDEX_NAME, "index", INDEX_LIMIT)
        except IntegrityError as exc:
            raise CorruptIndexError(str(exc)) from exc
        if data is None:
            raise VolumeNotFoundError(f"backup volume {self.volname!r} does not exist")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorruptIndexError(
                f"backup volume {self.volname!r}: {INDEX_NAME} is not UTF-8"
            ) from exc
        index = BackupIndex.from_json(text, f"{self.volname}/{INDEX_NAME}")
        name = VolumeName.parse(self.volname)
        # A copied or moved index.json would describe another guest's disks.
        if index.vmtype is not name.vmtype or index.vmid != name.vmid:
            raise CorruptIndexError(
                f"backup volume {self.volname!r}: {INDEX_NAME} describes "
                f"{index.vmtype.value} {index.vmid}, not this volume"
            )
        return index


def read_index(layout: VolumeLayout, volname: str) -> BackupIndex:
    """``index.json`` of a committed volume, read symlink-safely (see :class:`VolumeDir`)."""
    with VolumeDir(layout, volname) as volume:
        return volume.read_index()


def _kind(mode: int) -> str:
    kinds = {
        stat.S_IFLNK: "a symbolic link",
        stat.S_IFIFO: "a FIFO",
        stat.S_IFCHR: "a character device",
        stat.S_IFBLK: "a block device",
        stat.S_IFDIR: "a directory",
        stat.S_IFSOCK: "a socket",
    }
    return kinds.get(stat.S_IFMT(mode), "not a regular file")
