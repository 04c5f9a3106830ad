"""Live restore and the running-VM refusal (issue 13).

The end-to-end tests start a real ``qemu-system-x86_64`` (TCG, no guest OS)
through a test start command, restore from backup-store (whose restore source is
a NBD URI served by nbdkit), and play the guest with HMP ``qemu-io`` on the
drive, which reads through the same path as the guest's device.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sample_node import MiB, Node, sh

import pvebackup
from pvebackup.api.errors import (
    ExternalToolError,
    GuestRunningError,
    PveBackupError,
    UnsupportedError,
)
from pvebackup.api.types import GuestType
from pvebackup.host.guests import NodeRoot
from pvebackup.host.job import run_backup_job
from pvebackup.host.qemu import liverestore
from pvebackup.host.qemu.qmp import QmpClient
from pvebackup.host.restore import run_restore
from pvebackup.kit.proc import process_start_time

START_VM = Path(__file__).with_name("liverestore_vm.py")
SIZE = 32 * MiB
SMALL = 4 * MiB


def start_command(root: Path) -> list[str]:
    return [sys.executable, str(START_VM), str(root)]


class LiveNode:
    """A node with a dir storage, a backup-store and a backup-dir storage."""

    def __init__(self, tmp_path: Path) -> None:
        self.node = Node(tmp_path / "node")
        self.path = self.node.path
        self.root: NodeRoot = self.node.root
        (self.path / "bstore").mkdir()
        (self.path / "bdir").mkdir()
        self.root.storage_cfg.write_text(
            f"dir: local\n\tpath {self.path}/var/lib/vz\n\tcontent images,rootdir\n\n"
            f"backup-store: bstore\n\tpath {self.path}/bstore\n\tchunk-size 65536\n\n"
            f"backup-dir: bdir\n\tpath {self.path}/bdir\n"
        )

    def backed_up_vm(self, storage: str, size: int = SIZE) -> tuple[str, Path]:
        """VM 100 with a patterned disk, backed up; (volid, disk image)."""
        (disk,) = self.node.add_vm(100, {"scsi0": size})
        if size == SIZE:
            # Data everywhere (so the copy takes a while), a marker block in the middle.
            sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 32M", str(disk))
            sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 16M 1M", str(disk))
        result = run_backup_job(self.root, storage, [100], terminal=None)
        assert not result.failed
        (guest,) = result.guests
        target = guest.target
        assert target is not None
        return (target if target.startswith(f"{storage}:") else f"{storage}:{target}"), disk

    def restored_images(self, vmid: int) -> list[Path]:
        folder = self.path / "var/lib/vz/images" / str(vmid)
        return sorted(folder.iterdir()) if folder.is_dir() else []

    def qmp(self, vmid: int, cmd: str, **args: Any) -> Any:
        with QmpClient(str(liverestore.qmp_socket(self.root, vmid))) as q:
            return q.execute(cmd, **args)

    def qemu_io(self, vmid: int, drive: str, command: str) -> str:
        """HMP ``qemu-io`` on ``drive``: reads like the guest's device; what it printed."""
        out = self.path / "var/run/qemu-server" / f"{vmid}.out"
        before = out.stat().st_size
        self.qmp(vmid, "human-monitor-command", **{"command-line": f'qemu-io {drive} "{command}"'})
        deadline = time.monotonic() + 5
        while out.stat().st_size == before and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.05)
        return out.read_bytes()[before:].decode(errors="replace")


@pytest.fixture
def live_node(tmp_path: Path) -> Iterator[LiveNode]:
    ln = LiveNode(tmp_path)
    yield ln
    # Stop every VM the test left running (daemonized: not our child), by PID.
    run = ln.path / "var/run/qemu-server"
    for pidfile in run.glob("*.pid") if run.is_dir() else []:
        pid = liverestore.running_vm_pid(ln.root, int(pidfile.stem))
        if pid is not None:
            os.kill(pid, signal.SIGKILL)


