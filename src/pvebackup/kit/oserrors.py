"""One mapping of ``OSError`` to our typed errors, for every layer.

A bare ``OSError`` (or a ``PveBackupError`` wrapping one) reaches the CLI as exit
1 with no hint whether retrying, freeing space or fixing a path helps. Every
place that catches an ``OSError`` it cannot handle raises ``os_error(exc, what)
from exc`` instead:

=====================================  ==========================  =====
errno                                  error                       exit
=====================================  ==========================  =====
ENOENT, ENOTDIR                        ``NotFoundError``           3
ENOSPC, EDQUOT                         ``StorageFullError``        12
EINTR, EAGAIN, EBUSY, ETIMEDOUT,       ``TransientBackendError``   10
ESTALE
anything else (EACCES, EPERM, EROFS,   ``PermanentBackendError``   10
EIO, ...)
=====================================  ==========================  =====
"""

from __future__ import annotations

import errno

from pvebackup.api.errors import (
    NotFoundError,
    PermanentBackendError,
    PveBackupError,
    StorageFullError,
    TransientBackendError,
)

__all__ = ["TRANSIENT_ERRNOS", "os_error"]

TRANSIENT_ERRNOS = frozenset(
    {errno.EINTR, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE}
)
_NOT_FOUND = frozenset({errno.ENOENT, errno.ENOTDIR})
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def os_error(exc: OSError, what: str) -> PveBackupError:
    """The typed error for ``exc``; its message is ``what: <strerror>``.

    Use as ``raise os_error(exc, f"cannot read {path}") from exc``.
    """
    message = f"{what}: {exc.strerror or exc}"
    if exc.errno in _NOT_FOUND:
        return NotFoundError(message)
    if exc.errno in _FULL:
        return StorageFullError(message)
    if exc.errno in TRANSIENT_ERRNOS:
        return TransientBackendError(message)
    return PermanentBackendError(message)
