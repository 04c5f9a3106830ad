"""Refreshing the chunk index reads several index objects at once (S3 round trips)."""

from __future__ import annotations

import threading
import time

from pvebackup.store.backends.memory import MemoryBackend
from pvebackup.store.chunkindex import INDEX_PREFIX
from pvebackup.store.datastore import Datastore


class SlowIndexReads(MemoryBackend):
    """Every index object GET takes 50 ms; records the most in flight at once."""

    def __init__(self) -> None:
        super().__init__()
        self.slow = False
        self.most = 0
        self._now = 0
        self._count_lock = threading.Lock()

    def get(self, key: str) -> bytes:
        if not (self.slow and key.startswith(INDEX_PREFIX)):
            return super().get(key)
        with self._count_lock:
            self._now += 1
            self.most = max(self.most, self._now)
        try:
            time.sleep(0.05)
            return super().get(key)
        finally:
            with self._count_lock:
                self._now -= 1


def test_index_objects_are_read_concurrently_and_all_ingested() -> None:
    backend = SlowIndexReads()
    writer = Datastore.create(backend, chunk_size=64 * 1024)
    digests = []
    for n in range(24):  # writer sessions, each closed: an index object each
        digests.append(writer.insert_chunk((n + 1).to_bytes(4, "big") * 1000).digest)
        writer.close()
    objects = sum(1 for _ in backend.list(INDEX_PREFIX))
    assert objects == 24
    backend.slow = True
    reader = Datastore.open(backend)
    started = time.monotonic()
    assert reader.refresh_index() == objects
    # One at a time this took objects x 50 ms; several at once far less.
    assert backend.most >= 4
    assert time.monotonic() - started < objects * 0.05
    assert all(reader.locate_chunk(d) is not None for d in digests)
