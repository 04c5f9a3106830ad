"""Crash injection: ``kill -9`` of ``python -m pvebackup`` at named points of its run.

Each run is killed with SIGKILL at one crash point (``PVEBACKUP_TEST_CRASH_AT``, see
:mod:`pvebackup.kit.crashpoint`), so no ``finally`` block runs. Then:

- at once: no process of the dead run is left (children die with their parent);
- the next backup (or restore) of the same guest succeeds, and after it no process,
  mount, temporary or run-state file of the dead run remains, no ``.tmp-*`` backup
  directory, no orphan volume;
- at the end every snapshot made in between restores identical to the guest as it
  was when the snapshot was taken.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from sample_node import MiB, Node

import pvebackup
from pvebackup.host.guests import NodeRoot
from pvebackup.host.lxc.compare import compare_trees
from pvebackup.host.restore import run_restore
from pvebackup.kit.crashpoint import ENV
from pvebackup.kit.proc import process_start_time

pytestmark = pytest.mark.e2e

SRC = str(Path(pvebackup.__file__).resolve().parents[1])
KILLED = -signal.SIGKILL

VM_POINTS = {
    "bdir": [
        "backup-before-export",
        "backup-export-ready",
        "backup-mid-read",
        "backup-after-index",
        "backup-before-end",
        "backup-after-end",
    ],
    "bstore": [
        "backup-before-export",
        "backup-export-ready",
        "backup-mid-read:3",
        "backup-after-chunks",
        "pack-durable",  # the pack writer thread: a pack put, its index object not yet
        "backup-after-index",
        "backup-before-manifest",
        "backup-after-manifest",
        "backup-after-end",
    ],
}
CT_POINTS = [
    "backup-before-view",
    "backup-view-ready",
    "backup-mid-read:5",
    "backup-after-index",
    "backup-after-end",
]
RESTORE_POINTS = ["restore-after-alloc", "restore-mid-convert", "restore-before-config"]


class CrashNode:
    """A node with a dir storage, a backup-dir and a backup-store storage."""

    def __init__(self, tmp_path: Path) -> None:
        self.base = tmp_path
        self.node = Node(tmp_path / "node")
        self.path = self.node.path
        self.tmp = tmp_path / "tmp"
        self.tmp.mkdir()
        for sub in ("bdir", "bstore", "vz", "other"):
            (self.path / sub).mkdir(exist_ok=True)
        self.node.root.storage_cfg.write_text(
            f"dir: local\n\tpath {self.path}/var/lib/vz\n\tcontent images,rootdir\n\n"
            f"backup-dir: bdir\n\tpath {self.path}/bdir\n\n"
            f"backup-store: bstore\n\tpath {self.path}/bstore\n\tchunk-size 65536\n"
        )
        self.env = {**os.environ, "PYTHONPATH": SRC, "TMPDIR": str(self.tmp)}
        self.env.pop(ENV, None)

    def cli(self, *args: str, crash: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        if crash is not None:
            env[ENV] = crash
        return subprocess.run(
            [sys.executable, "-m", "pvebackup", "--root", str(self.path), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def backup(self, storage: str, vmid: int) -> str:
        """A backup that must succeed; returns its volume id."""
        res = self.cli("backup", "--storage", storage, str(vmid))
        assert res.returncode == 0, res.stderr
        row = next(line for line in res.stdout.splitlines() if line.startswith(f"{vmid} "))
        target = row.split()[-1]
        return target if target.startswith(f"{storage}:") else f"{storage}:{target}"

    def processes(self) -> list[str]:
        """Processes whose command line names a path of this test."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if str(self.base) in cmdline and state != "Z":
                found.append(f"{entry.name}: {cmdline}")
        return found

    def no_processes(self, timeout: float = 3.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while (procs := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return procs

    def leftovers(self) -> list[str]:
        """Everything a finished run must not leave behind."""
        left = self.processes()
        with open("/proc/self/mountinfo") as f:
            left += [line for line in f if str(self.base) in line]
        left += [str(p) for p in self.tmp.iterdir()]
        left += [str(p) for p in (self.path / "bdir").glob("backup/.tmp-*")]
        state = self.node.root.run_dir / "state"
        if state.is_dir():
            left += [str(p) for p in state.iterdir()]
        return left


def crash_then_recover(cn: CrashNode, args: list[str], point: str) -> None:
    res = cn.cli(*args, crash=point)
    assert res.returncode == KILLED, f"{point}: not killed (exit {res.returncode}): {res.stderr}"
    # PDEATHSIG: the children went with the parent, before anybody cleaned up.
    assert cn.no_processes() == [], point
    for state in (cn.node.root.run_dir / "state").glob("*.json"):
        for child in json.loads(state.read_text())["children"]:
            # also those that no longer show a command line while they exit
            deadline = time.monotonic() + 3
            while process_start_time(child["pid"]) == child["start_time"]:
                assert time.monotonic() < deadline, (point, child)
                time.sleep(0.02)


def raw_copy(image: Path, dest: Path) -> Path:
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(dest)], check=True
    )
    return dest


def same_image(restored: Path, expected_raw: Path) -> bool:
    res = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(restored), str(expected_raw)],
        capture_output=True,
        text=True,
    )
    return res.returncode == 0


@pytest.fixture
def crash_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CrashNode:
    cn = CrashNode(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(cn.tmp))  # in-process restores
    return cn


