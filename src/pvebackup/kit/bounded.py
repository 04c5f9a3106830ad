"""Bounded reads of small files that come from storage or a backup.

A config, an ``index.json`` or a key file is a few KiB. Read from a storage that
someone else can write, it may instead be a 50 GiB file (memory), a FIFO (a read
that never returns), a device or a directory. :func:`read_bounded` reads at most
``limit`` bytes of a regular file and refuses everything else with an ``OSError``
whose ``strerror`` says why, so that each caller maps it to its own typed error.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = ["MAX_CONFIG_FILE_SIZE", "read_bounded", "read_text_bounded"]

MAX_CONFIG_FILE_SIZE = 1024 * 1024
"""Largest guest or firewall config read from a backup (Proxmox VE's cluster file
system refuses larger files, so no real guest has one)."""


def read_bounded(path: str | os.PathLike[str], limit: int) -> bytes:
    """The contents of the regular file ``path``, at most ``limit`` bytes.

    :raises OSError: cannot open; ``EISDIR`` a directory; ``EINVAL`` not a regular
        file (FIFO, device, socket); ``EFBIG`` longer than ``limit``.
    """
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", os.fspath(path))
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", os.fspath(path))
        parts: list[bytes] = []
        total = 0
        while True:  # the file may grow while we read: never past limit + 1
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
            if total > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes", os.fspath(path))
        return b"".join(parts)
    finally:
        os.close(fd)


def read_text_bounded(path: str | os.PathLike[str], limit: int) -> str:
    """:func:`read_bounded` decoded as UTF-8.

    :raises OSError: as :func:`read_bounded`.
    :raises UnicodeDecodeError: not UTF-8.
    """
    return read_bounded(path, limit).decode("utf-8")
