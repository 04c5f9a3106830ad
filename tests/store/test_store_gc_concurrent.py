"""A backup in another process, running while GC runs, restores identical."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pvebackup.api.types import GuestType
from pvebackup.store.backends.local import LocalBackend
from pvebackup.store.datastore import Datastore
from pvebackup.store.gc import collect_garbage
from pvebackup.store.snapshot import SnapshotId

CS = 64 * 1024
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}

_WRITER = textwrap.dedent(
    """
    import random, sys
    from pvebackup.api.types import GuestType
    from pvebackup.store.backends.local import LocalBackend
    from pvebackup.store.datastore import Datastore
    from pvebackup.store.snapshot import SnapshotId
    CS = 64 * 1024
    root, t, chunks = sys.argv[1], int(sys.argv[2]), [int(c) for c in sys.argv[3].split(",")]
    store = Datastore.open(LocalBackend(root))
    w = store.new_snapshot(SnapshotId(GuestType.QEMU, 200, t), chunk_size=CS)
    with w.index_writer("drive-scsi0", len(chunks) * CS) as iw:
        for i, c in enumerate(chunks):
            iw.set(i, store.insert_chunk(random.Random(c).randbytes(CS)).digest)
    print("inserted", flush=True)
    sys.stdin.readline()  # the test runs GC now
    w.commit()
    store.close()
    print("committed", flush=True)
    """
)


def _data(c: int) -> bytes:
    return random.Random(c).randbytes(CS)


def _backup(root: Path, t: int, chunks: list[int]) -> SnapshotId:
    store = Datastore.open(LocalBackend(root))
    sid = SnapshotId(GuestType.QEMU, 100, t)
    with store.new_snapshot(sid, chunk_size=CS) as w:
        with w.index_writer("drive-scsi0", len(chunks) * CS) as iw:
            for i, c in enumerate(chunks):
                iw.set(i, store.insert_chunk(_data(c)).digest)
    store.close()
    return sid


def _restores_identical(root: Path, sid: SnapshotId, chunks: list[int]) -> None:
    store = Datastore.open(LocalBackend(root))
    idx = store.open_snapshot(sid).open_index("drive-scsi0")
    assert [store.read_chunk(idx.digest(i), CS) for i in range(len(idx))] == [
        _data(c) for c in chunks
    ]


def _start_writer(root: Path, t: int, chunks: list[int]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(root), str(t), ",".join(map(str, chunks))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=ENV,
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"inserted\n"
    return proc


def _finish(proc: subprocess.Popen[bytes]) -> None:
    out, _ = proc.communicate(b"\n", timeout=60)
    assert proc.returncode == 0 and out == b"committed\n"


def _gc(root: Path) -> int:
    return collect_garbage(Datastore.open(LocalBackend(root)), margin=0.0).chunks_removed


@pytest.mark.e2e
@pytest.mark.parametrize("started", ["between the phases", "before the first phase"])
def test_backup_in_another_process_beside_gc(tmp_path: Path, started: str) -> None:
    root = tmp_path / "store"
    Datastore.create(LocalBackend(root), chunk_size=CS, pack_size=1 << 20)
    a = _backup(root, 1000, list(range(12)))
    _backup(root, 1001, list(range(8, 16)))
    Datastore.open(LocalBackend(root)).remove_snapshot(a)
    wanted = [0, 1, 2, 3, 40, 41, 9]  # a's (condemned) chunks, new ones, a live one
    if started == "before the first phase":
        proc = _start_writer(root, 2000, wanted)  # deduplicates against a's chunks
        _gc(root)  # condemns them
        assert _gc(root) == 0  # the writer runs: nothing may go
    else:
        _gc(root)  # condemns a's chunks 0..7
        proc = _start_writer(root, 2000, wanted)  # knows: writes new copies
        assert _gc(root) == 8  # a's old copies go while the writer runs
    _finish(proc)
    sid = SnapshotId(GuestType.QEMU, 200, 2000)
    _restores_identical(root, sid, wanted)
    for _ in range(2):
        _gc(root)
    _restores_identical(root, sid, wanted)
    store = Datastore.open(LocalBackend(root))
    assert set(store.rebuild_index_from_packs()) == {
        store.codec.digest(_data(c)) for c in [*wanted, *range(8, 16)]
    }
