"""Live backups of a running VM through its own QEMU (issue 13), end to end.

Real qemu-system-x86_64 (TCG, no guest OS) started as Proxmox VE starts a VM; the
"guest" writes through its device with HMP qemu-io; the backup-dir provider.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_vm import FakeAgent, LiveVm
from sample_node import MiB, Node, sh

import pvebackup
from pvebackup.api.types import GuestType
from pvebackup.host.job import run_backup_job
from pvebackup.host.restore import run_restore
from pvebackup.kit.crashpoint import ENV

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
SIZE = 32 * MiB
A, B = 0xAA, 0xBB
SRC = str(Path(pvebackup.__file__).resolve().parents[1])


def _bdir(node: Node) -> None:
    # Only real plugins: the CLI runs in a child process without the test's plugin.
    (node.path / "bdir").mkdir(exist_ok=True)
    node.root.storage_cfg.write_text(
        f"dir: local\n\tpath {node.path}/var/lib/vz\n\tcontent images,rootdir\n\n"
        f"backup-dir: bdir\n\tpath {node.path}/bdir\n"
    )


@pytest.fixture
def vm(node: Node) -> Iterator[LiveVm]:
    _bdir(node)
    (disk,) = node.add_vm(100, {"scsi0": SIZE})
    sh("qemu-io", "-f", "qcow2", "-c", f"write -P {A} 0 {SIZE}", str(disk))
    running = LiveVm(node.root, 100, disk)
    try:
        yield running
    finally:
        running.stop()


def restored_bytes(node: Node, target: str, vmid: int) -> bytes:
    run_restore(node.root, target, vmid, terminal=None, force=True)
    (img,) = (node.images / str(vmid)).iterdir()
    raw = img.with_suffix(".raw")
    sh("qemu-img", "convert", "-O", "raw", str(img), str(raw))
    data = raw.read_bytes()
    raw.unlink()
    return data


def write_everything(vm: LiveVm, pattern: int) -> None:
    for off in range(0, SIZE, MiB):
        vm.write(pattern, off, MiB)


def test_live_backup_sees_backup_start_while_the_guest_writes(node: Node, vm: LiveVm) -> None:
    before = vm.graph()
    assert node.root.is_running(100)

    def guest() -> None:
        vm.wait_exports()
        write_everything(vm, B)

    writer = threading.Thread(target=guest)
    writer.start()
    first = run_backup_job(node.root, "bdir", [100], bwlimit_kib=16 * 1024, terminal=None)
    writer.join()
    assert not first.failed, first.guests
    log = first.guests[0].log_path
    assert log is not None and "backup mode snapshot" in log.read_text()
    assert vm.status() == "running"
    assert vm.graph() == before  # filter, fleecing node, exports all gone; device on its node
    assert vm.read_ok(B, 0, SIZE)
    target = first.guests[0].target
    assert target is not None
    assert restored_bytes(node, target, 200) == bytes([A]) * SIZE

    # The next backup is incremental and holds the guest's writes.
    vm.write(0xCC, 3 * MiB, 64 * 1024)
    second = run_backup_job(node.root, "bdir", [100], terminal=None)
    assert not second.failed, second.guests
    assert second.guests[0].log_path is not None
    assert "bitmap mode reuse" in second.guests[0].log_path.read_text()
    target = second.guests[0].target
    assert target is not None
    want = bytearray([B]) * SIZE
    want[3 * MiB : 3 * MiB + 64 * 1024] = bytes([0xCC]) * 64 * 1024
    assert restored_bytes(node, target, 201) == bytes(want)
    assert vm.graph() == before


def _cli(node: Node, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pvebackup", "--root", str(node.path), *args],
        env={**os.environ, "PYTHONPATH": SRC, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_killed_live_backup_leaves_the_vm_as_it_was(node: Node, vm: LiveVm, how: str) -> None:
    before = vm.graph()
    first = run_backup_job(node.root, "bdir", [100], terminal=None)  # bitmap exists now
    assert not first.failed, first.guests
    if how == "SIGKILL":
        p = _cli(node, "backup", "100", "--storage", "bdir", env={ENV: "backup-export-ready"})
        p.communicate(timeout=60)
        assert p.returncode == -signal.SIGKILL
        assert vm.graph() != before  # our filter is still in the running VM
    else:
        # Dirty data to read, or the incremental (nothing changed) may end before the
        # signal comes: 16 MiB at 256 KiB/s keeps it busy for a minute, so the signal
        # lands mid-copy even on a loaded machine (the run ends at the signal).
        vm.write(0xCC, 0, 16 * MiB)
        p = _cli(node, "backup", "100", "--storage", "bdir", "--bwlimit", "256")
        try:
            vm.wait_exports()
        except AssertionError:
            p.kill()
            raise AssertionError(p.communicate()) from None
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130, err
        assert vm.graph() == before
    assert vm.status() == "running"
    vm.write(0xDD, 5 * MiB, 64 * 1024)
    nxt = run_backup_job(node.root, "bdir", [100], terminal=None)
    assert not nxt.failed, nxt.guests
    text = nxt.guests[0].log_path.read_text()  # type: ignore[union-attr]
    if how == "SIGKILL":
        assert "bitmap mode new" in text  # the killed run's bitmap is not trusted
    else:
        assert "bitmap mode reuse" in text  # SIGTERM merged B+next back: nothing lost
    assert vm.graph() == before
    assert vm.status() == "running"
    state = node.root.run_dir / "state" / "100.json"
    assert not state.exists()
    target = nxt.guests[0].target
    assert target is not None
    want = bytearray([A]) * SIZE
    if how == "SIGTERM":
        want[0 : 16 * MiB] = bytes([0xCC]) * 16 * MiB
    want[5 * MiB : 5 * MiB + 64 * 1024] = bytes([0xDD]) * 64 * 1024
    assert restored_bytes(node, target, 202) == bytes(want)


def test_guest_agent_freezes_around_the_switch_and_a_hanging_one_times_out(
    node: Node, vm: LiveVm
) -> None:
    cfg = node.root.config_path(100, GuestType.QEMU)
    cfg.write_text(cfg.read_text() + "agent: 1\n")
    qga = node.root.qemu_run_dir / "100.qga"
    agent = FakeAgent(qga)
    try:
        res = run_backup_job(node.root, "bdir", [100], terminal=None)
    finally:
        agent.close()
    assert not res.failed, res.guests
    assert agent.commands == ["guest-sync", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    qga.unlink()

    hanging = FakeAgent(qga, hang=True)
    started = time.monotonic()
    try:
        res = run_backup_job(node.root, "bdir", [100], terminal=None)
    finally:
        hanging.close()
    assert not res.failed, res.guests
    assert time.monotonic() - started < 60
    text = res.guests[0].log_path.read_text()  # type: ignore[union-attr]
    assert "no answer within" in text and "without freezing" in text
    assert vm.status() == "running"


def test_suspend_and_stop_modes(node: Node, vm: LiveVm, tmp_path: Path) -> None:
    before = vm.graph()
    res = run_backup_job(node.root, "bdir", [100], mode="suspend", terminal=None)
    assert not res.failed, res.guests
    assert vm.status() == "running" and vm.graph() == before
    text = res.guests[0].log_path.read_text()  # type: ignore[union-attr]
    assert "backup mode suspend" in text

    # No guest OS answers ACPI: the shutdown times out and the guest fails, VM untouched.
    res = run_backup_job(
        node.root, "bdir", [100], mode="stop", stop_wait=0.02, terminal=None
    )
    assert res.failed and "did not shut down" in str(res.guests[0].error)
    assert vm.status() == "running"

    # A VM that does shut down: backed up offline, then started by the start command.
    marker = tmp_path / "started"
    os.kill(vm.pid, 0)
    killer = threading.Timer(0.5, lambda: os.kill(vm.pid, signal.SIGTERM))
    killer.start()
    res = run_backup_job(
        node.root, "bdir", [100], mode="stop", stop_wait=0.5, terminal=None,
        start_command=["sh", "-c", f'echo "$0" > {marker}'],
    )  # fmt: skip
    killer.join()
    assert not res.failed, res.guests
    assert marker.read_text().strip() == "100"
    assert not node.root.is_running(100)
    target = res.guests[0].target
    assert target is not None
    assert restored_bytes(node, target, 203) == bytes([A]) * SIZE


def test_unknown_layout_fails_that_guest_and_leaves_the_vm_alone(node: Node, vm: LiveVm) -> None:
    before = vm.graph()
    cfg = node.root.config_path(100, GuestType.QEMU)
    # The config names a second disk the running QEMU does not have.
    extra = node.image(100, "vm-100-disk-9.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(extra), str(MiB))
    cfg.write_text(cfg.read_text() + "virtio1: local:100/vm-100-disk-9.qcow2,size=1M\n")
    res = run_backup_job(node.root, "bdir", [100], terminal=None)
    assert res.failed
    assert "drive-virtio1: the running VM has no drive of that name" in str(res.guests[0].error)
    assert vm.graph() == before and vm.status() == "running"


def test_a_vm_paused_by_its_owner_stays_paused(node: Node, vm: LiveVm) -> None:
    vm.qmp.execute("stop")
    for mode in ("snapshot", "suspend"):
        res = run_backup_job(node.root, "bdir", [100], mode=mode, terminal=None)
        assert not res.failed, res.guests
        assert vm.status() == "paused", mode


def test_fleecing_on_a_storage_and_its_leftovers_after_sigkill(node: Node, vm: LiveVm) -> None:
    before = vm.graph()
    vz = node.path / "var/lib/vz"
    p = _cli(
        node, "backup", "100", "--storage", "bdir", "--fleecing", "storage=local",
        env={ENV: "backup-export-ready"},
    )  # fmt: skip
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    # On the named storage as Proxmox VE names it, allocated through the storage.
    fleece = vz / "images/100/vm-100-fleece-0.qcow2"
    assert fleece.is_file()
    assert vm.graph() != before
    res = run_backup_job(node.root, "bdir", [100], fleecing_storage="local", terminal=None)
    assert not res.failed, res.guests
    text = res.guests[0].log_path.read_text()  # type: ignore[union-attr]
    # fleece-0 again: the killed run's image was freed (its record) before this one
    assert "fleecing image local:100/vm-100-fleece-0.qcow2 (qcow2) allocated" in text
    assert sorted(p.name for p in (vz / "images/100").iterdir()) == ["vm-100-disk-0.qcow2"]
    assert vm.graph() == before and vm.status() == "running"


def test_cli_rejects_a_malformed_fleecing_option(node: Node) -> None:
    _bdir(node)
    p = _cli(node, "backup", "100", "--storage", "bdir", "--fleecing", "local")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and b"storage=STOREID" in err


def test_mode_from_vzdump_conf_and_the_cli_wins(node: Node, vm: LiveVm) -> None:
    (node.path / "etc/vzdump.conf").write_text("mode: suspend\n")
    p = _cli(node, "backup", "100", "--storage", "bdir")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0 and b"backup mode suspend" in err, err[-2000:]
    p = _cli(node, "backup", "100", "--storage", "bdir", "--mode", "snapshot")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0 and b"backup mode snapshot" in err, err[-2000:]


def test_a_failing_set_up_puts_everything_back_and_leaves_the_vms_own_nbd_server(
    node: Node, vm: LiveVm, tmp_path: Path
) -> None:
    # The VM already serves NBD (as during a migration): our nbd-server-start fails
    # after the filter is in place.
    own = tmp_path / "own-nbd.sock"
    vm.qmp.execute("nbd-server-start", addr={"type": "unix", "data": {"path": str(own)}})
    before = vm.graph()
    res = run_backup_job(node.root, "bdir", [100], terminal=None)
    assert res.failed and "nbd-server-start" in str(res.guests[0].error)
    assert vm.graph() == before and vm.status() == "running"
    assert own.exists()  # the VM's own server still runs
    assert not (node.root.run_dir / "state" / "100.json").exists()
    vm.qmp.execute("nbd-server-stop")
    ok = run_backup_job(node.root, "bdir", [100], terminal=None)
    assert not ok.failed, ok.guests
    # The failed run's new bitmap was removed: this one is a full backup again.
    assert "bitmap mode new" in ok.guests[0].log_path.read_text()  # type: ignore[union-attr]
