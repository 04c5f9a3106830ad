"""The NBD export a disk is backed up from: the one I/O seam of ``backup_nbd``.

:class:`BlockSource` is what a provider needs from the host's export; :class:`NbdSource`
is it over libnbd, :class:`pvebackup.kit.nbdfake.FakeNbdSource` is it in memory for
unit tests. Around it:

- extents: ``base:allocation`` for a full backup (what is not known to read as
  zeros), ``qemu:dirty-bitmap:<name>`` for an incremental one (what changed). In
  ``reuse`` mode the export refuses reads and ``base:allocation`` queries outside
  the dirty extents, so only the bitmap context is requested then.
- :func:`read_in_order`: asynchronous reads with a few requests in flight, handed
  back in submission order, into buffers of a :class:`BufferPool`.
- :class:`Trimmer`: discards of what was stored, consecutive ranges joined and
  aligned (:func:`pvebackup.api.discard.discard_range`), so the host's fleecing
  image shrinks as the backup advances.

Every libnbd error becomes :class:`~pvebackup.api.errors.NbdError`. All calls on
one source come from one thread (libnbd handles are not shared across threads here).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

import nbd

from pvebackup.api.discard import discard_range
from pvebackup.api.errors import NbdError

__all__ = [
    "ALLOCATION_CONTEXT",
    "DIRTY_BITMAP_PREFIX",
    "READS_IN_FLIGHT",
    "STATE_DIRTY",
    "STATE_HOLE",
    "STATE_ZERO",
    "TRIM_BATCH",
    "BlockSource",
    "BufferPool",
    "NbdSource",
    "Range",
    "ReadJob",
    "SourceFactory",
    "Trimmer",
    "connect",
    "dirty_bitmap_context",
    "is_data",
    "is_dirty",
    "merge_ranges",
    "read_in_order",
    "write_zeroes",
]

Range = tuple[int, int]
"""``(offset, length)`` in bytes on the disk."""

ALLOCATION_CONTEXT = "base:allocation"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
STATE_HOLE = 1
"""``base:allocation`` flag: the range is not allocated."""
STATE_ZERO = 2
"""``base:allocation`` flag: the range reads as zeros."""
STATE_DIRTY = 1
"""``qemu:dirty-bitmap:*`` flag: the range changed since the bitmap was cleared
(libnbd 1.14 has no name for it)."""

STATUS_STEP = 1 << 30
"""Largest block status request: some servers refuse 4 GiB and more."""
READS_IN_FLIGHT = 4
"""Default depth of :func:`read_in_order`: enough to hide the round trip on a socket."""
TRIM_BATCH = 16 * 1024 * 1024
"""Discards of consecutive stored ranges are joined up to this size."""


def dirty_bitmap_context(bitmap_name: str) -> str:
    """The NBD meta context qemu exports the dirty bitmap ``bitmap_name`` under."""
    return f"{DIRTY_BITMAP_PREFIX}{bitmap_name}"


def is_data(flags: int) -> bool:
    """``base:allocation`` flags of a range a full backup must read.

    Only ``STATE_ZERO`` is skipped: a hole without it (``STATE_HOLE`` alone, e.g.
    a qcow2 cluster unallocated over a backing file) may read as data.
    """
    return not flags & STATE_ZERO


def is_dirty(flags: int) -> bool:
    """``qemu:dirty-bitmap:*`` flags of a range an incremental backup must read."""
    return bool(flags & STATE_DIRTY)


def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    """Sort ``ranges``, drop empty ones and join overlapping or touching ones."""
    out: list[Range] = []
    for offset, length in sorted(r for r in ranges if r[1] > 0):
        if out and offset <= out[-1][0] + out[-1][1]:
            start, prev_len = out[-1]
            out[-1] = (start, max(prev_len, offset + length - start))
        else:
            out.append((offset, length))
    return out


class BlockSource(Protocol):
    """What a provider needs from the export; tests pass a fake or wrap a real one."""

    size: int
    """Virtual size of the disk in bytes."""
    can_trim: bool
    """The export accepts discards (a read-only export does not)."""

    def data_extents(self) -> list[Range]:
        """Ranges that may hold data, merged and sorted (full backups); the rest is zero."""
        ...

    def dirty_extents(self) -> list[Range]:
        """Ranges marked dirty in the bitmap, merged and sorted (incremental backups).

        :raises NbdError: no bitmap was asked for when connecting.
        """
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
        """Disconnect (idempotent)."""
        ...


SourceFactory = Callable[[str, str, "str | None"], BlockSource]
"""``factory(socket_path, export_name, bitmap_or_None)``; :func:`connect` by default."""


class NbdSource:
    """A connected libnbd handle on export ``export_name`` at Unix socket ``path``.

    With ``bitmap`` the context ``qemu:dirty-bitmap:<bitmap>`` is requested (and must
    be offered), else ``base:allocation`` (optional: without it everything is data).
    """

    def __init__(self, path: str, export_name: str, bitmap: str | None = None) -> None:
        self._bitmap_context = dirty_bitmap_context(bitmap) if bitmap else None
        self._handle: Any = nbd.NBD()
        self._buffers: dict[int, Any] = {}
        try:
            self._handle.set_export_name(export_name)
            self._handle.add_meta_context(self._bitmap_context or ALLOCATION_CONTEXT)
            self._handle.connect_unix(path)
            self.size: int = self._handle.get_size()
            self.can_trim: bool = bool(self._handle.can_trim())
            if self._bitmap_context is not None and not self._handle.can_meta_context(
                self._bitmap_context
            ):
                self.close()
                raise NbdError(
                    f"NBD export {export_name!r} at {path} does not offer {self._bitmap_context}"
                )
            self._has_allocation = self._bitmap_context is None and bool(
                self._handle.can_meta_context(ALLOCATION_CONTEXT)
            )
        except nbd.Error as exc:
            self.close()
            raise NbdError(f"cannot connect to NBD export {export_name} at {path}: {exc}") from exc

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
            count = min(self.size - offset, STATUS_STEP)
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
                    # A server's lengths are clipped to the disk: a reply past the
                    # end must not make us read (or plan chunks) beyond it.
                    length = min(entries[i], self.size - pos)
                    if length <= 0:
                        break
                    if want(entries[i + 1]):
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

        :raises NbdError: connected for a dirty bitmap: the export refuses
            ``base:allocation`` queries outside its dirty extents then.
        """
        if self._bitmap_context is not None:
            raise NbdError("base:allocation was not requested for this export (dirty bitmap)")
        if not self._has_allocation:
            return [(0, self.size)] if self.size else []
        return self._status(ALLOCATION_CONTEXT, is_data)

    def dirty_extents(self) -> list[Range]:
        """The ranges marked dirty in the bitmap given to the constructor."""
        if self._bitmap_context is None:
            raise NbdError("no dirty bitmap was requested for this export")
        return self._status(self._bitmap_context, is_dirty)

    # reads and discards -------------------------------------------------------------

    def submit_read(self, buf: memoryview, offset: int) -> int:
        # libnbd 1.14 never frees what an nbd.Buffer wraps: callers read into reused
        # buffers (BufferPool), so that this leaks a few bytes per read, not the data.
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
        if not self.can_trim or length <= 0:
            return
        try:
            self._handle.trim(length, offset)
        except nbd.Error as exc:
            raise NbdError(f"discard of {length} bytes at {offset} failed: {exc}") from exc


