"""host.runstate: the per-guest lock, and cleaning up what a killed run left."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from sample_node import MiB, Node

from pvebackup.api.errors import LockedError
from pvebackup.host.runstate import GuestRun, mounts_below
from pvebackup.kit import proc
from pvebackup.storage import read_storage_config

pytestmark = pytest.mark.usefixtures("recording_plugin")

Logs = list[tuple[str, str]]


def guest_run(node: Node, logs: Logs, vmid: int = 100) -> GuestRun:
    cfg = read_storage_config(node.root.storage_cfg)
    return GuestRun(
        node.root, vmid, action="backup", log=lambda lvl, msg: logs.append((lvl, msg)), cfg=cfg
    )


def test_second_run_of_a_guest_is_refused_at_once(tmp_path: Path) -> None:
    node = Node(tmp_path / "node")
    with guest_run(node, []):
        with pytest.raises(LockedError, match=r"guest 100 is locked by PID \d+"):
            guest_run(node, []).__enter__()
        with guest_run(node, [], vmid=101):
            pass  # another guest is not affected
    with guest_run(node, []):
        pass  # released on exit


def test_recording_lists_children_and_dirs_while_they_exist(tmp_path: Path) -> None:
    node = Node(tmp_path / "node")
    with guest_run(node, []) as run, run.recording():
        workdir = proc.private_dir("w-", tmp_path)
        child = proc.spawn(["sleep", "30"])
        state = json.loads(run.state_path.read_text())
        assert state["dirs"] == [str(workdir)]
        assert [(c["pid"], c["program"]) for c in state["children"]] == [(child.pid, "sleep")]
        child.stop(0)
        assert json.loads(run.state_path.read_text())["children"] == []
    assert not run.state_path.exists()  # a clean exit leaves no state


def test_next_run_removes_what_a_dead_run_left(tmp_path: Path) -> None:
    node = Node(tmp_path / "node")
    node.add_vm(100, {"scsi0": 1 * MiB})
    images = node.images / "100"
    orphan_vol = images / "vm-100-disk-5.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(orphan_vol), "1M"], check=True)
    tmp = tmp_path / "tmp"
    workdir = tmp / "pvebackup-100-dead"
    (workdir / "view/root").mkdir(parents=True)
    guest_files = tmp_path / "guest-rootfs"
    guest_files.mkdir()
    (guest_files / "precious").write_text("the guest's own file\n")
    subprocess.run(["mount", "--bind", str(guest_files), str(workdir / "view/root")], check=True)
    qsd_dir = tmp / "pvebackup-qsd-dead"
    qsd_dir.mkdir()
    (qsd_dir / "qmp.sock").write_text("")
    orphan = subprocess.Popen(["sleep", "30"])  # plays the orphaned qemu-storage-daemon
    bystander = subprocess.Popen(["sleep", "30"])  # a recycled PID: other start time
    try:
        start = proc.process_start_time(orphan.pid)
        other = proc.process_start_time(bystander.pid)
        assert start is not None and other is not None
        state = {
            "pid": 4242,
            "action": "backup",
            "children": [
                {"pid": orphan.pid, "start_time": start, "program": "sleep",
                 "run_dir": str(qsd_dir)},
                {"pid": bystander.pid, "start_time": other - 1, "program": "sleep",
                 "run_dir": None},
            ],
            "dirs": [str(workdir)],
            "volumes": ["local:100/vm-100-disk-5.qcow2", "local:100/vm-100-disk-0.qcow2",
                        "local:100/vm-100-disk-9.qcow2"],
        }  # fmt: skip
        state_path = node.root.run_dir / "state/100.json"
        state_path.parent.mkdir(parents=True)
        state_path.write_text(json.dumps(state))
        logs: Logs = []
        with guest_run(node, logs):
            assert orphan.wait(5) < 0  # killed
            assert bystander.poll() is None  # same PID, other start time: left alone
            assert mounts_below(workdir) == []
            assert not workdir.exists() and not qsd_dir.exists()
            assert (guest_files / "precious").exists()  # unmounted before removal
            assert not orphan_vol.exists()
            assert (images / "vm-100-disk-0.qcow2").exists()  # the config uses it
        warnings = [msg for lvl, msg in logs if lvl == "warn"]
        assert any("PID 4242" in m for m in warnings)
        assert any(f"killed sleep (PID {orphan.pid})" in m for m in warnings)
        assert any(f"unmounted {workdir}/view/root" in m for m in warnings)
        assert any(f"removed {workdir}" in m for m in warnings)
        assert any("freed volume local:100/vm-100-disk-5.qcow2" in m for m in warnings)
        assert not any("disk-0" in m or "disk-9" in m for m in warnings)
        assert not state_path.exists()
    finally:
        for p in (orphan, bystander):
            p.kill()
            p.wait()
        for target in mounts_below(workdir):
            subprocess.run(["umount", "-l", target], check=False)


def test_a_mount_that_stays_keeps_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # If unmounting fails, removing the directory would delete the guest's files.
    node = Node(tmp_path / "node")
    workdir = tmp_path / "tmp/pvebackup-100-dead"
    (workdir / "root").mkdir(parents=True)
    guest_files = tmp_path / "guest"
    guest_files.mkdir()
    (guest_files / "precious").write_text("x")
    subprocess.run(["mount", "--bind", str(guest_files), str(workdir / "root")], check=True)
    try:
        state_path = node.root.run_dir / "state/100.json"
        state_path.parent.mkdir(parents=True)
        state_path.write_text(json.dumps({"pid": 1, "dirs": [str(workdir)]}))

        def refuse(target: str) -> None:
            raise OSError(16, "Device or resource busy", target)

        monkeypatch.setattr("pvebackup.host.runstate._detach", refuse)
        logs: Logs = []
        with pytest.raises(Exception, match="could not remove everything"):
            guest_run(node, logs).__enter__()
        assert (guest_files / "precious").exists()
        assert state_path.exists()  # kept for the next try
    finally:
        subprocess.run(["umount", "-l", str(workdir / "root")], check=False)


def test_mounts_are_found_through_a_symlinked_path(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "work/root").mkdir(parents=True)
    os.symlink(real, tmp_path / "link")
    source = tmp_path / "src"
    source.mkdir()
    subprocess.run(["mount", "--bind", str(source), str(real / "work/root")], check=True)
    try:
        assert mounts_below(tmp_path / "link/work") == [str(real / "work/root")]
    finally:
        subprocess.run(["umount", "-l", str(real / "work/root")], check=False)
