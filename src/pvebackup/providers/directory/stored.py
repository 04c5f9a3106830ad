"""Reading a committed volume from a storage that others may write (restore side).

Threat: whoever can write the backup storage (off-site, shared, a NAS) can put a
symlink, a FIFO or a device where a file of ours belongs, name a file
``../../etc/shadow`` in ``index.json``, or swap a checked file for a link between
a check and its use. A restore that follows any of them reads a host file into
a guest's disk or config (or hangs on a FIFO).

So every read of a volume goes through :class:`VolumeDir`, built on
:mod:`pvebackup.kit.safefs`: the components below the storage path (``backup/``,
the volume directory) are opened with ``O_NOFOLLOW | O_DIRECTORY``, files
relative to that directory fd with ``O_NOFOLLOW`` after an ``lstat`` that refuses
a FIFO or device without opening it, names from storage must be one plain path
component, and reads are bounded. What is checked is then the open descriptor,
never a name looked up again.
"""

from __future__ import annotations

import errno
import os

from pvebackup.api.errors import (
    CorruptIndexError,
    IntegrityError,
    UnsafeArchiveError,
    UnsafeStorageError,
    VolumeNotFoundError,
)
from pvebackup.kit import safefs
from pvebackup.providers.directory.volumes import (
    INDEX_MAX,
    INDEX_NAME,
    BackupIndex,
    VolumeLayout,
    VolumeName,
)

__all__ = ["CONFIG_LIMIT", "VolumeDir", "check_stored_name", "read_index"]

CONFIG_LIMIT = safefs.MAX_CONFIG_FILE_SIZE
"""Largest guest or firewall config read (pmxcfs holds no larger file)."""

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
        # The storage path itself comes from the node's storage.cfg: trusted;
        # below it nothing is followed (safefs).
        try:
            self.fd = safefs.open_dir(layout.root, (layout.backup_dir.name, dirname))
        except FileNotFoundError as exc:
            raise VolumeNotFoundError(f"backup volume {volname!r} does not exist") from exc
        except NotADirectoryError as exc:
            raise UnsafeStorageError(
                f"backup volume {volname!r}: {dirname} is not a directory"
            ) from exc
        except UnsafeStorageError as exc:
            raise UnsafeStorageError(f"backup volume {volname!r}: {exc}") from exc

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
            return safefs.open_file_at(self.fd, name)
        except FileNotFoundError:
            return None
        except (IsADirectoryError, UnsafeStorageError) as exc:
            raise UnsafeStorageError(
                f"backup volume {self.volname!r}: {what} {name} is "
                f"{safefs.kind_at(self.fd, name)}, not a regular file"
            ) from exc

    def read(self, name: str, what: str, limit: int) -> bytes | None:
        """The content of regular file ``name`` (None if absent), at most ``limit`` bytes.

        :raises IntegrityError: the file is larger than ``limit``.
        """
        fd = self.open_regular(name, what)
        if fd is None:
            return None
        with safefs.owned_fd(fd):
            try:
                return safefs.read_fd(fd, limit=limit, name=name)
            except OSError as exc:
                if exc.errno != errno.EFBIG:
                    raise
                raise IntegrityError(
                    f"backup volume {self.volname!r}: {what} {name} is larger than {limit} bytes"
                ) from exc

    def read_index(self) -> BackupIndex:
        """The volume's ``index.json``, checked to describe this volume.

        :raises VolumeNotFoundError: no index (the volume is not committed).
        :raises CorruptIndexError: malformed, too large, or about another volume.
        """
        try:
            data = self.read(INDEX_NAME, "index", INDEX_MAX)
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
