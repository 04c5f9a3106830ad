"""VM disks: NBD export -> qcow2 chain, read planning, discards, restore paths."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bdir_helpers import STOREID, LogRecords, NbdExports, qemu_io, run

from pvebackup.api.errors import BaseUnusableError, IntegrityError, NbdError, VolumeNotFoundError
from pvebackup.api.types import BackupMechanism, BitmapMode, GuestType, RestoreMechanism
from pvebackup.kit.nbdfake import FakeNbdSource
from pvebackup.kit.nbdsource import NbdSource, merge_ranges
from pvebackup.kit.pacing import MIB
from pvebackup.providers.directory import vm
from pvebackup.providers.directory.provider import BackupDirProvider
from pvebackup.providers.directory.volumes import VolumeLayout, VolumeName

DEVICE = "drive-scsi0"
BITMAP = "bm0"


# -- read planning (pure) ------------------------------------------------------------


def test_plan_splits_long_extents_in_disk_order() -> None:
    ranges = [(0, 3 * MIB), (5 * MIB, 1 * MIB)]
    assert vm.plan_reads(ranges, chunk=2 * MIB) == [
        vm.Extent(0, 2 * MIB),
        vm.Extent(2 * MIB, 1 * MIB),
        vm.Extent(5 * MIB, 1 * MIB),
    ]


def test_plan_reads_stay_inside_the_extents() -> None:
    ranges = [(65536, 131072), (262144, 65536)]
    reads = vm.plan_reads(ranges, chunk=100_000)
    assert sum(r.length for r in reads) == 131072 + 65536
    for read in reads:
        assert any(off <= read.offset and read.offset + read.length <= off + n for off, n in ranges)


# -- end to end with qemu-nbd --------------------------------------------------------


def make_disk(tmp_path: Path, size: str = "32M") -> Path:
    disk = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(disk), size)
    qemu_io(disk, "write -P 0x11 0 3M", "write -P 0x22 8M 1M", "write -z 12M 2M")
    return disk


def full_backup(
    provider: BackupDirProvider, nbd_exports: NbdExports, disk: Path, vmid: int = 100
) -> str:
    """A first backup: the provider starts a chain, the host creates the bitmap (new)."""
    provider.job_start(int(time.time()))
    provider.backup_start(vmid, GuestType.QEMU)
    mechanism, bitmap_id = provider.backup_get_mechanism(vmid, GuestType.QEMU)
    assert mechanism == BackupMechanism.NBD
    volname = provider.backup_get_target(vmid, GuestType.QEMU)
    mode = BitmapMode.NONE
    if provider.use_bitmap:
        assert bitmap_id is not None  # a fresh chain
        assert bitmap_id.startswith("backup-dir-" + VolumeName.parse(volname).stamp + "-")
        mode = BitmapMode.NEW
    sock = nbd_exports.start(disk)
    provider.backup_nbd(vmid, DEVICE, sock, mode, BITMAP if bitmap_id else None, None)
    provider.backup_end(vmid)
    nbd_exports.stop_all()
    return volname


def image_map(image: Path) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = json.loads(run("qemu-img", "map", "--output=json", str(image)))
    return result


@pytest.mark.e2e
def test_full_backup_restores_identically_and_keeps_zeroes_unallocated(
    tmp_path: Path, provider: BackupDirProvider, nbd_exports: NbdExports, logs: LogRecords
) -> None:
    disk = make_disk(tmp_path)
    volname = full_backup(provider, nbd_exports, disk)
    assert volname.startswith("backup/vm-100-")

    assert provider.restore_get_mechanism(volname, STOREID) == (
        RestoreMechanism.QEMU_IMG,
        GuestType.QEMU,
    )
    assert provider.restore_qemu_get_device_info(volname, STOREID) == {DEVICE: {"size": 32 * MIB}}
    source = provider.restore_qemu_img_init(volname, STOREID, DEVICE)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(disk), source)
    provider.restore_qemu_img_cleanup(volname, STOREID, DEVICE)

    # Only the 4 MiB of data are allocated in the backup image.
    path = provider.layout.volume_path(volname) / f"{DEVICE}.qcow2"
    data = sum(e["length"] for e in image_map(path) if e["data"])
    assert data == 4 * MIB
    assert Path(path).stat().st_size < 5 * MIB
    assert any("100%" in msg for level, msg in logs if level == "info")


@pytest.mark.e2e
def test_incremental_backup_writes_only_changes_and_restores_the_chain(
    tmp_path: Path,
    make_provider: Callable[..., BackupDirProvider],
    nbd_exports: NbdExports,
) -> None:
    disk = make_disk(tmp_path)
    first = full_backup(make_provider(), nbd_exports, disk)
    # The bitmap starts at the full backup; then the "guest" writes.
    run("qemu-img", "bitmap", "--add", str(disk), BITMAP)
    qemu_io(disk, "write -P 0x33 1M 512K", "write -z 8M 256K", "write -P 0x44 20M 64K")

    chain_id = VolumeLayout(make_provider().layout.root).read_index(first).bitmap_id
    assert chain_id is not None
    provider = make_provider()
    provider.backup_start(100, GuestType.QEMU)
    mechanism, bitmap_id = provider.backup_get_mechanism(100, GuestType.QEMU)
    assert (mechanism, bitmap_id) == (BackupMechanism.NBD, chain_id)
    second = provider.backup_get_target(100, GuestType.QEMU)
    sock = nbd_exports.start(disk, bitmap=BITMAP)
    provider.backup_nbd(100, DEVICE, sock, BitmapMode.REUSE, BITMAP, None)
    provider.backup_end(100)
    nbd_exports.stop_all()

    source = provider.restore_qemu_img_init(second, STOREID, DEVICE)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(disk), source)
    provider.restore_qemu_img_cleanup(second, STOREID, DEVICE)
    path = provider.layout.volume_path(second) / f"{DEVICE}.qcow2"
    info = json.loads(run("qemu-img", "info", "--output=json", str(path)))
    assert info["backing-filename"] == f"../{first.removeprefix('backup/')}/{DEVICE}.qcow2"
    assert path.stat().st_size < 2 * MIB  # ~832 KiB changed, not 4 MiB
    layout = VolumeLayout(provider.layout.root)
    assert layout.read_index(second).parent == first
    assert layout.read_index(second).bitmap_id == chain_id
    assert provider.backup_get_task_size(100) < 2 * MIB


class RecordingSource(NbdSource):
    """The real source, recording reads and trims."""

    def __init__(self, path: str, name: str, bitmap: str | None) -> None:
        super().__init__(path, name, bitmap)
        self.reads: list[tuple[int, int]] = []
        self.trims: list[tuple[int, int]] = []

    def submit_read(self, buf: memoryview, offset: int) -> int:
        self.reads.append((offset, len(buf)))
        return super().submit_read(buf, offset)

    def trim(self, offset: int, length: int) -> None:
        if self.can_trim:
            self.trims.append((offset, length))
        super().trim(offset, length)


@pytest.mark.e2e
def test_incremental_never_reads_outside_dirty_extents(
    tmp_path: Path, nbd_exports: NbdExports, logs: LogRecords
) -> None:
    disk = make_disk(tmp_path)
    run("qemu-img", "bitmap", "--add", "-g", "64K", str(disk), BITMAP)
    qemu_io(disk, "write -P 0x55 2M 64K", "write -P 0x66 16M 128K")
    dirty = [(2 * MIB, 65536), (16 * MIB, 131072)]
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "32M")
    recorded: list[RecordingSource] = []

    def connect(path: str, name: str, bitmap: str | None) -> RecordingSource:
        recorded.append(RecordingSource(path, name, bitmap))
        return recorded[-1]

    sock = nbd_exports.start(disk, bitmap=BITMAP)
    (tmp_path / "vol").mkdir()
    stats = vm.backup_disk(
        nbd_path=sock,
        devicename=DEVICE,
        image=tmp_path / "vol" / "out.qcow2",
        backing=base,
        bitmap_name=BITMAP,
        bandwidth_limit=None,
        log_function=lambda level, msg: logs.append((level, msg)),
        connect_source=connect,
    )
    reads = recorded[0].reads
    assert sorted(reads) == dirty
    assert stats.read == stats.written == 3 * 65536
    assert recorded[0].trims == []  # read-only export: nothing to discard


@pytest.mark.e2e
def test_discards_every_extent_after_writing_it(
    tmp_path: Path, nbd_exports: NbdExports, logs: LogRecords
) -> None:
    disk = make_disk(tmp_path)
    fleece_like = tmp_path / "copy.qcow2"
    run("cp", "--sparse=always", str(disk), str(fleece_like))
    recorded: list[RecordingSource] = []

    def connect(path: str, name: str, bitmap: str | None) -> RecordingSource:
        recorded.append(RecordingSource(path, name, bitmap))
        return recorded[-1]

    sock = nbd_exports.start(fleece_like, writable=True)
    (tmp_path / "vol").mkdir()
    out = tmp_path / "vol" / "out.qcow2"
    stats = vm.backup_disk(
        nbd_path=sock,
        devicename=DEVICE,
        image=out,
        backing=None,
        bitmap_name=None,
        bandwidth_limit=None,
        log_function=lambda level, msg: logs.append((level, msg)),
        connect_source=connect,
    )
    nbd_exports.stop_all()
    # joined discards cover exactly what was read (all of it 64 KiB-aligned here)
    assert merge_ranges(recorded[0].trims) == merge_ranges(recorded[0].reads)
    assert stats.discarded == stats.read == 4 * MIB
    # The discarded export image no longer holds the data; the backup does.
    assert not any(e["data"] for e in image_map(fleece_like))
    run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(disk), str(out))


@pytest.mark.e2e
def test_missing_base_image_means_full_backup(
    tmp_path: Path, make_provider: Callable[..., BackupDirProvider], nbd_exports: NbdExports
) -> None:
    disk = make_disk(tmp_path)
    first = full_backup(make_provider(), nbd_exports, disk)
    provider = make_provider()
    provider.backup_start(100, GuestType.QEMU)
    chain_id = provider.backup_get_mechanism(100, GuestType.QEMU)[1]
    assert chain_id is not None
    provider.backup_abort(100, "test")

    (provider.layout.volume_path(first) / f"{DEVICE}.qcow2").unlink()
    provider = make_provider()
    provider.backup_start(100, GuestType.QEMU)
    assert provider.backup_get_mechanism(100, GuestType.QEMU) == (BackupMechanism.NBD, None)
    # A reuse request without a base is refused instead of leaving a gap.
    with pytest.raises(BaseUnusableError, match="no previous backup .*next backup will be full"):
        provider.backup_nbd(100, DEVICE, "/nonexistent", BitmapMode.REUSE, BITMAP, None)
    with pytest.raises(IntegrityError, match="lacks its image"):
        provider.restore_qemu_img_init(first, STOREID, DEVICE)


@pytest.mark.e2e
def test_removed_base_volume_means_full_backup_and_broken_chain_is_named(
    tmp_path: Path, make_provider: Callable[..., BackupDirProvider], nbd_exports: NbdExports
) -> None:
    disk = make_disk(tmp_path)
    first = full_backup(make_provider(), nbd_exports, disk)
    run("qemu-img", "bitmap", "--add", str(disk), BITMAP)
    qemu_io(disk, "write -P 0x33 1M 64K")
    provider = make_provider()
    provider.backup_start(100, GuestType.QEMU)
    provider.backup_get_mechanism(100, GuestType.QEMU)
    second = provider.backup_get_target(100, GuestType.QEMU)
    sock = nbd_exports.start(disk, bitmap=BITMAP)
    provider.backup_nbd(100, DEVICE, sock, BitmapMode.REUSE, BITMAP, None)
    provider.backup_end(100)
    nbd_exports.stop_all()

    # Bypass free_volume's refusal, as a careless admin with rm -r would.
    import shutil

    chain_id = provider.layout.read_index(second).bitmap_id
    shutil.rmtree(provider.layout.volume_path(first))
    with pytest.raises(VolumeNotFoundError, match=first):
        provider.restore_qemu_img_init(second, STOREID, DEVICE)
    provider = make_provider()
    provider.backup_start(100, GuestType.QEMU)
    assert provider.backup_get_mechanism(100, GuestType.QEMU)[1] is None
    sock = nbd_exports.start(disk)
    provider.backup_nbd(100, DEVICE, sock, BitmapMode.NONE, None, None)
    provider.backup_end(100)
    nbd_exports.stop_all()
    # After the full backup without a bitmap, a new chain starts with a new id.
    provider = make_provider()
    provider.backup_start(100, GuestType.QEMU)
    fresh = provider.backup_get_mechanism(100, GuestType.QEMU)[1]
    assert fresh is not None and fresh != chain_id


@pytest.mark.e2e
def test_aborted_backup_leaves_nothing_and_is_no_base(
    tmp_path: Path,
    make_provider: Callable[..., BackupDirProvider],
    nbd_exports: NbdExports,
    logs: LogRecords,
) -> None:
    disk = make_disk(tmp_path)
    provider = make_provider()
    provider.job_start(0)
    provider.backup_start(100, GuestType.QEMU)
    provider.backup_get_mechanism(100, GuestType.QEMU)
    sock = nbd_exports.start(disk)
    provider.backup_nbd(100, DEVICE, sock, BitmapMode.NEW, BITMAP, None)
    provider.backup_abort(100, "disk 2 failed")
    log = tmp_path / "task.log"
    log.write_text("log\n")
    provider.backup_handle_log_file(100, str(log))
    provider.job_end()
    assert list(provider.layout.backup_dir.iterdir()) == []
    assert provider.layout.last_recorded(GuestType.QEMU, 100) is None
    assert ("info", "backup-dir: backup of 100 did not complete, log not kept") in logs
    provider = make_provider()
    provider.backup_start(100, GuestType.QEMU)
    provider.backup_get_mechanism(100, GuestType.QEMU)
    assert any("full backup of 100, starting bitmap" in msg for _, msg in logs)
    assert not any("incremental" in msg for _, msg in logs)


@pytest.mark.e2e
def test_bitmap_no_never_asks_for_a_bitmap(
    tmp_path: Path, make_provider: Callable[..., BackupDirProvider], nbd_exports: NbdExports
) -> None:
    disk = make_disk(tmp_path)
    full_backup(make_provider(bitmap="no"), nbd_exports, disk)
    provider = make_provider(bitmap="no")
    provider.backup_start(100, GuestType.QEMU)
    assert provider.backup_get_mechanism(100, GuestType.QEMU) == (BackupMechanism.NBD, None)


@pytest.mark.e2e
def test_export_without_the_bitmap_is_an_nbd_error(
    tmp_path: Path, nbd_exports: NbdExports, logs: LogRecords
) -> None:
    disk = make_disk(tmp_path)
    sock = nbd_exports.start(disk)
    (tmp_path / "vol").mkdir()
    with pytest.raises(NbdError, match="does not offer qemu:dirty-bitmap:nope"):
        vm.backup_disk(
            nbd_path=sock,
            devicename=DEVICE,
            image=tmp_path / "vol" / "x.qcow2",
            backing=disk,
            bitmap_name="nope",
            bandwidth_limit=None,
            log_function=lambda level, msg: logs.append((level, msg)),
        )


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.serial
def test_bandwidth_limit_holds_within_ten_percent(
    tmp_path: Path, nbd_exports: NbdExports, logs: LogRecords
) -> None:
    disk = tmp_path / "random.qcow2"
    raw = tmp_path / "random.raw"
    with open(raw, "wb") as out:
        out.write(os.urandom(12 * MIB))
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk))
    sock = nbd_exports.start(disk)
    (tmp_path / "vol").mkdir()
    start = time.monotonic()
    stats = vm.backup_disk(
        nbd_path=sock,
        devicename=DEVICE,
        image=tmp_path / "vol" / "out.qcow2",
        backing=None,
        bitmap_name=None,
        bandwidth_limit=4 * MIB,
        log_function=lambda level, msg: logs.append((level, msg)),
    )
    elapsed = time.monotonic() - start
    assert stats.read == 12 * MIB
    rate = stats.read / elapsed
    assert 0.9 * 4 * MIB <= rate <= 1.1 * 4 * MIB, f"{rate / MIB:.2f} MiB/s"


@pytest.mark.e2e
def test_failed_backup_with_a_new_bitmap_resets_the_base(
    tmp_path: Path,
    make_provider: Callable[..., BackupDirProvider],
    nbd_exports: NbdExports,
    logs: LogRecords,
) -> None:
    """The host answered ``new`` on a proven base (its bitmap was lost) and the
    backup failed: that base must not be offered with the chain's id again."""
    disk = make_disk(tmp_path)
    full_backup(make_provider(), nbd_exports, disk)
    provider = make_provider()
    provider.job_start(0)
    provider.backup_start(100, GuestType.QEMU)
    _, chain = provider.backup_get_mechanism(100, GuestType.QEMU)
    assert chain is not None and any("incremental backup of 100" in m for _, m in logs)
    provider.backup_nbd(100, DEVICE, nbd_exports.start(disk), BitmapMode.NEW, BITMAP, None)
    provider.backup_abort(100, "the next disk failed")
    provider.job_end()
    nbd_exports.stop_all()
    provider = make_provider()
    provider.backup_start(100, GuestType.QEMU)
    _, again = provider.backup_get_mechanism(100, GuestType.QEMU)
    assert again != chain  # a fresh chain: the host creates it, a full read
    assert any("created a new bitmap failed" in m for _, m in logs)


