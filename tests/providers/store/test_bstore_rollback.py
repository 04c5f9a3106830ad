"""backup-store: a rolled-back store or an edited bitmap record never yields a gap.

Through the host job with real QEMU tools: the host's dirty bitmap was cleared at
backup 2; had the provider built on backup 1 (what the rolled-back or edited store
claims), the writes between 1 and 2 would be missing from backup 3.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from bstore_support import CHUNK, MiB, compare, qemu_write
from test_bstore_host import _node

from pvebackup.host.guests import NodeRoot
from pvebackup.host.job import run_backup_job
from pvebackup.host.restore import run_restore
from pvebackup.storage import lookup, read_storage_config, storage_config

pytestmark = pytest.mark.e2e


def _backup(root: NodeRoot) -> tuple[str, str]:
    result = run_backup_job(root, "store1", [100], terminal=None)
    guest = result.guests[0]
    assert guest.ok, guest.error
    assert guest.target is not None and guest.log_path is not None
    target = guest.target if guest.target.startswith("store1:") else f"store1:{guest.target}"
    return target, guest.log_path.read_text()


def _notes(root: NodeRoot) -> list[str]:
    cfg = read_storage_config(root.storage_cfg)
    plugin = lookup("backup-store")
    return [v.comment for v in plugin.list_volumes(storage_config(cfg, "store1"), "store1")]


def _third_backup_is_full_and_restores(root: NodeRoot, disk: Path, reason: str) -> None:
    qemu_write(disk, 3 * MiB, 4096, 0x62)
    third, log = _backup(root)
    warnings = [line for line in log.splitlines() if " WARN: " in line]
    assert any(reason in line for line in warnings), log
    assert "dirty extents" not in log
    assert _notes(root)[-1].startswith("full"), _notes(root)
    run_restore(root, third, 200, terminal=None)
    restored = next((root.root / "var/lib/vz/images/200").iterdir())
    assert compare(disk, restored).returncode == 0


@pytest.fixture
def vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[NodeRoot, Path]:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return _node(tmp_path / "node")


def test_rolled_back_store_gives_a_full_backup(vm: tuple[NodeRoot, Path], tmp_path: Path) -> None:
    root, disk = vm
    store = tmp_path / "node/store"
    _backup(root)
    saved = tmp_path / "saved"
    shutil.copytree(store, saved, symlinks=True)
    qemu_write(disk, 5 * CHUNK, CHUNK, 0x61)
    _, log = _backup(root)
    assert "dirty extents" in log
    shutil.rmtree(store)
    shutil.copytree(saved, store, symlinks=True)
    _third_backup_is_full_and_restores(root, disk, "storage rolled back")


def test_edited_record_gives_a_full_backup(vm: tuple[NodeRoot, Path], tmp_path: Path) -> None:
    """The record is rewritten to name backup 1, with a matching (unkeyed) checksum:
    all a writer of a plain store can forge."""
    root, disk = vm
    store = tmp_path / "node/store"
    first, _ = _backup(root)
    qemu_write(disk, 5 * CHUNK, CHUNK, 0x61)
    _backup(root)
    path = first.split("backup/vm-", 1)[1]
    vmid, when = path.split("-", 1)
    snap = f"vm/{vmid}/{when}"
    manifest = (store / "snapshots" / snap / "manifest.json").read_bytes()
    body = {"snapshot": snap, "manifest-sha256": hashlib.sha256(manifest).hexdigest(),
            "reason": ""}  # fmt: skip
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    body["mac"] = "sha256:" + hashlib.sha256(canonical).hexdigest()
    record = store / "provider/backup-store/bitmap-base/vm-100.json"
    record.write_text(json.dumps(body))
    _third_backup_is_full_and_restores(root, disk, "this host committed vm/100/")
