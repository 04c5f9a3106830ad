"""Backup jobs (pvebackup.host.job) with the recording provider and real QEMU tools."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest
from recording_provider import call_names, read_calls
from sample_node import MiB, Node, sh

from pvebackup.api.errors import GuestNotFoundError, PluginError, UnsupportedError
from pvebackup.host.job import run_backup_job

pytestmark = pytest.mark.e2e

PER_GUEST_VM = [
    "backup_start",
    "backup_get_mechanism",
    "backup_get_target",
    "backup_guest_config",
]


def bitmaps(path: Path) -> list[str]:
    info = json.loads(sh("qemu-img", "info", "--output=json", str(path)))
    data = info.get("format-specific", {}).get("data", {})
    return sorted(b["name"] for b in data.get("bitmaps", []))


def no_daemons_left(node: Node) -> bool:
    out = subprocess.run(
        ["pgrep", "-f", f"qemu-storage-daemon.*{node.path.parent}"], capture_output=True
    )
    return out.returncode == 1


def test_vm_full_then_incremental_call_order_and_extents(node: Node) -> None:
    disks = node.add_vm(100, {"scsi0": 4 * MiB, "virtio1": 2 * MiB})
    (node.root.firewall_path(100)).write_text("[OPTIONS]\nenable: 1\n")
    terminal = io.StringIO()
    result = run_backup_job(node.root, "rec", [100], bwlimit_kib=4096, terminal=terminal)

    assert not result.failed
    (guest,) = result.guests
    assert guest.target == "rec:qemu-100-000"
    assert guest.size is not None and guest.size > 0
    assert call_names(node.backup_dir) == [
        "job_start",
        *PER_GUEST_VM,
        "backup_firewall_config",
        "backup_nbd",
        "read_extents",
        "backup_nbd",
        "read_extents",
        "backup_end",
        "backup_handle_log_file",
        "backup_get_task_size",
        "job_end",
    ]
    calls = read_calls(node.backup_dir)
    nbd_calls = [c for c in calls if c[0] == "backup_nbd"]
    assert [c[2] for c in nbd_calls] == ["drive-scsi0", "drive-virtio1"]
    assert {c[3] for c in nbd_calls} == {"new"}
    assert all(c[5] == 4096 * 1024 for c in nbd_calls)  # KiB/s -> bytes/s
    assert calls[0][1] == result.start_time
    # the config handed over is a copy of the main section
    conf_call = next(c for c in calls if c[0] == "backup_guest_config")
    assert conf_call[2] != str(node.root.config_path(100, "qemu"))  # type: ignore[arg-type]
    stored = node.backup_dir / "qemu-100-000"
    assert "scsi0: local:100/vm-100-disk-0.qcow2" in (stored / "guest.conf").read_text()
    assert (stored / "fw.conf").read_text() == "[OPTIONS]\nenable: 1\n"
    for disk, dev in zip(disks, ("drive-scsi0", "drive-virtio1"), strict=True):
        sh("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(disk),
           str(stored / f"{dev}.raw"))
        assert bitmaps(disk) == [b for b in bitmaps(disk) if "next" not in b]
        assert len(bitmaps(disk)) == 1
    # task log: host lines and the provider's own messages, also on the terminal
    log_text = (node.root.log_dir / "qemu-100.log").read_text()
    assert "INFO: Starting Backup of VM 100 (qemu)" in log_text
    assert "INFO: drive-scsi0: reading 4194304 bytes" in log_text
    assert (stored / "task.log").read_text() == log_text
    assert "INFO: drive-scsi0: reading 4194304 bytes" in terminal.getvalue()

    # change both disks, back up again: reuse, only the dirty extents are read
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x55 1M 64k", str(disks[0]))
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x66 0 64k", str(disks[1]))
    result2 = run_backup_job(node.root, "rec", [100], terminal=None)
    assert not result2.failed
    calls = read_calls(node.backup_dir)[len(calls):]
    assert {c[3] for c in calls if c[0] == "backup_nbd"} == {"reuse"}
    extents = {c[2]: c[3] for c in calls if c[0] == "read_extents"}
    assert extents == {"drive-scsi0": [[MiB, 64 * 1024]], "drive-virtio1": [[0, 64 * 1024]]}
    stored2 = node.backup_dir / "qemu-100-001"
    for disk, dev in zip(disks, ("drive-scsi0", "drive-virtio1"), strict=True):
        sh("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(disk),
           str(stored2 / f"{dev}.raw"))
    assert no_daemons_left(node)


def test_failing_guest_is_aborted_and_job_goes_on(node: Node) -> None:
    node.add_vm(100, {"scsi0": 2 * MiB})
    node.add_vm(102, {"scsi0": 2 * MiB})
    node.set_provider_options(**{"fail-vmid": "100"})
    result = run_backup_job(node.root, "rec", None, terminal=None)

    assert [g.vmid for g in result.failed] == [100]
    assert "injected failure for 100" in (result.failed[0].error or "")
    assert result.guests[1].ok
    names = call_names(node.backup_dir)
    first = names.index("backup_abort")
    assert names[first - 1] == "read_extents"
    assert names[first + 1] == "backup_handle_log_file"
    assert "backup_end" not in names[:first]
    assert names[-1] == "job_end" and "job_abort" not in names
    # a failed guest gets no task size, the successful one does
    sizes = [c for c in read_calls(node.backup_dir) if c[0] == "backup_get_task_size"]
    assert [c[1] for c in sizes] == [102]
    assert "ERROR: Backup of VM 100 failed" in (node.root.log_dir / "qemu-100.log").read_text()
    assert not list(node.backup_dir.glob(".staging-*"))
    # the new bitmap of the failed backup was dropped: next time again a full read
    node.set_provider_options()
    run_backup_job(node.root, "rec", [100], terminal=None)
    modes = [c[3] for c in read_calls(node.backup_dir) if c[0] == "backup_nbd"]
    assert modes[-1] == "new"


def test_job_start_failure_calls_job_abort(node: Node) -> None:
    node.add_vm(100, {"scsi0": 1 * MiB})
    node.set_provider_options(**{"fail-job-start": "1"})
    with pytest.raises(PluginError, match="job_start refused"):
        run_backup_job(node.root, "rec", [100], terminal=None)
    calls = read_calls(node.backup_dir)
    assert [c[0] for c in calls] == ["job_start", "job_abort"]
    assert "job_start refused" in calls[1][1]


def test_mechanism_mismatch_fails_the_guest(node: Node) -> None:
    node.add_vm(100, {"scsi0": 1 * MiB})
    node.set_provider_options(**{"mechanism-qemu": "directory"})
    result = run_backup_job(node.root, "rec", [100], terminal=None)
    (guest,) = result.failed
    assert "mechanism 'directory'" in (guest.error or "")
    assert call_names(node.backup_dir) == [
        "job_start",
        "backup_start",
        "backup_get_mechanism",
        "backup_abort",
        "backup_handle_log_file",
        "job_end",
    ]


def test_unreadable_config_fails_only_that_guest(node: Node) -> None:
    node.add_vm(100, {"scsi0": 1 * MiB}, extra="garbage line\n")
    node.add_vm(102, {"scsi0": 1 * MiB})
    result = run_backup_job(node.root, "rec", [100, 102], terminal=None)
    assert [g.vmid for g in result.failed] == [100]
    conf = node.root.config_path(100, "qemu")  # type: ignore[arg-type]
    assert f"{conf}:5: cannot parse line" in (result.failed[0].error or "")
    abort = next(c for c in read_calls(node.backup_dir) if c[0] == "backup_abort")
    assert abort[1] == 100 and f"{conf}:5" in abort[2]
    assert [c[1] for c in read_calls(node.backup_dir) if c[0] == "backup_end"] == [102]


def test_storage_without_provider_is_an_error(node: Node) -> None:
    node.add_vm(100, {"scsi0": 1 * MiB})
    with pytest.raises(UnsupportedError, match="storage 'local' .*has no backup provider"):
        run_backup_job(node.root, "local", [100], terminal=None)


def test_unknown_vmid_fails_before_the_job(node: Node) -> None:
    with pytest.raises(GuestNotFoundError, match="999"):
        run_backup_job(node.root, "rec", [999], terminal=None)
    assert call_names(node.backup_dir) == []


def test_raw_disk_gets_no_bitmap(node: Node) -> None:
    node.add_vm(100, {"scsi0": 1 * MiB}, fmt="raw")
    result = run_backup_job(node.root, "rec", [100], terminal=None)
    assert not result.failed
    nbd_call = next(c for c in read_calls(node.backup_dir) if c[0] == "backup_nbd")
    assert nbd_call[3] == "none" and nbd_call[4] is None


def test_disks_excluded_by_config_are_not_exported(node: Node) -> None:
    node.add_vm(100, {"scsi0": 1 * MiB, "scsi1": 1 * MiB})
    conf = node.root.config_path(100, "qemu")  # type: ignore[arg-type]
    conf.write_text(conf.read_text().replace("size=1M", "size=1M,backup=0", 1)
                    + "ide2: none,media=cdrom\n")
    result = run_backup_job(node.root, "rec", [100], terminal=None)
    assert not result.failed
    devices = [c[2] for c in read_calls(node.backup_dir) if c[0] == "backup_nbd"]
    assert devices == ["drive-scsi1"]
    assert "exclude disk 'scsi0'" in (node.root.log_dir / "qemu-100.log").read_text()
