"""Back up one VM disk from an NBD export into a qcow2 image.

The steps, in the order :func:`backup_disk` runs them:

1. Connect to the export (:mod:`pvebackup.kit.nbdsource`, the one NBD source of
   all providers), asking for the meta context that says what to read:
   ``qemu:dirty-bitmap:<name>`` for an incremental backup (bitmap mode ``reuse``),
   else ``base:allocation`` (a full backup skips holes and zeroes).
2. Ask block status for the whole disk and cut the extents into reads
   (:func:`plan_reads`, a pure function). An incremental backup reads *only* dirty
   extents: the export refuses reads anywhere else.
3. ``qemu-img create`` the qcow2: empty for a full backup, with the previous
   backup's image of this disk as its backing file for an incremental one.
4. Write into the image through ``qemu-nbd`` on a socket in a private 0700
   directory, started through :mod:`pvebackup.kit.proc` so that it dies with us
   (libnbd's socket activation forks it where we cannot set that up, and leaves
   its socket directory in /tmp when we are killed). Reads run in order with a
   few requests in flight (:func:`~pvebackup.kit.nbdsource.read_in_order`);
   every chunk is written, then discarded on the export (joined with its
   neighbours) so that the host can free its fleecing copy.

Zero areas stay unallocated: a full backup does not write them at all (a new
qcow2 reads as zeroes), an incremental one writes them as NBD "write zeroes",
which qcow2 stores as zero clusters without data (the backing file may hold data
there that must read as zero now).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbd

from pvebackup.api.errors import ExternalToolError, NbdError
from pvebackup.api.types import LogFunction
from pvebackup.kit import proc, qemuimg
from pvebackup.kit.crashpoint import crash_point
from pvebackup.kit.nbdsource import (
    READS_IN_FLIGHT,
    BlockSource,
    BufferPool,
    Range,
    SourceFactory,
    Trimmer,
    connect,
    read_in_order,
)
from pvebackup.kit.pacing import MIB, ProgressLog, TokenBucket
from pvebackup.kit.units import format_bytes

__all__ = ["CopyStats", "Extent", "backup_disk", "copy_extents", "plan_reads"]

READ_CHUNK = 4 * MIB
"""Largest single read; with READS_IN_FLIGHT this bounds memory to 16 MiB."""
_NBD_START_TIMEOUT = 15.0
_STOP_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Extent:
    """A byte range of the disk: ``length`` bytes from ``offset``, read as one piece."""

    offset: int
    length: int

    @property
    def reads(self) -> tuple[Range, ...]:
        """What :func:`pvebackup.kit.nbdsource.read_in_order` reads: all of it."""
        return ((self.offset, self.length),)


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


def plan_reads(ranges: Iterable[Range], *, chunk: int = READ_CHUNK) -> list[Extent]:
    """Cut the extents to read (merged, sorted) into reads of at most ``chunk`` bytes.

    :param ranges: what block status says to read (``data_extents`` for a full
        backup, ``dirty_extents`` for an incremental one).
    :returns: reads in disk order; every read lies inside one of ``ranges``.
    """
    reads = []
    for offset, length in ranges:
        for start in range(offset, offset + length, chunk):
            reads.append(Extent(start, min(chunk, offset + length - start)))
    return reads


def copy_extents(
    source: BlockSource,
    target: Any,
    reads: Iterable[Extent],
    *,
    incremental: bool,
    limiter: TokenBucket,
    progress: ProgressLog,
    stats: CopyStats,
    depth: int = READS_IN_FLIGHT,
) -> None:
    """Copy ``reads`` from ``source`` to the ``target`` libnbd handle, in order.

    Up to ``depth`` reads are in flight; each finished read is written (or
    skipped / zeroed when all zero) and then discarded on the source (joined with
    its neighbours; nothing when the export cannot trim). ``limiter`` is paid
    before every read.
    """
    pool = BufferPool()
    trimmer = Trimmer(source)
    for extent, buf, data in read_in_order(
        source, reads, pool, depth=depth, pace=limiter.consume
    ):
        stats.read += extent.length
        if data == _zeros(extent.length):
            stats.zeroed += extent.length
            if incremental:
                target.zero(extent.length, extent.offset)
        else:
            target.pwrite(data, extent.offset)
            stats.written += extent.length
        pool.give(buf)
        trimmer.add(extent.reads)
        progress.advance(extent.length)
        crash_point("backup-mid-read")
    trimmer.flush()
    stats.discarded = trimmer.discarded


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
    relative = None
    if backing is not None:
        # Relative to the image's directory, so that the storage can be moved.
        relative = backing_name or os.path.relpath(backing, image.parent)
    qemuimg.create(image, size, fmt="qcow2", backing=relative, backing_fmt="qcow2")


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
    connect_source: SourceFactory = connect,
    backing_name: str | None = None,
) -> CopyStats:
    """Back up the disk exported as ``devicename`` at ``nbd_path`` into ``image``.

    :param backing: the previous backup's image for an incremental backup (then
        ``bitmap_name`` must be given and only its dirty extents are read), or
        None for a full backup.
    :param connect_source: opens the source; tests pass a fake or a recording one.
    :param backing_name: the backing file name recorded in ``image`` (see
        :func:`create_image`); needed when ``image`` is a ``/proc/<pid>/fd`` path.
    :raises NbdError: an NBD connection or command failed.
    :raises ExternalToolError: qemu-img failed.
    """
    incremental = backing is not None
    if incremental and bitmap_name is None:
        raise ValueError("an incremental backup needs the bitmap name")
    source: BlockSource | None = None
    target = None
    server: proc.Child | None = None
    try:
        source = connect_source(nbd_path, devicename, bitmap_name if incremental else None)
        size = source.size
        stats = CopyStats(size=size)
        ranges = source.dirty_extents() if incremental else source.data_extents()
        reads = plan_reads(ranges)
        stats.planned = sum(extent.length for extent in reads)
        kind = "incremental (dirty extents)" if incremental else "full (allocated extents)"
        log_function(
            "info",
            f"{devicename}: {kind}, reading {format_bytes(stats.planned)} "
            f"of {format_bytes(size)} into {image.name}",
        )
        create_image(image, size, backing, backing_name)
        target, server = _start_target(image)
        progress = ProgressLog(log_function, devicename, stats.planned)
        copy_extents(
            source,
            target,
            reads,
            incremental=incremental,
            limiter=TokenBucket(bandwidth_limit),
            progress=progress,
            stats=stats,
        )
        target.flush()
        progress.finish()
    except nbd.Error as exc:
        raise NbdError(f"{devicename}: NBD error: {exc}") from exc
    finally:
        # Disconnect now, also on errors: a traceback would keep the handles alive,
        # and with them the connection to the export and our qemu-nbd.
        _disconnect(target)
        if source is not None:
            source.close()
        _stop_target(server)
    return stats
