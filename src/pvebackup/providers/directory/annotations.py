"""Notes, protection and verify state of ``backup-dir`` volumes: sidecar files.

The sidecars (:mod:`pvebackup.kit.annotations`) are files in the volume's
directory, beside ``index.json``: ``notes``, ``protected``, ``verify-state.json``.
``index.json`` does not list them and its checksum does not cover them, so a
backup's contents never depend on them.

Threat: the volume directory may be written by others. Everything goes through
the volume's directory fd (:meth:`VolumeLayout.open_volume`: no symlink is
followed below ``path``); a sidecar is read without following symlinks and
bounded in size, written atomically (a temporary file renamed over the name, so
a symlink planted there is replaced, never written through), and removed with
``unlink`` (removes a symlink itself, never its target).
"""

from __future__ import annotations

import errno
import os
import stat

from pvebackup.api.errors import CorruptIndexError, UnsafeStorageError
from pvebackup.kit import safefs
from pvebackup.kit.annotations import (
    NOTES_MAX,
    NOTES_NAME,
    PROTECTED_NAME,
    VERIFY_MAX,
    VERIFY_NAME,
    VerifyState,
    check_notes,
    parse_notes,
)
from pvebackup.kit.safefs import owned_fd
from pvebackup.providers.directory.volumes import VolumeLayout

__all__ = [
    "is_protected",
    "read_notes",
    "read_verify_state",
    "set_protected",
    "write_notes",
    "write_verify_state",
]


def read_notes(layout: VolumeLayout, volname: str) -> str:
    """The volume's notes, ``""`` if none.

    :raises VolumeNotFoundError: no such volume.
    :raises CorruptIndexError: the notes are too large, not UTF-8, or not a file
        (a symlink, a FIFO: never followed nor opened for reading).
    """
    where = f"{volname}: {NOTES_NAME}"
    with owned_fd(layout.open_volume(volname)) as volume_fd:
        try:
            data = safefs.read_file_at(volume_fd, NOTES_NAME, limit=NOTES_MAX)
        except FileNotFoundError:
            return ""
        except UnsafeStorageError as exc:
            raise CorruptIndexError(f"{where}: {exc}") from exc
        except OSError as exc:  # ELOOP (a symlink), EISDIR...
            raise CorruptIndexError(f"{where}: cannot read: {exc.strerror}") from exc
    return parse_notes(data, where)


def write_notes(layout: VolumeLayout, volname: str, text: str) -> None:
    """Replace the volume's notes (``""``: remove them).

    :raises UsageError: notes too long or with control characters.
    :raises VolumeNotFoundError: no such volume.
    """
    data = check_notes(text)
    with owned_fd(layout.open_volume(volname)) as volume_fd:
        if data:
            safefs.atomic_write_at(volume_fd, NOTES_NAME, data)
        else:
            _unlink(volume_fd, NOTES_NAME, volname)


def is_protected(layout: VolumeLayout, volname: str) -> bool:
    """Whether the volume is protected: anything at all named ``protected`` counts.

    Fails safe: a symlink or directory planted there keeps the volume rather than
    letting prune remove it.

    :raises VolumeNotFoundError: no such volume.
    """
    with owned_fd(layout.open_volume(volname)) as volume_fd:
        return safefs.stat_at(volume_fd, PROTECTED_NAME) is not None


def set_protected(layout: VolumeLayout, volname: str, protected: bool) -> None:
    """Protect or unprotect the volume.

    :raises VolumeNotFoundError: no such volume.
    :raises UnsafeStorageError: unprotect, but a directory sits at the name.
    """
    with owned_fd(layout.open_volume(volname)) as volume_fd:
        if protected:
            safefs.atomic_write_at(volume_fd, PROTECTED_NAME, b"1\n")
        else:
            _unlink(volume_fd, PROTECTED_NAME, volname)


def read_verify_state(layout: VolumeLayout, volname: str) -> VerifyState | None:
    """The last verify's result, ``None`` if never verified or unreadable (advisory).

    :raises VolumeNotFoundError: no such volume.
    """
    with owned_fd(layout.open_volume(volname)) as volume_fd:
        try:
            data = safefs.read_file_at(volume_fd, VERIFY_NAME, limit=VERIFY_MAX)
        except (OSError, UnsafeStorageError):  # absent, a symlink, too large...
            return None
    return VerifyState.from_bytes(data)


def write_verify_state(layout: VolumeLayout, volname: str, state: VerifyState) -> None:
    """Record a verify's result beside the volume.

    :raises VolumeNotFoundError: no such volume.
    """
    with owned_fd(layout.open_volume(volname)) as volume_fd:
        safefs.atomic_write_at(volume_fd, VERIFY_NAME, state.to_bytes())


def _unlink(dir_fd: int, name: str, volname: str) -> None:
    st = safefs.stat_at(dir_fd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        raise UnsafeStorageError(f"{volname}: {name} is a directory: left alone")
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno == errno.EISDIR:  # swapped for a directory meanwhile
            raise UnsafeStorageError(f"{volname}: {name} is a directory: left alone") from exc
        raise
    os.fsync(dir_fd)
