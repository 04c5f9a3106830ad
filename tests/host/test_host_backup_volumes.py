"""Which disks a backup job reads: PVE's get_backup_volumes rules, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
from recording_provider import read_calls
from sample_node import MiB, Node, sh

from pvebackup.host.job import run_backup_job

pytestmark = pytest.mark.e2e


def _plain_image(tmp_path: Path, name: str, fmt: str, pattern: int) -> Path:
    path = tmp_path / "outside" / name
    path.parent.mkdir(exist_ok=True)
    sh("qemu-img", "create", "-q", "-f", fmt, str(path), str(MiB))
    sh("qemu-io", "-f", fmt, "-c", f"write -P {pattern} 0 512k", str(path))
    return path


def test_plain_paths_are_backed_up_and_efidisk_needs_ovmf(node: Node, tmp_path: Path) -> None:
    raw = _plain_image(tmp_path, "file.raw", "raw", 0x41)
    qcow = _plain_image(tmp_path, "other.img", "qcow2", 0x42)
    skipped = _plain_image(tmp_path, "skipped.raw", "raw", 0x43)
    node.add_vm(
        100,
        {"scsi0": MiB, "efidisk0": MiB},
        extra=(
            f"scsi1: {raw},size=1M\n"
            f"scsi2: file={qcow},,format=qcow2,size=1M\n"  # explicit key, empty part
            f"scsi3: {skipped},backup=0,size=1M\n"
        ),
    )
    result = run_backup_job(node.root, "rec", [100], terminal=None)
    assert not result.failed
    devices = [c[2] for c in read_calls(node.backup_dir) if c[0] == "backup_nbd"]
    assert devices == ["drive-scsi0", "drive-scsi1", "drive-scsi2"]
    stored = node.backup_dir / "qemu-100-000"
    sh("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(raw),
       str(stored / "drive-scsi1.raw"))
    sh("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(qcow),
       str(stored / "drive-scsi2.raw"))
    log = (node.root.log_dir / "qemu-100.log").read_text()
    assert "exclude disk 'efidisk0'" in log and "(efidisk but no OVMF BIOS)" in log
    assert f"exclude disk 'scsi3' '{skipped}' (backup=0)" in log


def test_efidisk_with_ovmf_is_backed_up(node: Node) -> None:
    node.add_vm(100, {"scsi0": MiB, "efidisk0": MiB}, extra="bios: ovmf\n")
    result = run_backup_job(node.root, "rec", [100], terminal=None)
    assert not result.failed
    devices = [c[2] for c in read_calls(node.backup_dir) if c[0] == "backup_nbd"]
    assert devices == ["drive-scsi0", "drive-efidisk0"]


def test_a_plain_disk_of_unknown_format_fails_that_guest(node: Node, tmp_path: Path) -> None:
    vmdk = tmp_path / "disk.vmdk"
    vmdk.write_bytes(b"\0" * 4096)
    node.add_vm(100, {"scsi0": MiB}, extra=f"scsi1: {vmdk},format=vmdk\n")
    result = run_backup_job(node.root, "rec", [100], terminal=None)
    assert result.failed
    log = (node.root.log_dir / "qemu-100.log").read_text()
    assert "unsupported image format 'vmdk'" in log
