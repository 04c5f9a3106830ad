"""A GC killed at any point leaves a consistent store, and the next run finishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pvebackup.api.types import GuestType
from pvebackup.store.backends.local import LocalBackend
from pvebackup.store.backends.memory import MemoryBackend
from pvebackup.store.datastore import Datastore
from pvebackup.store.gc import collect_garbage
from pvebackup.store.snapshot import SnapshotId

CS = 64 * 1024
_POOL = [bytes([i + 1]) * 100 + os.urandom(CS - 100) for i in range(30)]


class Killed(BaseException):
    """The GC process was killed (BaseException: nothing may catch it)."""


class KillingBackend(MemoryBackend):
    """Dies before its N-th put or delete."""

    def __init__(self) -> None:
        super().__init__()
        self.kill_at: int | None = None
        self.ops = 0

    def _op(self) -> None:
        if self.kill_at is not None:
            if self.ops == self.kill_at:
                raise Killed
            self.ops += 1

    def put(self, key: str, data: bytes, *, overwrite: bool, durable: bool = True) -> bool:
        self._op()
        return super().put(key, data, overwrite=overwrite, durable=durable)

    def delete(self, key: str) -> None:
        self._op()
        super().delete(key)


def _backup(store: Datastore, t: int, chunks: list[int]) -> SnapshotId:
    sid = SnapshotId(GuestType.QEMU, 100, t)
    with store.new_snapshot(sid, chunk_size=CS) as w:
        with w.index_writer("drive-scsi0", len(chunks) * CS) as iw:
            for i, c in enumerate(chunks):
                iw.set(i, store.insert_chunk(_POOL[c]).digest)
    store.close()
    return sid


def _consistent(store: Datastore, keep: dict[SnapshotId, list[int]]) -> None:
    packs = set(store.pack_names())
    for digest, loc in store.index_entries().items():
        assert loc.pack in packs
        store.read_chunk(digest)
    for sid, chunks in keep.items():
        idx = store.open_snapshot(sid).open_index("drive-scsi0")
        assert [store.read_chunk(idx.digest(i)) for i in range(len(idx))] == [
            _POOL[c] for c in chunks
        ]


def _prepared() -> tuple[KillingBackend, dict[SnapshotId, list[int]]]:
    backend = KillingBackend()
    Datastore.create(backend, chunk_size=CS, pack_size=1 << 20)
    a = _backup(Datastore.open(backend), 1000, list(range(20)))
    b = _backup(Datastore.open(backend), 1001, list(range(10, 25)))
    Datastore.open(backend).remove_snapshot(a)
    collect_garbage(Datastore.open(backend), margin=0.0)  # condemns a's chunks
    return backend, {b: list(range(10, 25))}


def test_gc_killed_before_each_write_or_delete() -> None:
    probe, _ = _prepared()
    probe.kill_at = 10**9
    collect_garbage(Datastore.open(probe), margin=0.0)
    total = probe.ops
    assert total >= 5  # repacks, compacts, deletes: worth killing at each
    for kill_at in range(total):
        backend, keep = _prepared()
        backend.kill_at = kill_at
        with pytest.raises(Killed):
            collect_garbage(Datastore.open(backend), margin=0.0)
        backend.kill_at = None
        _consistent(Datastore.open(backend), keep)
        for _ in range(2):
            collect_garbage(Datastore.open(backend), margin=0.0)
        store = Datastore.open(backend)
        _consistent(store, keep)
        needed = {store.codec.digest(_POOL[c]) for c in range(10, 25)}
        assert set(store.rebuild_index_from_packs()) == needed, f"killed at {kill_at}"


_GC = textwrap.dedent(
    """
    import sys
    from pvebackup.store.backends.local import LocalBackend
    from pvebackup.store.datastore import Datastore
    from pvebackup.store.gc import collect_garbage
    print("go", flush=True)
    collect_garbage(Datastore.open(LocalBackend(sys.argv[1])), margin=0.0)
    print("done", flush=True)
    """
)


@pytest.mark.e2e
def test_sigkill_of_a_gc_process_at_random_points(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    for attempt, delay in enumerate([0.0, 0.05, 0.1, 0.2, 0.3]):
        root = tmp_path / f"store{attempt}"
        Datastore.create(LocalBackend(root), chunk_size=CS, pack_size=1 << 20)
        a = _backup(Datastore.open(LocalBackend(root)), 1000, list(range(30)))
        b = _backup(Datastore.open(LocalBackend(root)), 1001, list(range(12, 20)))
        Datastore.open(LocalBackend(root)).remove_snapshot(a)
        collect_garbage(Datastore.open(LocalBackend(root)), margin=0.0)
        proc = subprocess.Popen(
            [sys.executable, "-c", _GC, str(root)], stdout=subprocess.PIPE, env=env
        )
        assert proc.stdout is not None and proc.stdout.readline() == b"go\n"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        keep = {b: list(range(12, 20))}
        _consistent(Datastore.open(LocalBackend(root)), keep)
        for _ in range(2):
            collect_garbage(Datastore.open(LocalBackend(root)), margin=0.0)
        store = Datastore.open(LocalBackend(root))
        _consistent(store, keep)
        assert set(store.rebuild_index_from_packs()) == {
            store.codec.digest(_POOL[c]) for c in range(12, 20)
        }
