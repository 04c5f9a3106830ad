"""Reading key and passphrase files the way OpenSSH reads private keys.

A secret that group or others can read is no secret: OpenSSH refuses such a
private key ("UNPROTECTED PRIVATE KEY FILE") rather than use it, so that the
mistake is noticed and fixed instead of silently leaking the key to every local
user. :func:`read_secret_file` does the same for our key and passphrase files.

The mode checked is that of the file actually opened (``fstat`` on the fd), so a
file swapped between a check and the open cannot slip through. Symlinks are
followed, as OpenSSH follows them: the target's mode is what protects the secret.
The open and the bounded read are :mod:`pvebackup.kit.safefs`'s (non-blocking, only
regular files), so a FIFO or a device put in a key file's place cannot hang or feed
us; the size is bounded.
"""

from __future__ import annotations

import errno
import os
import shlex
import stat

from pvebackup.api.errors import KeyFileError, UnprotectedKeyFileError, UnsafeStorageError
from pvebackup.kit import safefs

__all__ = ["MAX_SECRET_FILE_SIZE", "read_secret_file"]

MAX_SECRET_FILE_SIZE = 64 * 1024
"""Key files are ~300 bytes and passphrases one line; anything larger is not ours."""


def read_secret_file(path: str | os.PathLike[str], what: str = "key file") -> bytes:
    """The content of the secret file ``path``, refused unless only its owner may access it.

    :param what: names the file in messages (``"key file"``, ``"passphrase file"``).
    :raises UnprotectedKeyFileError: group or others have any permission on it;
        the message says ``chmod 600 PATH``.
    :raises KeyFileError: it cannot be opened or read, is no regular file, or is
        larger than :data:`MAX_SECRET_FILE_SIZE`.
    """
    name = os.fspath(path)
    try:
        fd = safefs.open_file_path(name)
    except (UnsafeStorageError, IsADirectoryError) as exc:
        raise KeyFileError(f"{name}: the {what} is not a regular file") from exc
    except OSError as exc:
        raise KeyFileError(f"{name}: cannot read {what}: {exc.strerror}") from exc
    with safefs.owned_fd(fd):
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            raise UnprotectedKeyFileError(
                f"{name}: UNPROTECTED {what.upper()}: permissions {mode:04o} let group or"
                f" others access it, so it is refused; make it private to its owner with"
                f" 'chmod 600 {shlex.quote(name)}'"
            )
        try:
            return safefs.read_fd(fd, limit=MAX_SECRET_FILE_SIZE, name=name)
        except OSError as exc:
            if exc.errno == errno.EFBIG:
                raise KeyFileError(
                    f"{name}: the {what} is larger than {MAX_SECRET_FILE_SIZE} bytes"
                ) from exc
            raise KeyFileError(f"{name}: cannot read {what}: {exc.strerror}") from exc
