"""The NBD export a disk is backed up from, seen through libnbd.

:class:`NbdSource` connects to the host's export, finds the extents to read
(``base:allocation`` for a full backup, ``qemu:dirty-bitmap:<name>`` for an
incremental one), issues reads asynchronously into caller-owned buffers and
discards what was stored. Every libnbd error becomes :class:`NbdError`.

In ``reuse`` mode the export refuses reads and ``base:allocation`` queries
outside the dirty extents, so only the dirty bitmap context is requested then.
All calls come from one thread (libnbd handles are not shared across threads here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import nbd

from pvebackup.api.errors import NbdError
from pvebackup.providers.store.plan import Range, merge_ranges

__all__ = ["BlockSource", "NbdSource", "STATE_HOLE", "STATE_ZERO", "STATE_DIRTY"]

STATE_HOLE = 1
"""``base:allocation``: the range is not allocated."""
STATE_ZERO = 2
"""``base:allocation``: the range reads as zeros."""
STATE_DIRTY = 1
"""``qemu:dirty-bitmap:*``: the range changed since the bitmap was cleared."""

_ALLOCATION = "base:allocation"
# One block status request covers at most this much; servers may answer less.
_STATUS_STEP = 1 << 30


class BlockSource(Protocol):
    """What the backup pipeline needs from an export (tests wrap it to record reads)."""

    size: int

    def data_extents(self) -> list[Range]:
        """Ranges that may hold data (full backups)."""
        ...

    def dirty_extents(self) -> list[Range]:
        """Ranges marked dirty in the bitmap (incremental backups)."""
        ...

    def submit_read(self, buf: memoryview, offset: int) -> int:
        """Start reading ``len(buf)`` bytes at ``offset`` into ``buf``; returns a cookie."""
        ...

    def wait(self, cookie: int) -> None:
        """Block until the read ``cookie`` has completed. Raises :class:`NbdError`."""
        ...

    def trim(self, offset: int, length: int) -> None:
        """Discard a range that has been stored (no-op if the export cannot trim)."""
        ...

    def close(self) -> None:
        """Disconnect."""
        ...


class NbdSource:
    """A connected libnbd handle on export ``export_name`` at Unix socket ``path``."""

    def __init__(self, path: str, export_name: str, bitmap: str | None = None) -> None:
        self._bitmap_context = f"qemu:dirty-bitmap:{bitmap}" if bitmap else None
        self._handle = nbd.NBD()
        try:
            self._handle.set_export_name(export_name)
            if self._bitmap_context is not None:
                self._handle.add_meta_context(self._bitmap_context)
            else:
                self._handle.add_meta_context(_ALLOCATION)
            self._handle.connect_unix(path)
            self.size: int = self._handle.get_size()
            self._can_trim = bool(self._handle.can_trim())
            if self._bitmap_context is not None and not self._handle.can_meta_context(
                self._bitmap_context
            ):
                raise NbdError(f"export {export_name} does not offer dirty bitmap {bitmap}")
            self._has_allocation = self._bitmap_context is None and bool(
                self._handle.can_meta_context(_ALLOCATION)
            )
        except nbd.Error as exc:
            self.close()
            raise NbdError(f"cannot connect to NBD export {export_name} at {path}: {exc}") from exc
        self._buffers: dict[int, Any] = {}

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.shutdown()
            except nbd.Error:
                pass  # the connection may already be gone; nothing left to flush
            del handle  # libnbd 1.14 has no close(): dropping the handle closes it

    def __enter__(self) -> NbdSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # extents ---------------------------------------------------------------------

    def _status(self, context: str, want: Callable[[int], bool]) -> list[Range]:
        found: list[Range] = []
        offset = 0
        while offset < self.size:
            count = min(self.size - offset, _STATUS_STEP)
            got: list[tuple[int, list[int]]] = []

            def callback(
                meta: str, start: int, entries: list[int], err: Any, got: Any = got
            ) -> int:
                if meta == context:
                    got.append((start, list(entries)))
                return 0

            try:
                self._handle.block_status(count, offset, callback)
            except nbd.Error as exc:
                raise NbdError(f"block status ({context}) at {offset} failed: {exc}") from exc
            advanced = 0
            for start, entries in got:
                pos = start
                for i in range(0, len(entries) - 1, 2):
                    length, flags = entries[i], entries[i + 1]
                    length = min(length, self.size - pos)
                    if length <= 0:
                        break
                    if want(flags):
                        found.append((pos, length))
                    pos += length
                advanced = max(advanced, pos - offset)
            if advanced <= 0:
                raise NbdError(f"block status ({context}) at {offset} made no progress")
            offset += advanced
        return merge_ranges(found)

    def data_extents(self) -> list[Range]:
        """The ranges that may hold data (full backups); the rest reads as zeros.

        Without ``base:allocation`` support everything counts as data.
        """
        if not self._has_allocation:
            return [(0, self.size)] if self.size else []
        return self._status(_ALLOCATION, lambda flags: not flags & STATE_ZERO)

    def dirty_extents(self) -> list[Range]:
        """The ranges marked dirty in the bitmap given to the constructor."""
        if self._bitmap_context is None:
            raise NbdError("no dirty bitmap was requested for this export")
        return self._status(self._bitmap_context, lambda flags: bool(flags & STATE_DIRTY))

    # reads and discards -------------------------------------------------------------

    def submit_read(self, buf: memoryview, offset: int) -> int:
        aio = nbd.Buffer.from_buffer(buf)
        try:
            cookie: int = self._handle.aio_pread(aio, offset)
        except nbd.Error as exc:
            raise NbdError(f"read of {len(buf)} bytes at {offset} failed: {exc}") from exc
        self._buffers[cookie] = aio  # keep it alive until the read completed
        return cookie

    def wait(self, cookie: int) -> None:
        try:
            while not self._handle.aio_command_completed(cookie):
                self._handle.poll(-1)
        except nbd.Error as exc:
            raise NbdError(f"read failed: {exc}") from exc
        finally:
            self._buffers.pop(cookie, None)

    def trim(self, offset: int, length: int) -> None:
        if not self._can_trim or length <= 0:
            return
        try:
            self._handle.trim(length, offset)
        except nbd.Error as exc:
            raise NbdError(f"discard of {length} bytes at {offset} failed: {exc}") from exc