@pytest.mark.e2e
def test_base_changed_after_it_was_proven_fails_the_incremental(
    tmp_path: Path,
    make_provider: Callable[..., BackupDirProvider],
    nbd_exports: NbdExports,
    logs: LogRecords,
) -> None:
    disk = make_disk(tmp_path)
    first = full_backup(make_provider(), nbd_exports, disk)
    provider = make_provider()
    provider.job_start(0)
    provider.backup_start(100, GuestType.QEMU)
    _, chain = provider.backup_get_mechanism(100, GuestType.QEMU)
    assert chain is not None
    index = provider.layout.volume_path(first) / "index.json"
    index.write_text(index.read_text().replace('"stored-size"', '"stored-size" ', 1))
    with pytest.raises(BaseUnusableError, match="changed during the backup"):
        provider.backup_nbd(100, DEVICE, nbd_exports.start(disk), BitmapMode.REUSE, BITMAP, None)
    provider.backup_abort(100, "base changed")
    provider.job_end()
    provider = make_provider()
    provider.backup_start(100, GuestType.QEMU)
    assert provider.backup_get_mechanism(100, GuestType.QEMU)[1] is None
    assert any(lv == "warn" and "its index changed" in m for lv, m in logs)


# -- with the kit's fake source (the export is in memory; the image is real) ---------


