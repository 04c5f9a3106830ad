"""An in-memory :class:`~pvebackup.kit.nbdsource.BlockSource` for unit tests.

Tests of a provider's ``backup_nbd`` replace the export with this instead of
starting qemu: pass ``lambda path, name, bitmap: fake`` as the provider's source
factory. It behaves like the host's export in the ways a provider can get wrong:

- ``data`` is the disk; ``allocated`` the extents ``base:allocation`` reports as
  data (default: all of it); ``dirty`` the extents of the dirty bitmap.
- With ``dirty`` given, reads outside the dirty extents fail, as qemu's export
  does in bitmap mode ``reuse`` (a provider must never read anything else then).
- Reads complete only in :meth:`~FakeNbdSource.wait`, so a caller that uses a
  buffer before waiting sees stale bytes; ``fail_at`` makes the read covering that
  offset fail with :class:`~pvebackup.api.errors.NbdError`.
- Everything is recorded: ``reads`` and ``trims`` as ``(offset, length)``, the
  distinct ``buffers`` reads went into (to check buffer reuse) and the most reads
  ever in flight (``max_in_flight``).

Example::

    fake = FakeNbdSource(disk_bytes, allocated=[(0, 65536)])
    provider.backup_nbd(..., source_factory=lambda p, n, b: fake)
    assert fake.reads == [(0, 65536)] and fake.closed
"""

from __future__ import annotations

from pvebackup.api.errors import NbdError
from pvebackup.kit.nbdsource import Range, merge_ranges

__all__ = ["FakeNbdSource"]


class FakeNbdSource:
    """A disk in memory behind the :class:`~pvebackup.kit.nbdsource.BlockSource` API."""

    def __init__(
        self,
        data: bytes | bytearray,
        *,
        allocated: list[Range] | None = None,
        dirty: list[Range] | None = None,
        can_trim: bool = True,
        fail_at: int | None = None,
    ) -> None:
        self.data = bytearray(data)
        self.size = len(data)
        self.can_trim = can_trim
        self._allocated = merge_ranges(allocated if allocated is not None else [(0, self.size)])
        self._dirty = merge_ranges(dirty) if dirty is not None else None
        self._fail_at = fail_at
        self._pending: dict[int, tuple[memoryview, int]] = {}
        self._next_cookie = 1
        self.reads: list[Range] = []
        self.trims: list[Range] = []
        self.buffers: set[int] = set()
        self.max_in_flight = 0
        self.closed = False

    def data_extents(self) -> list[Range]:
        if self._dirty is not None:
            # qemu refuses base:allocation outside the dirty extents in ``reuse`` mode.
            raise NbdError("base:allocation is not available on an incremental export")
        return list(self._allocated)

    def dirty_extents(self) -> list[Range]:
        if self._dirty is None:
            raise NbdError("no dirty bitmap was requested for this export")
        return list(self._dirty)

    def _check_open(self) -> None:
        if self.closed:
            raise NbdError("the NBD connection is closed")

    def submit_read(self, buf: memoryview, offset: int) -> int:
        self._check_open()
        length = len(buf)
        if offset < 0 or offset + length > self.size:
            raise NbdError(f"read of {length} bytes at {offset} is past the end")
        if self._dirty is not None and not any(
            start <= offset and offset + length <= start + n for start, n in self._dirty
        ):
            raise NbdError(f"read of {length} bytes at {offset} outside the dirty extents")
        cookie, self._next_cookie = self._next_cookie, self._next_cookie + 1
        self._pending[cookie] = (buf, offset)
        self.reads.append((offset, length))
        self.buffers.add(id(buf.obj))
        self.max_in_flight = max(self.max_in_flight, len(self._pending))
        return cookie

    def wait(self, cookie: int) -> None:
        self._check_open()
        try:
            buf, offset = self._pending.pop(cookie)
        except KeyError:
            raise NbdError(f"no read with cookie {cookie} in flight") from None
        if self._fail_at is not None and offset <= self._fail_at < offset + len(buf):
            raise NbdError(f"read failed at {self._fail_at} (injected)")
        buf[:] = self.data[offset : offset + len(buf)]

    def trim(self, offset: int, length: int) -> None:
        self._check_open()
        if self.can_trim and length > 0:
            self.trims.append((offset, length))

    def close(self) -> None:
        self.closed = True
        self._pending.clear()

    def __enter__(self) -> FakeNbdSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