def nbdkit_children() -> list[int]:
    """The nbdkit processes this test process started (the provider's restore exports)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().split(b"\0", 1)[0]
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and os.path.basename(cmd) == b"nbdkit":
            found.append(int(entry.name))
    return found


def copy_running(ln: LiveNode, vmid: int, timeout: float = 30.0) -> bool:
    """Wait until the VM runs with the live restore's copy job in progress."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if liverestore.running_vm_pid(ln.root, vmid) is not None:
            try:
                jobs = ln.qmp(vmid, "query-block-jobs")
            except (PveBackupError, OSError):  # not listening yet
                jobs = []
            if any(j.get("offset", 0) > 0 for j in jobs):
                return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_live_restore_runs_the_vm_and_reads_through_during_the_copy(
    live_node: LiveNode,
) -> None:
    ln = live_node
    volid, disk = ln.backed_up_vm("bstore")
    seen: dict[str, Any] = {}

    def guest() -> None:
        # Mid-copy: the VM runs and the device reads the backed-up data, also of
        # blocks not copied yet (the marker block and the end of the disk).
        if not copy_running(ln, 200):
            return
        seen["status"] = ln.qmp(200, "query-status")["status"]
        seen["jobs"] = ln.qmp(200, "query-block-jobs")
        seen["marker"] = ln.qemu_io(200, "drive-scsi0", "read -P 0x5a 16M 1M")
        seen["tail"] = ln.qemu_io(200, "drive-scsi0", "read -P 0x33 31M 1M")
        seen["head"] = ln.qemu_io(200, "drive-scsi0", "read -P 0x33 0 64k")
        seen["wrong"] = ln.qemu_io(200, "drive-scsi0", "read -P 0x33 16M 64k")

    observer = threading.Thread(target=guest)
    observer.start()
    result = run_restore(
        ln.root,
        volid,
        200,
        live=True,
        start_command=start_command(ln.path),
        bwlimit_kib=8 * 1024,  # 32 MiB in ~4 s: time to look while it copies
        terminal=None,
    )
    observer.join()
    assert seen["status"] == "running"
    assert [j["type"] for j in seen["jobs"]] == ["stream"]
    assert seen["jobs"][0]["offset"] < SIZE
    for what in ("marker", "tail", "head"):
        assert "verification failed" not in seen[what], seen[what]
        assert "read " in seen[what], seen[what]
    assert "verification failed" in seen["wrong"]  # the check can fail

    # Done: the VM still runs, nothing reads from the backup, the target equals it.
    assert ln.qmp(200, "query-status")["status"] == "running"
    assert nbdkit_children() == []
    (image,) = ln.restored_images(200)
    assert [str(image.name)] == [Path(v.split(":", 1)[1]).name for v in result.volumes]
    vm = liverestore.running_vm_pid(ln.root, 200)
    assert vm is not None
    ln.qmp(200, "quit")  # QEMU flushes its qcow2 caches: the file is complete
    while process_start_time(vm) is not None:
        time.sleep(0.05)
    info = json.loads(sh("qemu-img", "info", "--output", "json", str(image)))
    assert "backing-filename" not in info
    print(sh("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(image), str(disk)))
    assert f"local:{result.volumes[0].split(':', 1)[1]}" in result.config_path.read_text()


@pytest.mark.slow
def test_live_restore_stops_the_vm_when_the_export_fails(live_node: LiveNode) -> None:
    ln = live_node
    volid, _ = ln.backed_up_vm("bstore")
    killed: list[int] = []
    vm_pid: list[int] = []

    def kill_export() -> None:
        if not copy_running(ln, 200):
            return
        pid = liverestore.running_vm_pid(ln.root, 200)
        assert pid is not None
        vm_pid.append(pid)
        for nbdkit in nbdkit_children():
            os.kill(nbdkit, signal.SIGKILL)
            killed.append(nbdkit)

    observer = threading.Thread(target=kill_export)
    observer.start()
    with pytest.raises(ExternalToolError, match="drive-scsi0"):
        run_restore(
            ln.root,
            volid,
            200,
            live=True,
            start_command=start_command(ln.path),
            bwlimit_kib=2 * 1024,
            terminal=None,
        )
    observer.join()
    assert killed and vm_pid
    # The VM is gone (it must not go on with a half-restored disk), and so is
    # everything the restore made.
    assert process_start_time(vm_pid[0]) is None
    assert liverestore.running_vm_pid(ln.root, 200) is None
    assert ln.restored_images(200) == []
    assert ln.root.guest_type(200) is None
    assert not list((ln.root.run_dir / "state").glob("*"))


def test_restore_onto_a_running_vm_is_refused_also_with_force(live_node: LiveNode) -> None:
    ln = live_node
    volid, _ = ln.backed_up_vm("bdir", SMALL)
    before = ln.root.config_path(100, GuestType.QEMU).read_text()
    images = sorted((ln.path / "var/lib/vz/images/100").iterdir())
    run = ln.path / "var/run/qemu-server"
    run.mkdir(parents=True)
    # A live process (a sleeping child) named by the pid file: VM 100 "runs".
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (run / "100.pid").write_text(f"{sleeper.pid}\n")
        for live in (False, True):
            with pytest.raises(GuestRunningError, match="running"):
                run_restore(ln.root, volid, 100, force=not live, live=live, terminal=None)
        assert ln.root.config_path(100, GuestType.QEMU).read_text() == before
        assert sorted((ln.path / "var/lib/vz/images/100").iterdir()) == images
    finally:
        sleeper.kill()
        sleeper.wait()
    # The same pid file naming a dead process: the VM is stopped, the restore runs.
    result = run_restore(ln.root, volid, 100, force=True, terminal=None)
    assert result.volumes


@pytest.mark.parametrize(
    "content", ["", "abc\n", "0\n", "1\n", "99999999999999999999\n", "12 34\n", "9" * 100]
)
def test_a_pid_file_naming_no_live_process_is_not_running(tmp_path: Path, content: str) -> None:
    root = NodeRoot(tmp_path)
    run = tmp_path / "var/run/qemu-server"
    run.mkdir(parents=True)
    (run / "100.pid").write_text(content)
    assert liverestore.running_vm_pid(root, 100) is None
    (run / "100.pid").write_text(f"{os.getpid()}\n")
    assert liverestore.running_vm_pid(root, 100) == os.getpid()


def test_live_restore_from_a_file_source_is_refused_before_anything_starts(
    live_node: LiveNode,
) -> None:
    ln = live_node
    volid, _ = ln.backed_up_vm("bdir", SMALL)
    marker = ln.path / "started"
    with pytest.raises(UnsupportedError, match="NBD"):
        run_restore(
            ln.root, volid, 200, live=True, start_command=["touch", str(marker)], terminal=None
        )
    assert not marker.exists()
    assert ln.restored_images(200) == []
    assert ln.root.guest_type(200) is None


@pytest.mark.parametrize(
    "source",
    [
        "/var/lib/backup/drive-scsi0.raw",
        'json:{"driver": "qcow2", "file": {"driver": "file", "filename": "/x"}}',
        "nbd+unix:///exp?socket=/s,file.driver=file",  # option injection into -b
        "file:/etc/shadow",
    ],
)
def test_set_backing_accepts_only_nbd_uris(tmp_path: Path, source: str) -> None:
    image = tmp_path / "t.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M")
    with pytest.raises(UnsupportedError):
        liverestore.set_backing(image, source)
    assert "backing-filename" not in json.loads(
        sh("qemu-img", "info", "--output", "json", str(image))
    )


def test_start_command_comes_from_option_then_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(liverestore.START_COMMAND_ENV, raising=False)
    assert liverestore.start_command() == ["qm", "start"]
    monkeypatch.setenv(liverestore.START_COMMAND_ENV, "/usr/local/bin/start 'a b'")
    assert liverestore.start_command() == ["/usr/local/bin/start", "a b"]
    assert liverestore.start_command("my-start --x") == ["my-start", "--x"]
    with pytest.raises(UnsupportedError):
        liverestore.start_command("   ")


@pytest.mark.slow
def test_a_killed_live_restore_is_undone_by_the_next_run(live_node: LiveNode) -> None:
    ln = live_node
    volid, disk = ln.backed_up_vm("bstore")
    src = str(Path(pvebackup.__file__).resolve().parents[1])
    cli = subprocess.Popen(
        [sys.executable, "-m", "pvebackup", "--root", str(ln.path), "restore", "--live",
         "--start-command", " ".join(start_command(ln.path)), "--bwlimit", "1024",
         volid, "200"],
        env={**os.environ, "PYTHONPATH": src},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert copy_running(ln, 200)
        vm = liverestore.running_vm_pid(ln.root, 200)
        assert vm is not None
        cli.kill()  # SIGKILL mid-copy: no finally block runs
        cli.wait()
    finally:
        cli.kill()
        cli.wait()
    assert ln.root.guest_type(200) is not None  # the uncommitted config is left...
    # ...until the next run of guest 200: it kills the VM, removes the config and
    # frees the half-restored volume, then restores (a plain restore here).
    result = run_restore(ln.root, volid, 200, terminal=None)
    assert process_start_time(vm) is None
    (image,) = ln.restored_images(200)
    assert result.volumes == [f"local:200/{image.name}"]
    sh("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(image), str(disk))
