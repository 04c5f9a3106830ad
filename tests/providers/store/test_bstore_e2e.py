"""backup-store end to end with real tools: qemu-nbd exports, nbdkit restores."""

from __future__ import annotations

from pathlib import Path

import pytest
from bstore_support import (
    BITMAP,
    CHUNK,
    FakeHost,
    KiB,
    MiB,
    compare,
    mixed_image,
    qemu_write,
    run,
    store_bytes,
    stored_task_log,
)

from pvebackup.api.types import BitmapMode

pytestmark = pytest.mark.e2e


def test_full_backup_restores_identically_and_sparse(host: FakeHost, tmp_path: Path) -> None:
    src = mixed_image(tmp_path / "src.qcow2")
    volname, size = host.backup(src, BitmapMode.NEW, expect_bitmap=True)
    assert volname.startswith("backup/vm-100-")
    assert size > 0
    out = tmp_path / "out.qcow2"
    host.restore(volname, out)
    assert compare(src, out).returncode == 0
    # The zero quarter stays unallocated in the restored image.
    mapping = run("qemu-img", "map", "--output=json", str(out))
    assert '"data": false' in mapping
    p = host.provider()
    assert p.extract_guest_config(volname, "store1") == host.conf.read_text()
    assert p.extract_firewall_config(volname, "store1") == host.fw.read_text()
    assert stored_task_log(p, volname) == "task log line\n"
    assert any("100%" in m for _, m in host.log.lines)


def test_unchanged_rerun_adds_almost_nothing(host: FakeHost, tmp_path: Path) -> None:
    src = mixed_image(tmp_path / "src.qcow2")
    host.backup(src)
    before = store_bytes(tmp_path / "store")
    _, task_size = host.backup(src)
    assert store_bytes(tmp_path / "store") == before
    assert task_size < 16 * KiB  # only the small config blobs


def test_discards_what_was_stored(host: FakeHost, tmp_path: Path) -> None:
    src = mixed_image(tmp_path / "src.qcow2")
    host.backup(src)
    export = tmp_path / "src-export-100.qcow2"
    empty = tmp_path / "empty.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(empty), str(4 * MiB))
    assert compare(export, empty).returncode == 0


def _incremental_setup(host: FakeHost, tmp_path: Path) -> tuple[Path, list[tuple[int, int]]]:
    src = mixed_image(tmp_path / "src.qcow2")
    run("qemu-img", "bitmap", "--add", str(src), BITMAP)
    host.backup(src, BitmapMode.NEW, expect_bitmap=True)
    # 4 KiB in the middle of chunks (partly dirty), one whole chunk, one in the zero area.
    writes = [(CHUNK * 3 + 20 * KiB, 4 * KiB), (CHUNK * 10, CHUNK), (MiB + CHUNK + 512, 4 * KiB)]
    for i, (off, n) in enumerate(writes):
        qemu_write(src, off, n, 0x40 + i)
    return src, writes


def test_incremental_reads_only_dirty_extents_and_restores(host: FakeHost, tmp_path: Path) -> None:
    src, writes = _incremental_setup(host, tmp_path)
    reads: list[tuple[int, int]] = []
    p = host.provider()
    from pvebackup.kit.nbdsource import NbdSource

    class Recording(NbdSource):
        def submit_read(self, buf: memoryview, offset: int) -> int:
            reads.append((offset, len(buf)))
            return super().submit_read(buf, offset)

    p.source_factory = Recording
    before = store_bytes(tmp_path / "store")
    volname, _ = host.backup(src, BitmapMode.REUSE, provider=p, expect_bitmap=True)
    grew = store_bytes(tmp_path / "store") - before
    dirty = run("qemu-img", "info", str(src))
    assert BITMAP in dirty
    granularity = 64 * KiB  # qemu's default bitmap granularity for 64 KiB clusters
    allowed = []
    for off, n in writes:
        start = off // granularity * granularity
        end = -(-(off + n) // granularity) * granularity
        allowed.append((start, end))
    assert reads, "nothing was read"
    for off, n in reads:
        assert any(s <= off and off + n <= e for s, e in allowed), (off, n, allowed)
    assert grew <= 4 * CHUNK + 16 * KiB
    out = tmp_path / "out.qcow2"
    host.restore(volname, out)
    assert compare(src, out).returncode == 0


def test_missing_base_gives_a_full_backup(host: FakeHost, tmp_path: Path) -> None:
    src = mixed_image(tmp_path / "src.qcow2")
    volname, _ = host.backup(src, BitmapMode.NEW, expect_bitmap=True)
    chain = host.mechanism()
    assert chain is not None
    assert chain.startswith("store-" + host.provider().store().config.store_id[:8] + "-")
    assert host.mechanism() == chain  # the same chain until something breaks it
    host.plugin.free_volume(host.scfg, host.storeid, volname)
    assert host.mechanism() is None
    assert any("is gone" in m for lv, m in host.log.lines if lv == "warn")
    # The full backup that follows makes incremental backups possible again.
    host.backup(src, BitmapMode.NONE, expect_bitmap=False)
    assert host.mechanism() is not None


def test_reuse_without_usable_base_fails_and_next_is_full(host: FakeHost, tmp_path: Path) -> None:
    src = mixed_image(tmp_path / "src.qcow2")
    run("qemu-img", "bitmap", "--add", str(src), BITMAP)
    host.backup(src, BitmapMode.NEW)
    run("qemu-img", "resize", "-q", str(src), str(8 * MiB))
    from pvebackup.api.errors import BaseUnusableError

    with pytest.raises(BaseUnusableError, match="next backup will be full"):
        host.backup(src, BitmapMode.REUSE)
    assert host.plugin.list_volumes(host.scfg, host.storeid)[-1].virtual_size == 4 * MiB
    assert host.mechanism() is None
    volname, _ = host.backup(src, BitmapMode.NONE, expect_bitmap=False)
    out = tmp_path / "out.qcow2"
    host.restore(volname, out)
    assert compare(src, out).returncode == 0


def test_list_and_remove(host: FakeHost, tmp_path: Path) -> None:
    src = mixed_image(tmp_path / "src.qcow2")
    v1, _ = host.backup(src)
    v2, _ = host.backup(src, vmid=101)
    vols = host.plugin.list_volumes(host.scfg, host.storeid)
    assert [v.volid for v in vols] == [f"store1:{v1}", f"store1:{v2}"]
    assert vols[0].virtual_size == 4 * MiB and vols[0].parent is None
    host.plugin.free_volume(host.scfg, host.storeid, v1)
    assert [v.vmid for v in host.plugin.list_volumes(host.scfg, host.storeid)] == [101]
