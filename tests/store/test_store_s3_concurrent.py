"""Two writer processes backing up into one bucket while GC runs there lose nothing
(the format-2 protocol on a real RGW: no rename, no atime, conditional PUTs)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pvebackup.api.types import GuestType
from pvebackup.store.backends import make_backend
from pvebackup.store.backends.s3 import S3Config
from pvebackup.store.datastore import Datastore
from pvebackup.store.gc import collect_garbage
from pvebackup.store.snapshot import SnapshotId
from s3fixture import S3Server

pytestmark = [pytest.mark.s3, pytest.mark.e2e]

CS = 64 * 1024
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}

_WRITER = textwrap.dedent(
    """
    import random, sys
    from pvebackup.api.types import GuestType
    from pvebackup.store.backends import make_backend
    from pvebackup.store.datastore import Datastore
    from pvebackup.store.snapshot import SnapshotId
    CS = 64 * 1024
    loc, vmid, t = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    chunks = [int(c) for c in sys.argv[4].split(",")]
    store = Datastore.open(make_backend("s3", loc))
    w = store.new_snapshot(SnapshotId(GuestType.QEMU, vmid, t), chunk_size=CS)
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


def _store(loc: str) -> Datastore:
    return Datastore.open(make_backend("s3", loc))


def _backup(loc: str, vmid: int, t: int, chunks: list[int]) -> SnapshotId:
    store = _store(loc)
    sid = SnapshotId(GuestType.QEMU, vmid, t)
    with store.new_snapshot(sid, chunk_size=CS) as w:
        with w.index_writer("drive-scsi0", len(chunks) * CS) as iw:
            for i, c in enumerate(chunks):
                iw.set(i, store.insert_chunk(_data(c)).digest)
    store.close()
    return sid


def _restores_identical(loc: str, sid: SnapshotId, chunks: list[int]) -> None:
    store = _store(loc)
    idx = store.open_snapshot(sid).open_index("drive-scsi0")
    got = [store.read_chunk(idx.digest(i), CS) for i in range(len(idx))]
    assert got == [_data(c) for c in chunks]
    store.close()


def _start_writer(loc: str, vmid: int, t: int, chunks: list[int]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, loc, str(vmid), str(t), ",".join(map(str, chunks))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=ENV,
    )  # fmt: skip
    return proc


def _wait_inserted(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None and proc.stdout.readline() == b"inserted\n"


def _finish(proc: subprocess.Popen[bytes]) -> None:
    out, _ = proc.communicate(b"\n", timeout=120)
    assert proc.returncode == 0 and out == b"committed\n"


def _gc(loc: str) -> int:
    store = _store(loc)
    try:
        return collect_garbage(store, margin=0.0).chunks_removed
    finally:
        store.close()


def test_two_writers_beside_gc_on_one_bucket(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    cred = tmp_path / "s3.cred"
    cred.write_text(f"access-key = {s3_server.access_key}\nsecret-key = {s3_server.secret_key}\n")
    cred.chmod(0o600)
    loc = S3Config(s3_server.endpoint, s3_bucket, prefix="shared", credentials_file=str(cred),
                   max_requests=4).location()  # fmt: skip
    Datastore.create(make_backend("s3", loc), chunk_size=CS, pack_size=1 << 20).close()
    a = _backup(loc, 100, 1000, list(range(12)))
    _backup(loc, 100, 1001, list(range(8, 16)))
    _store(loc).remove_snapshot(a)
    # Writer 1 starts before GC's first phase and deduplicates against a's chunks;
    # writer 2 starts between the phases, after they were condemned.
    w1 = [0, 1, 2, 3, 40, 41, 9]
    w2 = [4, 5, 6, 42, 43, 10, 0]
    p1 = _start_writer(loc, 201, 2000, w1)
    _wait_inserted(p1)
    _gc(loc)  # condemns a's chunks; writer 1's session keeps them
    p2 = _start_writer(loc, 202, 2001, w2)
    _wait_inserted(p2)
    assert _gc(loc) == 0  # writer 1 still runs: nothing it may use goes
    _finish(p1)
    _finish(p2)
    s1, s2 = SnapshotId(GuestType.QEMU, 201, 2000), SnapshotId(GuestType.QEMU, 202, 2001)
    _restores_identical(loc, s1, w1)
    _restores_identical(loc, s2, w2)
    for _ in range(3):
        _gc(loc)
    _restores_identical(loc, s1, w1)
    _restores_identical(loc, s2, w2)
    store = _store(loc)
    # Nothing live is lost (a pack may keep a dead chunk beside live ones).
    assert set(store.rebuild_index_from_packs()) >= {
        store.codec.digest(_data(c)) for c in {*w1, *w2, *range(8, 16)}
    }
    store.close()