def raw_bytes(image: Path, tmp_path: Path) -> bytes:
    raw = tmp_path / "out.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw))
    return raw.read_bytes()


def test_full_backup_from_the_fake_reads_allocated_extents_only(
    tmp_path: Path, logs: LogRecords
) -> None:
    data = bytearray(8 * MIB)
    data[MIB : 2 * MIB] = b"\x11" * MIB
    data[5 * MIB : 5 * MIB + 4096] = b"\x22" * 4096
    data[7 * MIB : 7 * MIB + 4096] = b"\x33" * 4096  # not reported allocated: never read
    fake = FakeNbdSource(bytes(data), allocated=[(MIB, MIB), (4 * MIB, 2 * MIB)])
    (tmp_path / "vol").mkdir()
    out = tmp_path / "vol" / "out.qcow2"
    stats = vm.backup_disk(
        nbd_path="unused",
        devicename=DEVICE,
        image=out,
        backing=None,
        bitmap_name=None,
        bandwidth_limit=None,
        log_function=lambda level, msg: logs.append((level, msg)),
        connect_source=lambda path, name, bitmap: fake,
    )
    assert fake.closed
    assert merge_ranges(fake.reads) == [(MIB, MIB), (4 * MIB, 2 * MIB)]
    assert merge_ranges(fake.trims) == [(MIB, MIB), (4 * MIB, 2 * MIB)]
    assert stats.read == stats.written == stats.discarded == 3 * MIB
    data[7 * MIB : 7 * MIB + 4096] = bytes(4096)
    assert raw_bytes(out, tmp_path) == bytes(data)
    assert logs[-1][1].startswith(f"{DEVICE}: 100% (3.0 of 3.0 MiB) in ")