ZERO_STEP = 1 << 30
"""One write-zeroes request of :func:`write_zeroes` (the NBD length field has 32 bits)."""


def write_zeroes(path: str, export_name: str, length: int) -> None:
    """Write zeroes over the first ``length`` bytes of a writable export.

    Not for disks: the host uses it on a throw-away ``null-co`` node (which stores
    nothing) so that an enabled bitmap on that node becomes entirely dirty (see
    :mod:`pvebackup.host.qemu.export`, mode new). Kept here so that libnbd has one
    user in the code base.

    :raises NbdError: a libnbd call failed.
    """
    handle: Any = nbd.NBD()
    try:
        handle.set_export_name(export_name)
        handle.connect_unix(path)
        offset = 0
        while offset < length:
            step = min(ZERO_STEP, length - offset)
            handle.zero(step, offset)
            offset += step
        handle.shutdown()
    except nbd.Error as exc:
        raise NbdError(f"writing zeroes to NBD export {export_name} at {path}: {exc}") from exc
    finally:
        del handle  # libnbd 1.14 has no close(): dropping the handle closes it


def connect(path: str, export_name: str, bitmap: str | None = None) -> BlockSource:
    """The default :data:`SourceFactory`: an :class:`NbdSource`."""
    return NbdSource(path, export_name, bitmap)


