"""backup-dir: a rolled-back storage or an edited ``.last`` record never yields a gap.

Through the host job with real QEMU tools: the host's dirty bitmap was cleared at
backup 2; if the provider then built on backup 1 (what the rolled-back or edited
storage claims is the last one), the writes between 1 and 2 would be missing from
backup 3. The host-side state file proves which volume the bitmap belongs to.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from test_bdir_host import Node, backup, same_image, sh

from pvebackup.host.restore import run_restore

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


@pytest.fixture
def vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Node, Path]:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    node = Node(tmp_path / "node")
    return node, node.add_vm(100, [4 * MiB])[0]


def _third_backup_is_full_and_restores(node: Node, disk: Path, reason: str) -> None:
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x62 3M 4k", str(disk))
    third, log = backup(node, "plain", 100)
    warnings = [line for line in log.splitlines() if " WARN: " in line]
    assert any(reason in line for line in warnings), log
    assert "bitmap mode reuse" not in log
    index = json.loads((node.path / "plain" / third.split(":", 1)[1] / "index.json").read_text())
    assert index["parent"] is None and index["devices"]["drive-scsi0"]["bitmap-mode"] == "none"
    run_restore(node.root, third, 200, terminal=None)
    assert same_image(disk, next(node.images(200).glob("*.qcow2")))


def test_rolled_back_storage_gives_a_full_backup(vm: tuple[Node, Path], tmp_path: Path) -> None:
    node, disk = vm
    backup(node, "plain", 100)
    saved = tmp_path / "saved"
    shutil.copytree(node.path / "plain", saved, symlinks=True)
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 1M 64k", str(disk))
    _, log = backup(node, "plain", 100)
    assert "bitmap mode reuse" in log
    shutil.rmtree(node.path / "plain")
    shutil.copytree(saved, node.path / "plain", symlinks=True)
    _third_backup_is_full_and_restores(node, disk, "record edited, storage rolled back")


def test_edited_last_record_gives_a_full_backup(vm: tuple[Node, Path]) -> None:
    node, disk = vm
    first, _ = backup(node, "plain", 100)
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 1M 64k", str(disk))
    backup(node, "plain", 100)
    (node.path / "plain/backup/.last/qemu-100").write_text(first.split(":", 1)[1] + "\n")
    _third_backup_is_full_and_restores(node, disk, "names backup/vm-100-")


def test_swapped_index_gives_a_full_backup(vm: tuple[Node, Path]) -> None:
    """The volume the state names is there, but its index is not what was committed
    (here: the first backup's, copied over it, with its own full image)."""
    node, disk = vm
    first, _ = backup(node, "plain", 100)
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 1M 64k", str(disk))
    second, _ = backup(node, "plain", 100)
    old = node.path / "plain" / first.split(":", 1)[1]
    new = node.path / "plain" / second.split(":", 1)[1]
    shutil.copyfile(old / "drive-scsi0.qcow2", new / "drive-scsi0.qcow2")
    shutil.copyfile(old / "index.json", new / "index.json")
    _third_backup_is_full_and_restores(node, disk, "its index changed")


def test_damaged_or_missing_state_file_gives_a_full_backup(
    vm: tuple[Node, Path], host_state_dir: Path
) -> None:
    node, disk = vm
    backup(node, "plain", 100)
    (state,) = host_state_dir.glob("backup-dir/plain/qemu-100.json")
    assert state.stat().st_mode & 0o777 == 0o600
    assert state.parent.stat().st_mode & 0o777 == 0o700
    state.write_bytes(b"\xff{not json")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 1M 64k", str(disk))
    _, log = backup(node, "plain", 100)
    assert "is damaged" in log and "bitmap mode reuse" not in log
    state.unlink()
    _third_backup_is_full_and_restores(node, disk, "holds no record of the last backup")


def test_image_of_another_size_gives_a_full_backup(vm: tuple[Node, Path]) -> None:
    node, disk = vm
    first, _ = backup(node, "plain", 100)
    image = node.path / "plain" / first.split(":", 1)[1] / "drive-scsi0.qcow2"
    subprocess.run(["truncate", "-s", "+65536", str(image)], check=True)
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 1M 64k", str(disk))
    _third_backup_is_full_and_restores(node, disk, "of another size than committed")
