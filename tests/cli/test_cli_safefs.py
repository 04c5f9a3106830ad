"""``pvebackup remove`` through a symlink planted in the storage: exit 8, nothing outside lost.

The storages and the hostile links are built in the test; ``outside`` stands for
host files that whoever can write the backup storage wants deleted.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pvebackup.api.types import GuestType
from pvebackup.cli.main import main
from pvebackup.host.guests import NodeRoot
from pvebackup.store.backends.local import LocalBackend
from pvebackup.store.datastore import Datastore
from pvebackup.store.snapshot import SnapshotId

STORAGE_CFG = """\
backup-dir: bdir
\tpath {root}/bdir

backup-store: bstore
\tpath {root}/bstore
"""


@pytest.fixture
def node(tmp_path: Path) -> Path:
    root = tmp_path / "node"
    pve = NodeRoot(root).pve_dir
    pve.mkdir(parents=True)
    NodeRoot(root).storage_cfg.write_text(STORAGE_CFG.format(root=root))
    (root / "bdir" / "backup").mkdir(parents=True)
    return root


def snapshot_of(outside: Path) -> dict[str, bytes]:
    files = sorted(p for p in outside.rglob("*") if p.is_file())
    return {str(p.relative_to(outside)): p.read_bytes() for p in files}


def test_remove_refuses_a_backup_dir_volume_that_is_a_symlink(
    node: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    # Made to look like a volume, so that every check on the followed path passes.
    index = {"format": "pvebackup-backup-dir-v1", "vmid": 100, "vmtype": "qemu", "ctime": 0}
    (outside / "index.json").write_text(json.dumps(index))
    (outside / "precious").write_text("host data\n")
    before = snapshot_of(outside)
    volume = "vm-100-2026-11-26T09:30:00Z"
    (node / "bdir" / "backup" / volume).symlink_to(outside)
    assert main(["--root", str(node), "remove", f"bdir:backup/{volume}"]) == 8
    assert "symlink" in capsys.readouterr().err
    assert snapshot_of(outside) == before
    assert (node / "bdir" / "backup" / volume).is_symlink()


def test_remove_refuses_a_backup_store_snapshot_that_is_a_symlink(
    node: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Datastore.create(LocalBackend(node / "bstore"))
    sid = SnapshotId(GuestType.QEMU, 100, 1_780_000_000)
    with store.new_snapshot(sid) as w:
        w.add_file("qemu-server.conf", b"memory: 512\n")
    # The snapshot's directory is moved out and replaced by a link to it.
    outside = tmp_path / "outside"
    snapdir = node / "bstore" / sid.prefix
    shutil.move(str(snapdir), outside)
    (outside / "precious").write_text("host data\n")
    os.symlink(outside, str(snapdir).rstrip("/"))
    before = snapshot_of(outside)
    assert main(["--root", str(node), "remove", f"bstore:{sid.volname}"]) == 8
    assert "symlink" in capsys.readouterr().err
    assert snapshot_of(outside) == before
