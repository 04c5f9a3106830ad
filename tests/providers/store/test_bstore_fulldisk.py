"""A full disk under the store: the backup fails clearly, nothing stored is touched."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvebackup.api.types import GuestType
from pvebackup.host.guests import NodeRoot
from pvebackup.host.job import run_backup_job
from pvebackup.host.restore import run_restore
from pvebackup.storage import read_storage_config, registry, storage_config

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024


@pytest.fixture
def small_store(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs: full after a few MiB of incompressible chunks."""
    path = tmp_path / "store"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_full_disk_fails_the_guest_and_keeps_earlier_snapshots(
    tmp_path: Path, small_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    root = NodeRoot(tmp_path / "node")
    root.pve_dir.joinpath("qemu-server").mkdir(parents=True)
    root.storage_cfg.write_text(
        f"dir: local\n\tpath {tmp_path}/vz\n\nbackup-store: small\n\tpath {small_store}\n"
    )
    disk = tmp_path / "vz/images/100/vm-100-disk-0.qcow2"
    disk.parent.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 1M", str(disk)],
        check=True,
        capture_output=True,
    )
    root.config_path(100, GuestType.QEMU).write_text(
        "scsi0: local:100/vm-100-disk-0.qcow2,size=64M\n"
    )
    first = run_backup_job(root, "small", [100], terminal=None)
    assert not first.failed
    as_backed_up = tmp_path / "first.qcow2"
    shutil.copyfile(disk, as_backed_up)

    noise = tmp_path / "noise.raw"
    noise.write_bytes(os.urandom(32 * MiB))  # incompressible: twice the free space
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -s {noise} 8M 32M", str(disk)],
        check=True,
        capture_output=True,
    )
    second = run_backup_job(root, "small", [100], terminal=None)
    assert second.failed
    assert "No space left on device" in (second.guests[0].error or "")

    cfg = read_storage_config(root.storage_cfg)
    volumes = registry.lookup("backup-store").list_volumes(storage_config(cfg, "small"), "small")
    assert [v.volid for v in volumes] == [first.guests[0].target]  # no half snapshot
    run_restore(root, volumes[0].volid, 200, terminal=None)
    restored = tmp_path / "vz/images/200/vm-200-disk-0.qcow2"
    assert (
        subprocess.run(["qemu-img", "compare", "-q", str(as_backed_up), str(restored)]).returncode
        == 0
    )