class BufferPool:
    """Read buffers, reused.

    libnbd 1.14's ``nbd.Buffer.from_buffer`` never releases the buffer it wraps,
    so a fresh bytearray per read would keep every byte ever read alive (1 GiB of
    RSS for a 1 GiB disk, seen here). Reads go into a few buffers taken from here
    and given back once their data has been used.
    """

    def __init__(self) -> None:
        self._free: list[bytearray] = []

    def take(self, length: int) -> tuple[bytearray, memoryview]:
        """A buffer of at least ``length`` bytes, and a view of exactly ``length``."""
        for i, buf in enumerate(self._free):
            if len(buf) >= length:
                del self._free[i]
                return buf, memoryview(buf)[:length]
        buf = bytearray(length)
        return buf, memoryview(buf)

    def give(self, buf: bytearray) -> None:
        """Return a buffer taken with :meth:`take` (its views must no longer be used)."""
        self._free.append(buf)


class ReadJob(Protocol):
    """One buffer's worth of reading: ``length`` bytes from ``offset``, of which
    ``reads`` (sorted, inside) are read from the export and the rest is zero."""

    @property
    def offset(self) -> int: ...

    @property
    def length(self) -> int: ...

    @property
    def reads(self) -> Sequence[Range]: ...


J = TypeVar("J", bound=ReadJob)

_ZEROS = bytes(4 * 1024 * 1024)


def _zero(view: memoryview) -> None:
    n = len(view)
    view[:] = memoryview(_ZEROS)[:n] if n <= len(_ZEROS) else bytes(n)


def read_in_order(
    source: BlockSource,
    jobs: Iterable[J],
    pool: BufferPool,
    *,
    depth: int = READS_IN_FLIGHT,
    pace: Callable[[int], None] | None = None,
) -> Iterator[tuple[J, bytearray, memoryview]]:
    """Read ``jobs`` with up to ``depth`` in flight; yield them in the order given.

    Yields ``(job, buffer, view)``: ``view`` holds the job's ``length`` bytes
    (those outside ``job.reads`` zero), ``buffer`` is the pool's buffer behind
    it, to be given back to ``pool`` once the data has been used. ``pace`` is
    called with the bytes to read before each job's reads are issued (the
    bandwidth limit). ``jobs`` is consumed lazily, at most ``depth`` ahead.
    On an exception the reads in flight are abandoned with the source.
    """
    pending: deque[tuple[J, bytearray, memoryview, list[int]]] = deque()
    todo = iter(jobs)
    exhausted = False
    while True:
        while not exhausted and len(pending) < depth:
            try:
                job = next(todo)
            except StopIteration:
                exhausted = True
                break
            if pace is not None:
                pace(sum(length for _, length in job.reads))
            buf, view = pool.take(job.length)
            cookies: list[int] = []
            pos = job.offset
            for off, length in job.reads:
                if off > pos:  # a gap between reads is a hole: zeros
                    _zero(view[pos - job.offset : off - job.offset])
                cookies.append(
                    source.submit_read(view[off - job.offset : off - job.offset + length], off)
                )
                pos = off + length
            if pos < job.offset + job.length:
                _zero(view[pos - job.offset :])
            pending.append((job, buf, view, cookies))
        if not pending:
            return
        job, buf, view, cookies = pending.popleft()
        for cookie in cookies:
            source.wait(cookie)
        yield job, buf, view


class Trimmer:
    """Discards stored ranges on the export, consecutive ones joined.

    :meth:`add` the ranges as they are stored (in disk order), :meth:`flush` at the
    end. Only the 64 KiB-aligned inside of each joined range is discarded (see
    :mod:`pvebackup.api.discard`): joining makes fewer of those edges. Nothing is
    sent when the export cannot trim.
    """

    def __init__(self, source: BlockSource, batch: int = TRIM_BATCH) -> None:
        self._source = source
        self._batch = batch
        self._start = 0
        self._end = 0
        self.discarded = 0
        """Bytes discarded so far."""

    def add(self, ranges: Iterable[Range]) -> None:
        if not self._source.can_trim:
            return
        for offset, length in ranges:
            if self._end == offset and self._end - self._start < self._batch:
                self._end += length
                continue
            self.flush()
            self._start, self._end = offset, offset + length

    def flush(self) -> None:
        if self._end > self._start:
            part = discard_range(self._start, self._end - self._start, self._source.size)
            if part is not None:
                self._source.trim(*part)
                self.discarded += part[1]
        self._start = self._end = 0
