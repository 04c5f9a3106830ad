"""The dirty bitmap advances only after ``backup_end`` returned (host.job).

Real QEMU tools and the backup-dir provider: if the host cleared the bitmap
before the provider committed, a failing ``backup_end`` would lose the writes the
failed backup had read, and the next incremental would miss them.
"""

from __future__ import annotations

import subprocess

import pytest
from sample_node import MiB, Node, sh

from pvebackup.api.errors import StateError
from pvebackup.host.job import run_backup_job
from pvebackup.host.restore import run_restore
from pvebackup.providers.directory.provider import BackupDirProvider

pytestmark = pytest.mark.e2e


def test_failing_backup_end_keeps_the_writes_in_the_bitmap(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    (node.path / "bdir").mkdir()
    with node.root.storage_cfg.open("a") as f:
        f.write(f"\nbackup-dir: bdir\n\tpath {node.path}/bdir\n")
    (disk,) = node.add_vm(100, {"scsi0": 4 * MiB})
    first = run_backup_job(node.root, "bdir", [100], terminal=None)
    assert not first.failed, first.guests
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 2M 64k", str(disk))

    original = BackupDirProvider.backup_end

    def failing_end(self: BackupDirProvider, vmid: int) -> None:
        raise StateError("injected: backup_end failed")

    monkeypatch.setattr(BackupDirProvider, "backup_end", failing_end)
    second = run_backup_job(node.root, "bdir", [100], terminal=None)
    assert second.failed and "injected: backup_end failed" in str(second.guests[0].error)
    monkeypatch.setattr(BackupDirProvider, "backup_end", original)

    third = run_backup_job(node.root, "bdir", [100], terminal=None)
    assert not third.failed, third.guests
    log = third.guests[0].log_path
    assert log is not None and "bitmap mode reuse" in log.read_text()  # incremental
    target = third.guests[0].target
    assert target is not None
    run_restore(node.root, target, 200, terminal=None)
    (restored,) = (node.images / "200").iterdir()
    same = subprocess.run(["qemu-img", "compare", str(disk), str(restored)], capture_output=True)
    assert same.returncode == 0, "the write read by the failed backup is missing"
