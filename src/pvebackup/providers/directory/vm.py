"""Back up one VM disk from an NBD export into a qcow2 image.

The steps, in the order :func:`backup_disk` runs them:

1. Connect to the export with libnbd, asking for the meta context that says what
   to read: ``qemu:dirty-bitmap:<name>`` for an incremental backup (bitmap mode
   ``reuse``), else ``base:allocation`` (a full backup skips holes and zeroes).
2. Ask block status for the whole disk and turn the answer into a list of reads
   (:func:`plan_reads`, a pure function). An incremental backup reads *only* dirty
   extents: the export refuses reads anywhere else.
3. ``qemu-img create`` the qcow2: empty for a full backup, with the previous
   backup's image of this disk as its backing file for an incremental one.
4. Write into the image through ``qemu-nbd`` on a socket in a private 0700
   directory, started through :mod:`pvebackup.kit.proc` so that it dies with us
   (libnbd's socket activation forks it where we cannot set that up, and leaves
   its socket directory in /tmp when we are killed). Reads run in
   order with a few requests in flight; every chunk is written, then discarded
   on the export so that the host can free its fleecing copy.

Zero areas stay unallocated: a full backup does not write them at all (a new
qcow2 reads as zeroes), an incremental one writes them as NBD "write zeroes",
which qcow2 stores as zero clusters without data (the backing file may hold data
there that must read as zero now).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbd

from pvebackup.api.discard import discard_range
from pvebackup.api.errors import ExternalToolError, NbdError
from pvebackup.api.types import LogFunction
from pvebackup.kit import proc
from pvebackup.kit.crashpoint import crash_point
from pvebackup.providers.directory.transfer import MIB, ProgressLog, RateLimiter

__all__ = [
    "ALLOCATION_CONTEXT",
    "CopyStats",
    "Extent",
    "backup_disk",
    "copy_extents",
    "dirty_bitmap_context",
    "plan_reads",
]

ALLOCATION_CONTEXT = "base:allocation"
READ_CHUNK = 4 * MIB
"""Largest single read; with REQUESTS_IN_FLIGHT this bounds memory to 16 MiB."""
REQUESTS_IN_FLIGHT = 4
_DIRTY = 1
"""Flag bit of a dirty extent in ``qemu:dirty-bitmap:*`` (libnbd 1.14 has no name)."""
_BLOCK_STATUS_MAX = 1 << 30
"""Largest block status request: some servers refuse 4 GiB and more."""
_NBD_START_TIMEOUT = 15.0
_STOP_TIMEOUT = 10.0


def dirty_bitmap_context(bitmap_name: str) -> str:
    """The NBD meta context qemu exports a dirty bitmap under."""
    return f"qemu:dirty-bitmap:{bitmap_name}"


@dataclass(frozen=True, slots=True)
class Extent:
    """A byte range of the disk: ``length`` bytes from ``offset``."""

    offset: int
    length: int


@dataclass(slots=True)
class CopyStats:
    """What one disk backup did, in bytes."""

    size: int = 0
    """Virtual size of the disk."""
    planned: int = 0
    """Bytes the plan said to read (dirty or allocated extents)."""
    read: int = 0
    written: int = 0
    """Bytes written as data into the image."""
    zeroed: int = 0
    """Bytes read that were all zero (skipped or written as zero clusters)."""
    discarded: int = 0
    """Bytes discarded (trimmed) on the export after they were stored."""


def plan_reads(
    extents: Iterable[tuple[int, int, int]], *, incremental: bool, chunk: int = READ_CHUNK
) -> list[Extent]:
    """Turn block status extents into the reads a backup makes, in disk order.

    :param extents: ``(offset, length, flags)`` as block status reported them.
    :param incremental: True for ``qemu:dirty-bitmap`` extents (read what has the
        dirty bit), False for ``base:allocation`` (read all but zero extents).
    :param chunk: largest read; longer ranges are split.
    :returns: reads, adjacent ranges merged first, none larger than ``chunk``.
        With ``incremental``, every read lies inside a dirty extent.
    """
    merged: list[list[int]] = []
    for offset, length, flags in sorted(extents):
        wanted = bool(flags & _DIRTY) if incremental else not flags & nbd.STATE_ZERO
        if not wanted or length <= 0:
            continue
        if merged and merged[-1][0] + merged[-1][1] == offset:
            merged[-1][1] += length
        else:
            merged.append([offset, length])
    reads = []
    for offset, length in merged:
        for start in range(offset, offset + length, chunk):
            reads.append(Extent(start, min(chunk, offset + length - start)))
    return reads


def query_extents(handle: Any, size: int, context: str) -> list[tuple[int, int, int]]:
    """Block status of the whole export for one meta context: ``(offset, length, flags)``."""
    found: list[tuple[int, int, int]] = []
    batch: list[tuple[int, int]] = []

    def collect(metacontext: str, start: int, entries: list[int], err: Any) -> int:
        if metacontext == context:
            batch.extend(zip(entries[0::2], entries[1::2], strict=True))
        return 0

    offset = 0
    while offset < size:
        batch.clear()
        handle.block_status(min(size - offset, _BLOCK_STATUS_MAX), offset, collect)
        if not batch:
            raise NbdError(f"NBD server sent no block status for {context} at offset {offset}")
        for length, flags in batch:
            length = min(length, size - offset)
            if length <= 0:
                break
            found.append((offset, length, flags))
            offset += length
    return found


def copy_extents(
    source: Any,
    target: Any,
    reads: Iterable[Extent],
    *,
    incremental: bool,
    limiter: RateLimiter,
    progress: ProgressLog,
    stats: CopyStats,
    discard: bool,
    depth: int = REQUESTS_IN_FLIGHT,
) -> None:
    """Copy ``reads`` from the ``source`` handle to the ``target`` handle, in order.

    Up to ``depth`` reads are in flight; each finished read is written (or
    skipped / zeroed when all zero) and then, with ``discard``, trimmed on the
    source. ``limiter`` is paid before every read.
    """
    # libnbd 1.14 never frees an nbd.Buffer, nor the memory one wraps: reading into
    # fresh buffers would keep every byte read alive. Reads therefore go into a
    # few reused bytearrays; what leaks is a few bytes of wrapper per read.
    size = source.get_size()
    free: list[bytearray] = []
    pending: deque[tuple[Extent, bytearray, int]] = deque()
    todo: Iterator[Extent] = iter(reads)
    exhausted = False
    while True:
        while not exhausted and len(pending) < depth:
            extent = next(todo, None)
            if extent is None:
                exhausted = True
                break
            limiter.acquire(extent.length)
            store = free.pop() if free else bytearray(READ_CHUNK)
            if len(store) < extent.length:
                store = bytearray(extent.length)
            buf = nbd.Buffer.from_buffer(memoryview(store)[: extent.length])
            pending.append((extent, store, source.aio_pread(buf, extent.offset)))
        if not pending:
            return
        extent, store, cookie = pending.popleft()
        while not source.aio_command_completed(cookie):
            source.poll(-1)
        stats.read += extent.length
        data = memoryview(store)[: extent.length]
        if data == _zeros(extent.length):
            stats.zeroed += extent.length
            if incremental:
                target.zero(extent.length, extent.offset)
        else:
            target.pwrite(data, extent.offset)
            stats.written += extent.length
        free.append(store)
        if discard:
            part = discard_range(extent.offset, extent.length, size)
            if part is not None:
                source.trim(part[1], part[0])
                stats.discarded += part[1]
        progress.advance(extent.length)
        crash_point("backup-mid-read")


_ZEROS = bytes(READ_CHUNK)


def _zeros(length: int) -> memoryview:
    """``length`` zero bytes to compare with (a memcmp, no Python loop)."""
    return memoryview(_ZEROS)[:length] if length <= READ_CHUNK else memoryview(bytes(length))


def create_image(
    image: Path, size: int, backing: Path | None, backing_name: str | None = None
) -> None:
    """``qemu-img create`` an empty qcow2, with ``backing`` as a relative backing file.

    :param backing_name: the backing file name to record, relative to the image's
        directory; default: ``backing`` relative to ``image``'s parent.
    """
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        # Relative to the image's directory, so that the storage can be moved.
        relative = backing_name or os.path.relpath(backing, image.parent)
        cmd += ["-b", relative, "-F", "qcow2"]
    cmd += [str(image), str(size)]
    result = proc.run(cmd)
    if result.returncode != 0:
        raise ExternalToolError(f"qemu-img create {image} failed: {result.err}")


def _connect_source(nbd_path: str, devicename: str, context: str) -> Any:
    handle = nbd.NBD()
    handle.set_export_name(devicename)
    handle.add_meta_context(context)
    handle.connect_unix(nbd_path)
    if not handle.can_meta_context(context):
        raise NbdError(f"NBD export {devicename!r} at {nbd_path} does not offer {context}")
    return handle


def _start_target(image: Path) -> tuple[Any, proc.Child]:
    """Start qemu-nbd on ``image`` in a private directory and connect to it."""
    run_dir = proc.private_dir("pvb-nbd-")
    socket = run_dir / "nbd.sock"
    with open(run_dir / "qemu-nbd.log", "wb") as log:
        server = proc.spawn(
            ["qemu-nbd", "-f", "qcow2", "--discard=unmap", "--detect-zeroes=unmap",
             "-k", str(socket), str(image)],
            run_dir=run_dir, stdout=log, stderr=log,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + _NBD_START_TIMEOUT
        while True:
            if socket.exists():
                handle = nbd.NBD()
                try:
                    handle.connect_unix(str(socket))
                    return handle, server
                except nbd.Error:
                    if time.monotonic() > deadline:
                        raise
            if server.poll() is not None or time.monotonic() > deadline:
                why = (run_dir / "qemu-nbd.log").read_text(errors="replace").strip()
                raise ExternalToolError(f"qemu-nbd for {image} did not start: {why[-500:]}")
            time.sleep(0.01)
    except BaseException:
        server.stop(0)
        raise


def _stop_target(server: proc.Child | None) -> None:
    if server is None:
        return
    try:
        server.wait(_STOP_TIMEOUT)  # it exits by itself once we disconnected
    except subprocess.TimeoutExpired:
        pass
    server.stop()


def _disconnect(handle: Any) -> None:
    if handle is None:
        return
    try:
        handle.shutdown()
    except nbd.Error:
        pass  # already dead; the connection is gone either way


def backup_disk(
    *,
    nbd_path: str,
    devicename: str,
    image: Path,
    backing: Path | None,
    bitmap_name: str | None,
    bandwidth_limit: int | None,
    log_function: LogFunction,
    connect_source: Callable[[str, str, str], Any] = _connect_source,
    backing_name: str | None = None,
) -> CopyStats:
    """Back up the disk exported as ``devicename`` at ``nbd_path`` into ``image``.

    :param backing: the previous backup's image for an incremental backup (then
        ``bitmap_name`` must be given and only its dirty extents are read), or
        None for a full backup.
    :param connect_source: opens the source handle; tests pass a recording one.
    :param backing_name: the backing file name recorded in ``image`` (see
        :func:`create_image`); needed when ``image`` is a ``/proc/<pid>/fd`` path.
    :raises NbdError: an NBD connection or command failed.
    :raises ExternalToolError: qemu-img failed.
    """
    incremental = backing is not None
    if incremental and bitmap_name is None:
        raise ValueError("an incremental backup needs the bitmap name")
    context = ALLOCATION_CONTEXT
    if incremental and bitmap_name is not None:
        context = dirty_bitmap_context(bitmap_name)
    source = target = None
    server: proc.Child | None = None
    try:
        source = connect_source(nbd_path, devicename, context)
        size = source.get_size()
        stats = CopyStats(size=size)
        reads = plan_reads(query_extents(source, size, context), incremental=incremental)
        stats.planned = sum(extent.length for extent in reads)
        kind = "incremental (dirty extents)" if incremental else "full (allocated extents)"
        log_function(
            "info",
            f"{devicename}: {kind}, reading {stats.planned / MIB:.1f} MiB "
            f"of {size / MIB:.1f} MiB into {image.name}",
        )
        create_image(image, size, backing, backing_name)
        target, server = _start_target(image)
        progress = ProgressLog(log_function, devicename, stats.planned)
        copy_extents(
            source,
            target,
            reads,
            incremental=incremental,
            limiter=RateLimiter(bandwidth_limit),
            progress=progress,
            stats=stats,
            discard=bool(source.can_trim()),
        )
        target.flush()
        progress.finish()
    except nbd.Error as exc:
        raise NbdError(f"{devicename}: NBD error: {exc}") from exc
    finally:
        # Disconnect now, also on errors: a traceback would keep the handles alive,
        # and with them the connection to the export and our qemu-nbd.
        for handle in (target, source):
            _disconnect(handle)
        _stop_target(server)
    return stats
