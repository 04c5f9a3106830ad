"""``pvebackup backup --all`` on a node whose guests live on a dir and an
lvmthin-like storage (btrfs here: a real btrfs on a loop device; LVM needs
device-mapper, which this kernel lacks), then restores, all through the CLI.

VM 100: qcow2 on ``dir`` (stopped). VM 101: raw on ``btrfs`` (a subvolume with
``disk.raw``), running in qemu-system-x86_64 started as qemu-server 9 starts it
(``-blockdev``). CT 102: its rootfs a btrfs subvolume. Only real plugins: the CLI
runs in a child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import pvebackup
from btrfs_loop import btrfs_mounted, is_subvolume
from pvebackup.api.types import GuestType
from pvebackup.host.guests import NodeRoot
from pvebackup.storage import registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))
from live_vm import LiveVm  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MiB = 1024 * 1024
SIZE = 8 * MiB
SRC = str(Path(pvebackup.__file__).resolve().parents[1])


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pvebackup", "--root", str(root), *args],
        env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_backup_all_on_dir_and_btrfs_then_restore(tmp_path: Path) -> None:
    with btrfs_mounted(tmp_path) as mnt:
        path = tmp_path / "node"
        root = NodeRoot(path)
        for sub in ("qemu-server", "lxc"):
            (root.pve_dir / sub).mkdir(parents=True)
        (path / "bdir").mkdir()
        root.storage_cfg.write_text(
            f"dir: local\n\tpath {path}/var/lib/vz\n\tcontent images,rootdir\n\n"
            f"btrfs: local-btrfs\n\tpath {mnt}/pve\n\tcontent images,rootdir\n\n"
            f"backup-dir: bdir\n\tpath {path}/bdir\n"
        )
        (path / "etc").mkdir(exist_ok=True)
        (path / "etc/vzdump.conf").write_text("# as the installer leaves it\nstorage: bdir\n")

        # VM 100 on dir
        vz = path / "var/lib/vz/images/100"
        vz.mkdir(parents=True)
        sh("qemu-img", "create", "-q", "-f", "qcow2", str(vz / "vm-100-disk-0.qcow2"), "4M")
        sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x10 0 2M", str(vz / "vm-100-disk-0.qcow2"))
        root.config_path(100, GuestType.QEMU).write_text(
            "name: on-dir\nmemory: 512\nscsi0: local:100/vm-100-disk-0.qcow2,size=4M\n"
        )
        # VM 101 on btrfs, running; allocated as PVE does (a subvolume with disk.raw)
        bt = registry.lookup("btrfs")
        scfg = {"type": "btrfs", "path": f"{mnt}/pve", "content": "images,rootdir"}
        bt.allocate(scfg, "local-btrfs", 101, "raw", SIZE, "101/vm-101-disk-0.raw")  # type: ignore[attr-defined]
        disk101 = mnt / "pve/images/101/vm-101-disk-0/disk.raw"
        sh("qemu-io", "-f", "raw", "-c", f"write -P 0x21 0 {SIZE}", str(disk101))
        root.config_path(101, GuestType.QEMU).write_text(
            "name: on-btrfs\nmemory: 512\nscsi0: local-btrfs:101/vm-101-disk-0.raw,size=8M\n"
        )
        # CT 102 on a btrfs subvolume
        bt.allocate(scfg, "local-btrfs", 102, "subvol", 0, "102/subvol-102-disk-0.subvol")  # type: ignore[attr-defined]
        rootfs = mnt / "pve/images/102/subvol-102-disk-0.subvol"
        (rootfs / "etc").mkdir()
        (rootfs / "etc/hostname").write_text("ct102\n")
        root.config_path(102, GuestType.LXC).write_text(
            "hostname: ct102\nrootfs: local-btrfs:102/subvol-102-disk-0.subvol,size=0T\n"
        )

        vm = LiveVm(root, 101, disk101, fmt="raw", blockdev=True)
        try:
            before = vm.graph()

            def guest() -> None:
                vm.wait_exports()
                vm.write(0x99, 0, MiB)  # after backup start: not in the backup

            writer = threading.Thread(target=guest)
            writer.start()
            res = cli(path, "backup", "--all", "--output", "json")  # storage: vzdump.conf
            writer.join()
            assert res.returncode == 0, res.stderr[-3000:]
            assert vm.graph() == before and vm.status() == "running"
        finally:
            vm.stop()
        report = json.loads(res.stdout)
        assert [(g["vmid"], g["vmtype"], g["ok"]) for g in report["guests"]] == [
            (100, "qemu", True), (101, "qemu", True), (102, "lxc", True),
        ]  # fmt: skip
        assert "VM is running (PID" in Path(report["guests"][1]["log"]).read_text()
        targets = {g["vmid"]: g["target"] for g in report["guests"]}

        # Restores: each onto its own kind of storage, as the backup's config says.
        for vmid, new in ((100, 200), (101, 201), (102, 202)):
            res = cli(path, "restore", targets[vmid], str(new))
            assert res.returncode == 0, res.stderr[-3000:]
        img200 = path / "var/lib/vz/images/200/vm-200-disk-0.qcow2"
        sh("qemu-img", "compare", "-q", str(vz / "vm-100-disk-0.qcow2"), str(img200))
        img201 = mnt / "pve/images/201/vm-201-disk-0/disk.raw"
        assert is_subvolume(img201.parent)
        assert img201.read_bytes() == bytes([0x21]) * SIZE  # as at backup start
        ct = mnt / "pve/images/202/subvol-202-disk-0.subvol"
        assert is_subvolume(ct)
        assert (ct / "etc/hostname").read_text() == "ct102\n"
