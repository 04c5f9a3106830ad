"""Back up one VM disk from its NBD export into a snapshot of the chunk store.

Full (bitmap ``none``/``new``): every allocated extent is read, zero areas become
zero chunks without reading. Incremental (``reuse``): the previous snapshot's
index of the same disk is the starting point and only chunks touched by dirty
extents are rebuilt; a partly dirty chunk is completed from the previous chunk's
bytes in the store. The export is never read outside the dirty extents.
"""

from __future__ import annotations

from dataclasses import dataclass

from pvebackup.api.errors import BaseUnusableError, CorruptIndexError, ObjectNotFoundError
from pvebackup.api.types import LogFunction
from pvebackup.kit.crashpoint import crash_point
from pvebackup.kit.nbdsource import SourceFactory, connect
from pvebackup.kit.pacing import ProgressLog, TokenBucket
from pvebackup.providers.store.pipeline import ChunkResult, run_pipeline
from pvebackup.providers.store.plan import Range, full_jobs, incremental_jobs
from pvebackup.providers.store.progress import BackupStats, stats_detail
from pvebackup.store.blob import BytesLike
from pvebackup.store.datastore import Datastore
from pvebackup.store.formats import ZERO_DIGEST
from pvebackup.store.index import FixedIndex, FixedIndexWriter
from pvebackup.store.snapshot import Snapshot, SnapshotWriter

__all__ = ["DiskBackup", "StoreSink"]


class StoreSink:
    """The pipeline's :class:`~.pipeline.ChunkSink` over a :class:`Datastore`."""

    def __init__(self, store: Datastore) -> None:
        self._store = store

    def store_chunk(self, data: BytesLike) -> ChunkResult:
        r = self._store.insert_chunk(data)
        if r.digest == ZERO_DIGEST:
            return ChunkResult(r.digest, False, 0, zero=True)
        return ChunkResult(r.digest, r.is_new, r.stored_size if r.is_new else 0)

    def load_chunk(self, digest: bytes, size: int) -> bytes:
        return self._store.read_chunk(digest, size)


@dataclass
class DiskBackup:
    """Everything one ``backup_nbd`` call needs; :meth:`run` does it."""

    store: Datastore
    writer: SnapshotWriter
    devicename: str
    nbd_path: str
    log: LogFunction
    bandwidth_limit: int | None = None
    progress_interval: float = 5.0
    source_factory: SourceFactory = connect

    def _previous_index(self, base: Snapshot | None, size: int) -> FixedIndex:
        if base is None:
            raise BaseUnusableError(
                f"{self.devicename}: the dirty bitmap is reused but there is no previous "
                "backup to apply it to"
            )
        try:
            prev = base.open_fixed_index(self.devicename)
        except ObjectNotFoundError as exc:
            raise BaseUnusableError(
                f"{self.devicename}: the previous backup {base.id} has no such disk"
            ) from exc
        except CorruptIndexError as exc:
            raise BaseUnusableError(
                f"{self.devicename}: the index in the previous backup {base.id} is unusable: {exc}"
            ) from exc
        if prev.size != size:
            raise BaseUnusableError(
                f"{self.devicename}: the disk has {size} bytes, the previous backup "
                f"{base.id} {prev.size}"
            )
        if prev.chunk_size != self.writer.chunk_size:
            raise BaseUnusableError(
                f"{self.devicename}: the previous backup {base.id} uses chunks of "
                f"{prev.chunk_size} bytes, this one {self.writer.chunk_size}"
            )
        return prev

    def run(self, bitmap_name: str | None, base: Snapshot | None) -> BackupStats:
        """Back up the disk; ``bitmap_name`` given means incremental on ``base``.

        :raises BaseUnusableError: incremental, but ``base`` does not fit; nothing
            was read.
        :raises NbdError, BackendError, IntegrityError: the backup failed.
        """
        stats = BackupStats()
        source = self.source_factory(self.nbd_path, self.devicename, bitmap_name)
        try:
            size = source.size
            index: FixedIndexWriter
            if bitmap_name is not None:
                prev = self._previous_index(base, size)
                dirty: list[Range] = source.dirty_extents()
                stats.total = sum(n for _, n in dirty)
                index = self.writer.index_writer_from(self.devicename, prev)
                jobs = incremental_jobs(size, self.writer.chunk_size, dirty, prev.digest)
                self.log(
                    "info",
                    f"{self.devicename}: incremental on {prev.size} bytes from {base and base.id},"
                    f" {len(dirty)} dirty extents",
                )
            else:
                data: list[Range] = source.data_extents()
                stats.total = size
                index = self.writer.index_writer(self.devicename, size)
                jobs = full_jobs(size, self.writer.chunk_size, data)
            progress = ProgressLog(
                self.log,
                self.devicename,
                stats.total,
                interval=self.progress_interval,
                detail=stats_detail(stats),
            )
            with index:
                run_pipeline(
                    source,
                    StoreSink(self.store),
                    jobs,
                    index.set,
                    stats,
                    limiter=TokenBucket(self.bandwidth_limit),
                    tick=lambda: progress.update(stats.done),
                    zero_digest=ZERO_DIGEST,
                )
                crash_point("backup-after-chunks")
            crash_point("backup-after-index")
            progress.update(stats.done)
            progress.finish()
            return stats
        finally:
            source.close()