def test_incremental_from_the_fake_reads_dirty_extents_only(
    tmp_path: Path, logs: LogRecords
) -> None:
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M")
    qemu_io(base, "write -P 0x11 0 4M")
    data = bytearray(b"\x11" * 4 * MIB)
    data[MIB : MIB + 64 * 1024] = b"\x44" * (64 * 1024)
    data[3 * MIB : 3 * MIB + 64 * 1024] = bytes(64 * 1024)  # dirty and now zero
    # The fake refuses any read outside these, as qemu does in bitmap mode reuse.
    fake = FakeNbdSource(bytes(data), dirty=[(MIB, 64 * 1024), (3 * MIB, 64 * 1024)])
    (tmp_path / "vol").mkdir()
    out = tmp_path / "vol" / "out.qcow2"
    stats = vm.backup_disk(
        nbd_path="unused",
        devicename=DEVICE,
        image=out,
        backing=base,
        bitmap_name=BITMAP,
        bandwidth_limit=None,
        log_function=lambda level, msg: logs.append((level, msg)),
        connect_source=lambda path, name, bitmap: fake,
    )
    assert fake.reads == [(MIB, 64 * 1024), (3 * MIB, 64 * 1024)]
    assert (stats.written, stats.zeroed) == (64 * 1024, 64 * 1024)
    assert raw_bytes(out, tmp_path) == bytes(data)


def test_failed_read_from_the_fake_is_an_nbd_error_and_disconnects(
    tmp_path: Path, logs: LogRecords
) -> None:
    fake = FakeNbdSource(b"\x01" * 4 * MIB, fail_at=2 * MIB)
    (tmp_path / "vol").mkdir()
    with pytest.raises(NbdError, match="injected"):
        vm.backup_disk(
            nbd_path="unused",
            devicename=DEVICE,
            image=tmp_path / "vol" / "out.qcow2",
            backing=None,
            bitmap_name=None,
            bandwidth_limit=None,
            log_function=lambda level, msg: logs.append((level, msg)),
            connect_source=lambda path, name, bitmap: fake,
        )
    assert fake.closed