def restored_disk(cn: CrashNode, vmid: int) -> Path:
    text = cn.node.root.config_path(vmid, pvebackup.api.types.GuestType.QEMU).read_text()
    line = next(x for x in text.splitlines() if x.startswith("scsi0:"))
    volname = line.split(":", 2)[2].split(",")[0]
    return cn.node.images / volname


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["bdir", "bstore"])
def test_vm_backup_killed_anywhere(crash_node: CrashNode, storage: str) -> None:
    cn = crash_node
    disk = cn.node.add_vm(100, {"scsi0": 8 * MiB})[0]
    # Data in two places, so that backup-dir (4 MiB reads) reads more than once.
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 5M 1M", str(disk)],
        check=True, capture_output=True,
    )  # fmt: skip
    snapshots = [(cn.backup(storage, 100), raw_copy(disk, cn.base / "expect0.raw"))]
    assert cn.leftovers() == []
    for n, point in enumerate(VM_POINTS[storage], start=1):
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P {0x50 + n} {n * 256}K 512K", str(disk)],
            check=True, capture_output=True,
        )  # fmt: skip
        crash_then_recover(cn, ["backup", "--storage", storage, "100"], point)
        volid = cn.backup(storage, 100)
        assert cn.leftovers() == [], point
        snapshots.append((volid, raw_copy(disk, cn.base / f"expect{n}.raw")))
    for n, (volid, expected) in enumerate(snapshots):
        run_restore(NodeRoot(cn.path), volid, 900 + n, terminal=None)
        assert same_image(restored_disk(cn, 900 + n), expected), volid
    assert cn.leftovers() == []


def tree_copy(cn: CrashNode, dirs: list[Path], n: int) -> list[Path]:
    copies = []
    for i, d in enumerate(dirs):
        dest = cn.base / f"ct{n}-{i}"
        subprocess.run(["cp", "-a", str(d), str(dest)], check=True)
        copies.append(dest)
    return copies


@pytest.mark.slow
def test_container_backup_killed_anywhere(crash_node: CrashNode) -> None:
    cn = crash_node
    dirs = cn.node.add_ct(200)
    for i in range(6):
        (dirs[0] / "etc" / f"file{i}").write_bytes(os.urandom(3000) * 10)
    snapshots = [(cn.backup("bdir", 200), tree_copy(cn, dirs, 0))]
    points = [(p, False) for p in CT_POINTS] + [("backup-view-ready", True)]
    for n, (point, running) in enumerate(points, start=1):
        (dirs[0] / "etc/hostname").write_text(f"ct{n}\n")
        (dirs[1] / "record.txt").write_text(f"data {n}\n")
        marker = cn.node.root.running_marker(200)
        if running:  # copied with rsync instead of bind-mounted
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("")
        crash_then_recover(cn, ["backup", "--storage", "bdir", "200"], point)
        volid = cn.backup("bdir", 200)
        marker.unlink(missing_ok=True)
        assert cn.leftovers() == [], point
        snapshots.append((volid, tree_copy(cn, dirs, n)))
    for n, (volid, expected) in enumerate(snapshots):
        result = run_restore(NodeRoot(cn.path), volid, 800 + n, terminal=None)
        restored = [cn.node.images / v.split(":", 1)[1] for v in result.volumes]
        for want, got in zip(expected, restored, strict=True):
            diffs = compare_trees(want, got)
            # The rootfs's mount point directory is empty in the restored rootfs.
            assert [d for d in diffs if "srv/data" not in d] == [], (volid, diffs)
    assert cn.leftovers() == []


@pytest.mark.parametrize(
    "storage",
    ["bdir", pytest.param("bstore", marks=pytest.mark.slow)],
)
def test_restore_killed_midway_leaves_no_orphan_volume(
    crash_node: CrashNode, storage: str
) -> None:
    cn = crash_node
    disk = cn.node.add_vm(100, {"scsi0": 8 * MiB})[0]
    volid = cn.backup(storage, 100)
    expected = raw_copy(disk, cn.base / "expect.raw")
    images = cn.node.images / "300"
    for point in RESTORE_POINTS:
        crash_then_recover(cn, ["restore", volid, "300"], point)
        assert images.is_dir() and list(images.iterdir()), point  # the orphan it left
        res = cn.cli("restore", volid, "300")
        assert res.returncode == 0, res.stderr
        assert "allocated by the earlier run" in res.stderr
        config = cn.node.root.config_path(300, pvebackup.api.types.GuestType.QEMU)
        assert [p.name for p in images.iterdir()] == [restored_disk(cn, 300).name], point
        assert same_image(restored_disk(cn, 300), expected)
        assert cn.leftovers() == [], point
        # Start over: remove the restored guest like `qm destroy` would.
        config.unlink()
        shutil.rmtree(images)


def test_second_backup_or_restore_of_a_locked_guest_exits_7(crash_node: CrashNode) -> None:
    cn = crash_node
    cn.node.add_vm(100, {"scsi0": 1 * MiB})
    volid = cn.backup("bdir", 100)
    script = (
        "import sys, time\n"
        "from pvebackup.host.guests import NodeRoot\n"
        "from pvebackup.host.runstate import GuestRun\n"
        f"r = GuestRun(NodeRoot({str(cn.path)!r}), 100, action='backup', log=print)\n"
        "r.__enter__(); print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script], env=cn.env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        started = time.monotonic()
        res = cn.cli("backup", "--storage", "bdir", "100")
        assert res.returncode == 7, res.stderr
        assert f"error: guest 100 is locked by PID {holder.pid}" in res.stderr
        assert time.monotonic() - started < 10  # at once, not after waiting
        res = cn.cli("restore", "--force", volid, "100")
        assert res.returncode == 7, res.stderr
        assert f"locked by PID {holder.pid}" in res.stderr
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    assert cn.backup("bdir", 100)  # the lock died with its holder
