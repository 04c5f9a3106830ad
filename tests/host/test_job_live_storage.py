"""Live backups of running VMs whose disks are on the storage types of real nodes.

Real qemu-system-x86_64 (TCG): (a) a disk on a block device (a loop device) that
QEMU opened by another device node than the config names (as ``/dev/VG/LV`` and
``/dev/dm-N``), started with ``-drive``; (b) a raw disk on a btrfs storage (btrfs
on a loop device), started with ``-blockdev`` as qemu-server 9 does, where the
drive has no block backend name and is found by its device. The rbd naming is
tested against QEMU's answers in tests/host/qemu/test_live_running.py.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from live_vm import LiveVm
from sample_node import MiB, Node, sh

import pvebackup
from btrfs_loop import btrfs_mounted
from pvebackup.api.errors import UnsupportedError
from pvebackup.api.types import GuestType
from pvebackup.host.job import run_backup_job
from pvebackup.host.restore import run_restore
from pvebackup.kit.crashpoint import ENV
from pvebackup.storage import GuestVolume, GuestVolumeStorage, registry
from pvebackup.storage.guestvol import next_disk_name
from pvebackup.storage.plugin import COMMON_PROPERTIES, PropertyKind, PropertySpec

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
SRC = str(Path(pvebackup.__file__).resolve().parents[1])
SIZE = 8 * MiB
A, B = 0xA1, 0xB2


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(SIZE)
    res = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True
    )
    if res.returncode != 0:
        pytest.skip(f"no loop device here: {res.stderr.strip()}")
    dev = Path(res.stdout.strip())
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", str(dev)], check=False)


def _storage_cfg(node: Node, extra: str = "") -> None:
    (node.path / "bdir").mkdir(exist_ok=True)
    node.root.storage_cfg.write_text(
        f"dir: local\n\tpath {node.path}/var/lib/vz\n\tcontent images,rootdir\n\n"
        f"backup-dir: bdir\n\tpath {node.path}/bdir\n" + extra
    )


def _backup_while_the_guest_writes(node: Node, vm: LiveVm) -> str:
    before = vm.graph()

    def guest() -> None:
        vm.wait_exports()
        for off in range(0, SIZE, MiB):
            vm.write(B, off, MiB)

    writer = threading.Thread(target=guest)
    writer.start()
    res = run_backup_job(node.root, "bdir", [100], bwlimit_kib=8 * 1024, terminal=None)
    writer.join()
    assert not res.failed, res.guests
    log = res.guests[0].log_path
    assert log is not None and "backup mode snapshot" in log.read_text()
    assert vm.status() == "running"
    assert vm.graph() == before  # the device is back on its own node, nothing of ours left
    assert vm.read_ok(B, 0, SIZE)
    assert res.guests[0].target is not None
    return res.guests[0].target


def _restored(node: Node, target: str, vmid: int) -> bytes:
    run_restore(node.root, target, vmid, target_storage="local", terminal=None)
    (img,) = (node.images / str(vmid)).iterdir()
    raw = img.parent / "check.raw"
    sh("qemu-img", "convert", "-O", "raw", str(img), str(raw))
    return raw.read_bytes()


def test_running_vm_on_a_block_device_opened_by_another_name(
    node: Node, tmp_path: Path, loop_device: Path
) -> None:
    # QEMU opens one device node, the config names another of the same device (as
    # /dev/VG/LV vs /dev/dm-N): a file name comparison refused this disk.
    sh("qemu-io", "-f", "raw", "-c", f"write -P {A} 0 {SIZE}", str(loop_device))
    rdev = os.stat(loop_device).st_rdev
    alias = tmp_path / "dev" / "vm-100-disk-0"
    alias.parent.mkdir()
    os.mknod(alias, 0o600 | stat.S_IFBLK, rdev)
    _storage_cfg(node)
    node.root.config_path(100, GuestType.QEMU).write_text(
        f"name: vm\nmemory: 512\nscsi0: {loop_device},size=8M\n"
    )
    vm = LiveVm(node.root, 100, alias, fmt="raw")
    try:
        _backup_while_the_guest_writes(node, vm)
    finally:
        vm.stop()
    # A passthrough disk is not restored onto a storage: read the stored image.
    (stored,) = (node.path / "bdir/backup").glob("vm-100-*/drive-scsi0.qcow2")
    raw = tmp_path / "check.raw"
    sh("qemu-img", "convert", "-O", "raw", str(stored), str(raw))
    assert raw.read_bytes() == bytes([A]) * SIZE


def test_running_vm_on_btrfs_started_with_blockdev(node: Node, tmp_path: Path) -> None:
    with btrfs_mounted(tmp_path) as mnt:
        _storage_cfg(node, f"\nbtrfs: bt1\n\tpath {mnt}/bt1\n\tcontent images,rootdir\n")
        plugin = registry.lookup("btrfs")
        scfg = {"type": "btrfs", "path": f"{mnt}/bt1", "content": "images"}
        plugin.allocate(scfg, "bt1", 100, "raw", SIZE, "100/vm-100-disk-0.raw")  # type: ignore[attr-defined]
        disk = mnt / "bt1/images/100/vm-100-disk-0/disk.raw"
        sh("qemu-io", "-f", "raw", "-c", f"write -P {A} 0 {SIZE}", str(disk))
        node.root.config_path(100, GuestType.QEMU).write_text(
            "name: vm\nmemory: 512\nscsi0: bt1:100/vm-100-disk-0.raw,size=8M\n"
        )
        vm = LiveVm(node.root, 100, disk, fmt="raw", blockdev=True)
        try:
            block = vm.qmp.execute("query-block")
            assert [(b["device"], b["qdev"]) for b in block] == [("", "scsi0")]
            target = _backup_while_the_guest_writes(node, vm)
            # Killed with our filter above the throttle node: the next run puts the
            # device back on the throttle node (not on the image's node below it).
            before = vm.graph()
            p = subprocess.run(
                [sys.executable, "-m", "pvebackup", "--root", str(node.path), "backup", "100",
                 "--storage", "bdir"],
                env={**os.environ, "PYTHONPATH": SRC, ENV: "backup-export-ready"},
                capture_output=True, timeout=120,
            )  # fmt: skip
            assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
            assert vm.graph() != before
            again = run_backup_job(node.root, "bdir", [100], terminal=None)
            assert not again.failed, again.guests
            assert vm.graph() == before and vm.status() == "running"
            assert vm.qmp.execute("query-block")[0]["inserted"]["node-name"] == "drive-scsi0"
        finally:
            vm.stop()
        assert _restored(node, target, 200) == bytes([A]) * SIZE


class ExtentStorage(GuestVolumeStorage):
    """A raw-only storage like a thick LV: a new volume is rounded up (extents) and
    holds old data (0xAA). Files ``vm-<vmid>-...`` under ``path``."""

    type = "test-extents"
    properties = {**COMMON_PROPERTIES, "path": PropertySpec(PropertyKind.PATH, required=True)}
    image_formats = ("raw",)
    zeroed_images = False

    def _dir(self, scfg: Mapping[str, str]) -> Path:
        return Path(scfg["path"])

    def guest_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> GuestVolume:
        return GuestVolume(str(self._dir(scfg) / volname), "raw", "file")

    def volume_exists(self, scfg: Mapping[str, str], storeid: str, volname: str) -> bool:
        return (self._dir(scfg) / volname).exists()

    def next_volname(self, scfg: Mapping[str, str], storeid: str, vmid: int, fmt: str) -> str:
        self.check_format(storeid, fmt)
        return next_disk_name(os.listdir(self._dir(scfg)), vmid)

    def allocate(
        self, scfg: Mapping[str, str], storeid: str, vmid: int, fmt: str, size: int, volname: str
    ) -> str:
        self.check_format(storeid, fmt)
        (self._dir(scfg) / volname).write_bytes(b"\xaa" * (size + MiB))  # rounded up
        return volname

    def free(self, scfg: Mapping[str, str], storeid: str, volname: str) -> None:
        (self._dir(scfg) / volname).unlink()


def test_fleecing_on_a_raw_only_storage_with_rounded_up_volumes(
    node: Node, tmp_path: Path
) -> None:
    ext = tmp_path / "ext"
    ext.mkdir()
    # Not ours (Proxmox VE's own backup beside us could have made it): never touched.
    (ext / "vm-100-fleece-0").write_bytes(b"theirs")
    with registry.registered(ExtentStorage):
        _storage_cfg(node, f"\ntest-extents: ext\n\tpath {ext}\n\tcontent images\n")
        (disk,) = node.add_vm(100, {"scsi0": SIZE})
        sh("qemu-io", "-f", "qcow2", "-c", f"write -P {A} 0 {SIZE}", str(disk))
        # A storage that allocates no images is refused before the job starts.
        with pytest.raises(UnsupportedError, match="'bdir'"):
            run_backup_job(node.root, "bdir", [100], fleecing_storage="bdir", terminal=None)
        vm = LiveVm(node.root, 100, disk)
        try:
            before = vm.graph()
            fleece_sizes: list[int] = []

            def guest() -> None:
                vm.wait_exports()
                fleece_sizes.extend(
                    n["image"]["virtual-size"]
                    for n in vm.qmp.execute("query-named-block-nodes")
                    if n["node-name"] == "pvb-fleece0"
                )
                for off in range(0, SIZE, MiB):
                    vm.write(B, off, MiB)

            writer = threading.Thread(target=guest)
            writer.start()
            res = run_backup_job(
                node.root, "bdir", [100], bwlimit_kib=8 * 1024, fleecing_storage="ext",
                terminal=None,
            )  # fmt: skip
            writer.join()
            assert not res.failed, res.guests
            assert vm.graph() == before and vm.read_ok(B, 0, SIZE)
            # The volume is 1 MiB bigger (rounded up); QEMU sees the disk's size.
            assert fleece_sizes == [SIZE]
        finally:
            vm.stop()
        text = res.guests[0].log_path.read_text()  # type: ignore[union-attr]
        # PVE's rule: qcow2 where the storage allocates it, else raw.
        assert "fleecing image ext:vm-100-fleece-1 (raw) allocated" in text
        assert sorted(os.listdir(ext)) == ["vm-100-fleece-0"]  # ours freed, theirs kept
        assert (ext / "vm-100-fleece-0").read_bytes() == b"theirs"
        assert res.guests[0].target is not None
        assert _restored(node, res.guests[0].target, 200) == bytes([A]) * SIZE
