"""The partly dirty chunk: dirty bytes from the disk, the rest from the previous chunk.

QEMU's 64 KiB bitmap granule makes dirty extents cover whole 64 KiB chunks, so the
store tests never reach this path by accident: here dirty ranges start and end
inside chunks, directly (an in-memory source) and end to end with the default
chunk size (256 KiB, four granules).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from bstore_support import BITMAP, FakeHost, compare, mixed_image, qemu_write, run

from pvebackup.api.types import BitmapMode, GuestType
from pvebackup.kit.nbdfake import FakeNbdSource
from pvebackup.providers.store.disk import DiskBackup
from pvebackup.store.backends.memory import MemoryBackend
from pvebackup.store.datastore import Datastore
from pvebackup.store.snapshot import SnapshotId

CS = 64 * 1024
KiB = 1024


def _run(store: Datastore, source: FakeNbdSource, t: int, base: SnapshotId | None) -> SnapshotId:
    sid = SnapshotId(GuestType.QEMU, 100, t)
    writer = store.new_snapshot(sid, chunk_size=CS)
    job = DiskBackup(
        store, writer, "drive-scsi0", "unused", lambda level, msg: None,
        source_factory=lambda path, name, bitmap: source,
    )  # fmt: skip
    job.run(None if base is None else BITMAP, None if base is None else store.open_snapshot(base))
    writer.commit()
    return sid


def _image(store: Datastore, sid: SnapshotId) -> bytes:
    idx = store.open_snapshot(sid).open_index("drive-scsi0")
    return b"".join(store.read_chunk(idx.digest(i), idx.extent(i)[1]) for i in range(len(idx)))


def test_partly_dirty_chunks_take_clean_bytes_from_the_previous_chunk() -> None:
    rng = random.Random(7)
    old = bytearray(rng.randbytes(8 * CS))
    old[5 * CS : 6 * CS] = bytes(CS)  # a zero chunk, partly dirtied below
    store = Datastore.create(MemoryBackend(), chunk_size=CS)
    base = _run(store, FakeNbdSource(bytes(old)), 1000, None)
    # inside one chunk; across a chunk boundary; inside the zero chunk; the last bytes
    dirty = [(CS + 1000, 3000), (3 * CS - 500, 1000), (5 * CS + 7, 9), (8 * CS - 3, 3)]
    expected = bytearray(old)
    # The disk's bytes outside the dirty ranges are garbage: had they been read,
    # the restored image would show it.
    disk = bytearray(os.urandom(8 * CS))
    for off, n in dirty:
        expected[off : off + n] = disk[off : off + n]
    source = FakeNbdSource(bytes(disk), dirty=dirty)  # refuses reads outside them
    sid = _run(store, source, 2000, base)
    assert _image(store, sid) == bytes(expected)
    for off, n in source.reads:
        assert any(s <= off and off + n <= s + m for s, m in dirty), (off, n)
    assert _image(store, base) == bytes(old)


def test_partly_dirty_chunks_end_to_end_with_the_default_chunk_size(tmp_path: Path) -> None:
    host = FakeHost(tmp_path, {"type": "backup-store", "path": str(tmp_path / "store")})
    src = mixed_image(tmp_path / "src.qcow2")
    run("qemu-img", "bitmap", "--add", str(src), BITMAP)
    host.backup(src, BitmapMode.NEW, expect_bitmap=True)
    assert host.provider().store().chunk_size == 256 * KiB
    # 64 KiB granules inside 256 KiB chunks: each write dirties a part of a chunk
    for i, off in enumerate([256 * KiB + 70 * KiB, 3 * 256 * KiB + 190 * KiB, 1024 * KiB + 5]):
        qemu_write(src, off, 4 * KiB, 0x60 + i)
    volname, _ = host.backup(src, BitmapMode.REUSE, expect_bitmap=True)
    out = tmp_path / "out.qcow2"
    host.restore(volname, out)
    assert compare(src, out).returncode == 0
