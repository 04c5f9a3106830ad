"""``list`` fields mean the same for both providers (backup-dir, backup-store).

``size`` is what the backup stored (the task size), ``virtual-size`` the disks'
size, ``parent`` the base of an incremental, ``notes`` the operator's only and the
provider's description goes to ``comment``.
"""

from __future__ import annotations

import os

import pytest
from sample_node import MiB, Node, sh

from pvebackup.host.job import run_backup_job
from pvebackup.storage import lookup, read_storage_config, storage_config

pytestmark = pytest.mark.e2e


@pytest.fixture
def both(node: Node, monkeypatch: pytest.MonkeyPatch) -> Node:
    monkeypatch.setenv("PVEBACKUP_STATE_DIR", str(node.path / "state"))
    for sub in ("bdir", "bstore"):
        (node.path / sub).mkdir()
    with node.root.storage_cfg.open("a") as cfg:
        cfg.write(
            f"\nbackup-dir: bdir\n\tpath {node.path}/bdir\n\n"
            f"backup-store: bstore\n\tpath {node.path}/bstore\n\tchunk-size 65536\n"
        )
    return node


@pytest.mark.parametrize("storeid", ["bdir", "bstore"])
def test_list_volumes_fields_after_full_and_incremental(both: Node, storeid: str) -> None:
    (disk,) = both.add_vm(100, {"scsi0": 4 * MiB})
    noise = both.path / "noise"
    noise.write_bytes(os.urandom(MiB))  # incompressible: sizes mean something
    sh("qemu-io", "-f", "qcow2", "-c", f"write -s {noise} 0 1M", str(disk))
    first = run_backup_job(both.root, storeid, [100], terminal=None)
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x55 2M 64K", str(disk))
    second = run_backup_job(both.root, storeid, [100], terminal=None)
    assert not first.failed and not second.failed
    cfg = read_storage_config(both.root.storage_cfg)
    scfg = storage_config(cfg, storeid)
    full, incremental = lookup(scfg["type"]).list_volumes(scfg, storeid)

    assert [full.volid, incremental.volid] == [first.guests[0].target, second.guests[0].target]
    assert full.parent is None
    assert f"{storeid}:{incremental.parent}" == full.volid
    for volume, result in ((full, first), (incremental, second)):
        assert volume.virtual_size == 4 * MiB
        assert volume.size == result.guests[0].size  # what the backup stored
        assert volume.notes == ""  # the operator's, never generated
    assert incremental.size < full.size  # 64 KiB changed, not the whole disk again
    assert "full" in full.comment and "incremental" in incremental.comment
