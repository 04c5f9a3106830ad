"""Container archives in the chunk store (first step of part 2).

Backup: the container's directory becomes one plain PAX tar stream
(:func:`pvebackup.kit.paxtar.write_pax_stream`, the same writer as
``backup-dir``'s), cut into chunks of the snapshot's chunk size and stored like a
disk's: device ``root.tar`` of the snapshot, a fixed index over the stream.

Why fixed-size chunks and not content-defined chunking (yet): it reuses the
fixed index, GC, verify and every reader unchanged. The price is dedup: an
insertion early in the stream shifts every later chunk, so an unchanged re-run
dedups fully but a changed file dedups only the chunks before it. CDC with a
dynamic index is the next step (issue 11); the device name and the restore
path stay.

Restore: :class:`TarFeeder` makes a FIFO in a private temporary directory and
writes the stream into it from a thread, chunk by verified chunk, so nothing
large lands on disk. The stream is uncompressed tar.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from pvebackup.api.errors import CorruptChunkError, PveBackupError
from pvebackup.api.types import LogFunction
from pvebackup.kit.fswalk import WalkStats
from pvebackup.kit.paxtar import write_pax_stream
from pvebackup.store.datastore import Datastore
from pvebackup.store.formats import DIGEST_SIZE, ZERO_DIGEST
from pvebackup.store.snapshot import Snapshot, SnapshotWriter

__all__ = ["ARCHIVE_DEVICE", "ArchiveStats", "TarFeeder", "backup_archive"]

ARCHIVE_DEVICE = "root.tar"


@dataclass
class ArchiveStats:
    """What one archive cost: stream bytes, new chunk bytes, stored blob bytes."""

    walk: WalkStats
    size: int = 0
    new: int = 0
    stored: int = 0
    reused: int = 0


class _ChunkSink:
    """A write-only file object that stores every ``chunk_size`` bytes as a chunk."""

    def __init__(self, store: Datastore, chunk_size: int, stats: ArchiveStats) -> None:
        self._store = store
        self._chunk_size = chunk_size
        self._buf = bytearray()
        self._stats = stats
        self.digests = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._buf += data
        while len(self._buf) >= self._chunk_size:
            self._store_chunk(bytes(self._buf[: self._chunk_size]))
            del self._buf[: self._chunk_size]
        return len(data)

    def _store_chunk(self, chunk: bytes) -> None:
        r = self._store.insert_chunk(chunk)
        self.digests += r.digest
        self._stats.size += len(chunk)
        if r.is_new:
            self._stats.new += len(chunk)
            self._stats.stored += r.stored_size
        else:
            self._stats.reused += len(chunk)

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        if self._buf:
            self._store_chunk(bytes(self._buf))
            self._buf.clear()


def backup_archive(
    store: Datastore,
    writer: SnapshotWriter,
    directory: str,
    sources: Sequence[str],
    id_map: Sequence[Sequence[str]],
    exclude_paths: Sequence[str],
    bandwidth_limit: int | None,
    log: LogFunction,
) -> ArchiveStats:
    """Store ``directory``'s ``sources`` as device :data:`ARCHIVE_DEVICE` of ``writer``.

    :raises OSError: reading the source failed.
    """
    stats = ArchiveStats(WalkStats())
    sink = _ChunkSink(store, writer.chunk_size, stats)
    stats.walk = write_pax_stream(
        cast(BinaryIO, sink), directory, sources, id_map, exclude_paths, bandwidth_limit, log
    )
    sink.finish()
    with writer.index_writer(ARCHIVE_DEVICE, stats.size) as index:
        for i in range(len(index)):
            index.set(i, bytes(sink.digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]))
    return stats


class TarFeeder:
    """Serves a snapshot's archive stream through a FIFO in a private directory."""

    def __init__(self, store: Datastore, snap: Snapshot) -> None:
        # Opened before the FIFO exists: a damaged or missing index fails here, clearly.
        self._index = snap.open_index(ARCHIVE_DEVICE)
        self._store = store
        self._label = f"{snap.id} {ARCHIVE_DEVICE}"
        self.failures: list[str] = []
        self._dir = Path(tempfile.mkdtemp(prefix="pvebackup-ct-"))  # mode 0700
        self.path = self._dir / "archive.tar"
        os.mkfifo(self.path, 0o600)
        self._thread = threading.Thread(target=self._feed, name="tar-feeder", daemon=True)
        self._thread.start()

    def _feed(self) -> None:
        i = 0
        try:
            with open(self.path, "wb") as out:
                for i in range(len(self._index)):
                    _, length = self._index.extent(i)
                    digest = self._index.digest(i)
                    if digest == ZERO_DIGEST:
                        out.write(bytes(length))
                    else:
                        # read_chunk verifies the digest (and size): hostile storage.
                        out.write(self._store.read_chunk(digest, length))
        except BrokenPipeError:
            self.failures.append(f"{self._label}: the reader stopped early")
        except (OSError, PveBackupError) as exc:
            self.failures.append(f"{self._label} chunk {i}: {exc}")

    def close(self) -> None:
        """Stop feeding (unblocking a writer nobody reads) and remove the directory.

        :raises CorruptChunkError: a chunk could not be read or verified.
        """
        if self._thread.is_alive():
            # A reader that never came (or left): open and close our own read end so
            # the writer's open returns and its next write fails with EPIPE.
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
                os.close(fd)
            except OSError:
                pass
            self._thread.join(timeout=30)
        shutil.rmtree(self._dir, ignore_errors=True)
        corrupt = [f for f in self.failures if "stopped early" not in f]
        if corrupt:
            raise CorruptChunkError("; ".join(corrupt))
