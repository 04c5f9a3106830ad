"""backup-store through the host side: full, incremental, restore, qemu-img compare."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest
from bstore_support import CHUNK, KiB, MiB, compare, qemu_write, run

from pvebackup.api.types import GuestType
from pvebackup.host.guests import NodeRoot
from pvebackup.host.job import run_backup_job
from pvebackup.host.restore import run_restore
from pvebackup.storage import lookup, read_storage_config, storage_config

pytestmark = pytest.mark.e2e


def _node(path: Path) -> tuple[NodeRoot, Path]:
    root = NodeRoot(path)
    (path / "store").mkdir(parents=True)
    for sub in ("qemu-server", "lxc", "firewall"):
        (root.pve_dir / sub).mkdir(parents=True, exist_ok=True)
    root.storage_cfg.write_text(
        f"dir: local\n\tpath {path}/var/lib/vz\n\tcontent images,rootdir\n\n"
        f"backup-store: store1\n\tpath {path}/store\n\tchunk-size {CHUNK}\n"
    )
    disk = path / "var/lib/vz/images/100/vm-100-disk-0.qcow2"
    disk.parent.mkdir(parents=True)
    run("qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(4 * MiB))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x21 0 1M", str(disk))
    root.config_path(100, GuestType.QEMU).write_text(
        "name: vm\nmemory: 512\nscsi0: local:100/vm-100-disk-0.qcow2,size=4M\n"
    )
    return root, disk


def test_full_incremental_restore_through_the_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    root, disk = _node(tmp_path / "node")
    first = run_backup_job(root, "store1", [100], terminal=None)
    assert not first.failed, first.guests
    qemu_write(disk, 3 * CHUNK + 8 * KiB, 4 * KiB, 0x55)
    qemu_write(disk, 2 * MiB, 4 * KiB, 0x66)
    second = run_backup_job(root, "store1", [100], terminal=None)
    assert not second.failed, second.guests
    log = second.guests[0].log_path
    assert log is not None and "dirty extents" in log.read_text()
    target = second.guests[0].target
    assert target is not None
    volid = target if target.startswith("store1:") else f"store1:{target}"
    cfg = read_storage_config(root.storage_cfg)
    notes = [
        v.comment
        for v in lookup("backup-store").list_volumes(storage_config(cfg, "store1"), "store1")
    ]
    assert notes[0].startswith("full, stored ") and notes[1].startswith("incremental, stored ")
    result = run_restore(root, volid, 200, terminal=None)
    restored = [p for p in (tmp_path / "node/var/lib/vz/images/200").iterdir()]
    assert len(restored) == 1, result
    assert compare(disk, restored[0]).returncode == 0


def test_raw_disk_with_a_4k_extent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A raw disk's lone 4 KiB data extent: discards stay 64 KiB aligned for QEMU."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    root, disk = _node(tmp_path / "node")
    raw = disk.parent / "vm-100-disk-1.raw"
    run("qemu-img", "create", "-q", "-f", "raw", str(raw), str(4 * MiB))
    with root.config_path(100, GuestType.QEMU).open("a") as f:
        f.write("tpmstate0: local:100/vm-100-disk-1.raw,size=4M,version=v2.0\n")
    result = run_backup_job(root, "store1", [100], terminal=None)
    assert not result.failed, result.guests
    log = result.guests[0].log_path
    assert log is not None and "exited unexpectedly" not in log.read_text()
    target = result.guests[0].target
    assert target is not None
    run_restore(root, target, 200, terminal=None)
    restored = sorted((tmp_path / "node/var/lib/vz/images/200").iterdir())
    assert len(restored) == 2
    assert compare(disk, restored[0]).returncode == 0
    assert compare(raw, restored[1]).returncode == 0


def test_linked_clone_is_backed_up_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A linked clone (``local:900/base-900-disk-0.qcow2/100/vm-100-disk-0.qcow2``):
    the backup holds its data and its base's, the restore is a standalone disk."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    root, _ = _node(tmp_path / "node")
    images = tmp_path / "node/var/lib/vz/images"
    base = images / "900/base-900-disk-0.qcow2"
    base.parent.mkdir()
    run("qemu-img", "create", "-q", "-f", "qcow2", str(base), str(4 * MiB))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 3M", str(base))
    clone = images / "100/vm-100-disk-9.qcow2"
    run(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "../900/base-900-disk-0.qcow2",
        "-F",
        "qcow2",
        str(clone),
    )
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x62 1M 64k", str(clone))
    root.config_path(100, GuestType.QEMU).write_text(
        "scsi0: local:900/base-900-disk-0.qcow2/100/vm-100-disk-9.qcow2,size=4M\n"
    )
    result = run_backup_job(root, "store1", [100], terminal=None)
    assert not result.failed, result.guests
    target = result.guests[0].target
    assert target is not None
    run_restore(root, target, 200, terminal=None)
    restored = next((images / "200").iterdir())
    assert compare(clone, restored).returncode == 0
    info = subprocess.run(["qemu-img", "info", str(restored)], capture_output=True, text=True)
    assert "backing file" not in info.stdout
