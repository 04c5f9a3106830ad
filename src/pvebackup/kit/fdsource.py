"""A :class:`~pvebackup.kit.nbdsource.BlockSource` over an open file descriptor.

Proxmox VE's ``file-handle`` backup mechanism hands a provider a file handle
(qemu's snapshot access behind ``nbdfuse``) plus a ``next-dirty-region``
iterator instead of an NBD socket. This serves that to providers written
against the seed's ``backup_nbd``: the bridge gives them this source through
their ``source_factory``, so they read exactly as they would from the export.

It behaves like qemu's export where a provider can get it wrong: with dirty
regions given, a read outside them fails (the snapshot access has no data
there; nbdfuse would fail the read), and every read must lie inside the disk.
Discards punch holes (``fallocate(PUNCH_HOLE|KEEP_SIZE)``, what
``PVE::Storage::Common::deallocate`` does); a file that cannot punch holes
stops trimming silently, as a read-only export would.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from typing import Final

from pvebackup.api.errors import NbdError
from pvebackup.kit.nbdsource import Range, merge_ranges

__all__ = ["FdSource"]

_FALLOC_FL_KEEP_SIZE: Final = 0x01
_FALLOC_FL_PUNCH_HOLE: Final = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int


class FdSource:
    """The disk behind ``fd`` (``size`` bytes), dirty ``regions`` or all of it.

    :param regions: the dirty regions (``next-dirty-region``'s answers) when a
        bitmap is used, ``None`` for a full read.
    The descriptor is borrowed: :meth:`close` does not close it.
    """

    def __init__(self, fd: int, size: int, regions: list[Range] | None = None) -> None:
        if size < 0:
            raise NbdError(f"invalid disk size {size}")
        self.fd = fd
        self.size = size
        self.can_trim = True
        self._regions = None if regions is None else merge_ranges(regions)
        if self._regions and self._regions[-1][0] + self._regions[-1][1] > size:
            raise NbdError(f"dirty regions reach past the end of the {size} byte disk")
        self._done: dict[int, BaseException | None] = {}
        self._next = 1
        self.closed = False

    def data_extents(self) -> list[Range]:
        return list(self._regions) if self._regions is not None else [(0, self.size)]

    def dirty_extents(self) -> list[Range]:
        if self._regions is None:
            raise NbdError("no dirty regions were given for this file handle")
        return list(self._regions)

    def _inside(self, offset: int, length: int) -> bool:
        if offset < 0 or offset + length > self.size:
            return False
        if self._regions is None:
            return True
        return any(s <= offset and offset + length <= s + n for s, n in self._regions)

    def submit_read(self, buf: memoryview, offset: int) -> int:
        if self.closed:
            raise NbdError("the file handle source is closed")
        length = len(buf)
        if not self._inside(offset, length):
            raise NbdError(f"read of {length} bytes at {offset} outside the readable regions")
        cookie, self._next = self._next, self._next + 1
        failure: BaseException | None = None
        try:
            got = 0
            while got < length:
                n = os.preadv(self.fd, [buf[got:]], offset + got)
                if n == 0:
                    raise NbdError(f"short read at {offset + got}: the file handle ended early")
                got += n
        except OSError as exc:
            failure = NbdError(f"read of {length} bytes at {offset} failed: {exc.strerror}")
        except NbdError as exc:
            failure = exc
        self._done[cookie] = failure
        return cookie

    def wait(self, cookie: int) -> None:
        try:
            failure = self._done.pop(cookie)
        except KeyError:
            raise NbdError(f"no read with cookie {cookie} in flight") from None
        if failure is not None:
            raise failure

    def trim(self, offset: int, length: int) -> None:
        if not self.can_trim or length <= 0 or self.closed:
            return
        if not self._inside(offset, length):
            raise NbdError(f"discard of {length} bytes at {offset} outside the readable regions")
        if _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
            err = ctypes.get_errno()
            if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF, errno.ENODEV, errno.EPERM):
                self.can_trim = False  # read-only handle or no hole punching: skip
                return
            raise NbdError(f"discard at {offset} failed: {os.strerror(err)}")

    def close(self) -> None:
        self.closed = True
        self._done.clear()
