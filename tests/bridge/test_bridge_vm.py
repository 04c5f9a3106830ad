"""VM backups through the helper, as a Proxmox VE 8.4+ node makes them: full,
incremental and restore, against backup-dir and backup-store, over real NBD
exports with dirty bitmaps (and the file-handle mechanism through nbdfuse)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bridge_client import BridgeError, Helper
from pve_emulation import MiB, make_disk, restore_vm, same_image, vm_backup, write

from pvebackup.store.keys import create_key_file

pytestmark = pytest.mark.e2e

VMID = 100
CONFIG = "name: bridged\nmemory: 512\nscsi0: local:100/vm-100-disk-0.qcow2,size=4M\n"
FIREWALL = "[OPTIONS]\nenable: 1\n"
PASSPHRASE = "correct horse battery staple 7f3a"


def _hello(kind: str, tmp: Path) -> dict[str, Any]:
    storage = tmp / "storage"
    storage.mkdir(exist_ok=True)
    scfg: dict[str, Any] = {"path": str(storage)}
    if kind == "backup-store":
        scfg["chunk-size"] = "65536"
    return {"storeid": "ext", "plugin-type": kind, "scfg": scfg, "state-dir": str(tmp / "state")}


def _job(helper: Helper) -> None:
    helper.call("job_init", start_time=int(time.time()))


@pytest.mark.parametrize("kind", ["backup-dir", "backup-store"])
def test_vm_full_incremental_restore(
    kind: str, tmp_path: Path, spawn: Callable[..., Helper]
) -> None:
    hello = _hello(kind, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    disks = {
        "drive-scsi0": make_disk(tmp_path / "disk0.qcow2", 4 * MiB, 0x41),
        "drive-virtio1": make_disk(tmp_path / "disk1.qcow2", 1 * MiB, 0x42),
    }

    helper = spawn()
    helper.hello(**hello)
    _job(helper)
    first = vm_backup(helper, VMID, disks, "ext", work, guest_config=CONFIG, firewall=FIREWALL)
    helper.call("job_cleanup")
    assert helper.bye() == 0
    # first backup: the provider names a bitmap, qemu has none yet -> "new"
    assert first["answer"] == {"drive-scsi0": "new", "drive-virtio1": "new"}
    assert first["modes"] == {"drive-scsi0": "new", "drive-virtio1": "new"}
    snapshot1 = {dev: shutil.copy(p, tmp_path / f"{dev}.v1.qcow2") for dev, p in disks.items()}

    write(disks["drive-scsi0"], 3 * MiB, 64 * 1024, 0x77)
    helper = spawn()
    helper.hello(**hello)
    _job(helper)
    second = vm_backup(helper, VMID, disks, "ext", work, guest_config=CONFIG)
    helper.call("job_cleanup")
    volumes = helper.call("pvebackup_list_volumes", vmid=VMID)
    assert helper.bye() == 0
    # the bitmap of the first (successful) backup is used: incremental
    assert second["answer"] == {"drive-scsi0": "use", "drive-virtio1": "use"}
    assert second["modes"] == {"drive-scsi0": "reuse", "drive-virtio1": "reuse"}
    by_name = {v["volid"].split(":", 1)[1]: v for v in volumes}
    assert by_name[second["archive-name"]]["parent"] == first["archive-name"]
    assert 0 < second["size"] < first["size"]

    helper = spawn()
    helper.hello(**hello)
    assert helper.call("archive_get_guest_config", volname=first["archive-name"]) == CONFIG
    assert helper.call("archive_get_firewall_config", volname=first["archive-name"]) == FIREWALL
    assert helper.call("archive_get_firewall_config", volname=second["archive-name"]) is None
    for volname, expected in ((first["archive-name"], snapshot1), (second["archive-name"], disks)):
        out = tmp_path / f"restore-{len(volname)}-{volname[-6:].replace('/', '_')}"
        out.mkdir()
        restored = restore_vm(helper, volname, out)
        assert set(restored) == set(disks)
        for dev, raw in restored.items():
            assert same_image(Path(expected[dev]), raw), (volname, dev)
    assert helper.bye() == 0


def test_vm_failed_backup_is_not_a_base(tmp_path: Path, spawn: Callable[..., Helper]) -> None:
    """After a failed guest backup the bitmap is recreated (``new``), never reused."""
    hello = _hello("backup-dir", tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    disks = {"drive-scsi0": make_disk(tmp_path / "disk0.qcow2", 1 * MiB, 0x41)}
    helper = spawn()
    helper.hello(**hello)
    _job(helper)
    vm_backup(helper, VMID, disks, "ext", work, guest_config=CONFIG)
    # a second backup that fails in backup_vm (a device the export does not have)
    helper.call("backup_init", vmid=VMID, vmtype="qemu", start_time=int(time.time()))
    helper.call("backup_get_mechanism", vmid=VMID, vmtype="qemu")
    sizes = {"drive-scsi0": {"size": MiB}}
    answer = helper.call("backup_vm_query_incremental", vmid=VMID, volumes=sizes)
    assert answer == {"drive-scsi0": "use"}
    with pytest.raises(BridgeError):
        helper.call("backup_vm", vmid=VMID, guest_config=CONFIG, info={}, volumes={
            "drive-scsi0": {"size": MiB, "bitmap-mode": "reuse", "bitmap-name": "x",
                            "nbd-path": str(tmp_path / "no-such-socket")},
        })  # fmt: skip
    assert helper.call("backup_cleanup", vmid=VMID, vmtype="qemu", success=0,
                       info={"error": "backup_vm failed"}) == {}  # fmt: skip
    third = vm_backup(helper, VMID, disks, "ext", work, guest_config=CONFIG)
    helper.call("job_cleanup")
    assert helper.bye() == 0
    assert third["answer"] == {"drive-scsi0": "new"}
    assert third["modes"] == {"drive-scsi0": "new"}


def test_vm_file_handle_mechanism(tmp_path: Path, spawn: Callable[..., Helper]) -> None:
    """``file-handle``: the provider reads the nbdfuse file through the helper,
    full and then only the dirty regions, and the restore is exact."""
    if not Path("/dev/fuse").exists() or shutil.which("nbdfuse") is None:
        pytest.skip("needs /dev/fuse and nbdfuse")
    hello = {**_hello("backup-store", tmp_path), "vm-mechanism": "file-handle"}
    work = tmp_path / "work"
    work.mkdir()
    disks = {"drive-scsi0": make_disk(tmp_path / "disk0.qcow2", 4 * MiB, 0x51)}
    helper = spawn()
    helper.hello(**hello)
    _job(helper)
    vm_backup(helper, VMID, disks, "ext", work, guest_config=CONFIG, file_handle=True)
    write(disks["drive-scsi0"], 1 * MiB, 128 * 1024, 0x66)
    second = vm_backup(helper, VMID, disks, "ext", work, guest_config=CONFIG, file_handle=True)
    helper.call("job_cleanup")
    assert second["modes"] == {"drive-scsi0": "reuse"}
    text = helper.log_text()
    # the full backup read the whole disk through the handle, the incremental one
    # only the dirty region qemu's bitmap named (what nbdinfo --map gave)
    assert "read 4.0 MiB" in text and "read 128.0 KiB" in text, text
    out = tmp_path / "restore"
    out.mkdir()
    restored = restore_vm(helper, second["archive-name"], out)
    assert same_image(disks["drive-scsi0"], restored["drive-scsi0"])
    assert helper.bye() == 0


def test_passphrase_only_through_hello(tmp_path: Path, spawn: Callable[..., Helper]) -> None:
    """A protected key is unlocked with the passphrase from hello; it shows up
    in no response, log line or stderr, also when it is wrong."""
    key = tmp_path / "store.key"
    create_key_file(key, PASSPHRASE, scrypt_n=2**10)
    hello = _hello("backup-store", tmp_path)
    hello["scfg"]["encryption-key"] = str(key)
    work = tmp_path / "work"
    work.mkdir()
    disks = {"drive-scsi0": make_disk(tmp_path / "disk0.qcow2", 1 * MiB, 0x61)}

    helper = spawn()
    helper.hello(**hello, secrets={"passphrase": PASSPHRASE})
    _job(helper)
    done = vm_backup(helper, VMID, disks, "ext", work, guest_config=CONFIG)
    helper.call("job_cleanup")
    out = tmp_path / "restore"
    out.mkdir()
    restored = restore_vm(helper, done["archive-name"], out)
    assert same_image(disks["drive-scsi0"], restored["drive-scsi0"])
    assert helper.bye() == 0
    assert PASSPHRASE.encode() not in helper.all_output()

    wrong = PASSPHRASE + " but wrong"
    helper = spawn()
    helper.hello(**hello, secrets={"passphrase": wrong})
    with pytest.raises(BridgeError) as err:
        helper.call("archive_get_guest_config", volname=done["archive-name"])
    assert err.value.type == "WrongKeyError"
    assert helper.bye() == 0
    assert wrong.encode() not in helper.all_output()
    assert PASSPHRASE.encode() not in helper.all_output()
