"""backup-dir through the host side, with the real QEMU tools.

The other backup-dir tests drive the provider directly over qemu-nbd; these run
it the way an operator does: `run_backup_job` exports the disks through
qemu-storage-daemon with dirty bitmaps, `run_restore` restores with qemu-img or
extracts the container archive or tree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from pvebackup.api.types import GuestType
from pvebackup.host.guests import NodeRoot
from pvebackup.host.job import JobResult, run_backup_job
from pvebackup.host.lxc.compare import compare_trees
from pvebackup.host.restore import run_restore

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
HOST = 100000  # Proxmox VE's default map for unprivileged containers


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


class Node:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.root = NodeRoot(path)
        for sub in ("qemu-server", "lxc", "firewall"):
            (self.root.pve_dir / sub).mkdir(parents=True, exist_ok=True)
        (path / "plain").mkdir()
        (path / "tree").mkdir()
        self.root.storage_cfg.write_text(
            f"dir: local\n\tpath {path}/vz\n\tcontent images,rootdir\n\n"
            f"backup-dir: plain\n\tpath {path}/plain\n\n"
            f"backup-dir: tree\n\tpath {path}/tree\n\tct-format directory\n"
        )

    def images(self, vmid: int) -> Path:
        return self.path / "vz/images" / str(vmid)

    def add_vm(self, vmid: int, sizes: list[int]) -> list[Path]:
        self.images(vmid).mkdir(parents=True)
        lines = ["name: vm", "memory: 512"]
        disks = []
        for n, size in enumerate(sizes):
            disk = self.images(vmid) / f"vm-{vmid}-disk-{n}.qcow2"
            sh("qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(size))
            sh("qemu-io", "-f", "qcow2", "-c", f"write -P {0x31 + n} 0 1M", str(disk))
            lines.append(f"scsi{n}: local:{vmid}/{disk.name},size={size // MiB}M")
            disks.append(disk)
        self.root.config_path(vmid, GuestType.QEMU).write_text("\n".join(lines) + "\n")
        return disks

    def add_ct(self, vmid: int) -> tuple[Path, Path]:
        rootfs = self.images(vmid) / f"subvol-{vmid}-disk-0.subvol"
        data = self.images(vmid) / f"subvol-{vmid}-disk-1.subvol"
        for d in ("etc", "home/u", "srv/data"):
            (rootfs / d).mkdir(parents=True)
        data.mkdir(parents=True)
        (rootfs / "etc/hostname").write_text("ct\n")
        (rootfs / "home/u/notes").write_text("notes\n")
        os.symlink("../etc/hostname", rootfs / "home/u/link")
        os.link(rootfs / "etc/hostname", rootfs / "etc/hardlink")
        os.mkfifo(rootfs / "etc/fifo")
        os.setxattr(rootfs / "home/u/notes", "user.tag", b"blue")
        (data / "db").write_bytes(os.urandom(100_000))
        for p in [rootfs, data, *rootfs.rglob("*"), *data.rglob("*")]:
            owner = HOST + (1000 if "home/u" in str(p) else 0)
            os.lchown(p, owner, owner)
        mp_root = data.stat()  # what the container sees on /srv/data
        os.chown(rootfs / "srv/data", mp_root.st_uid, mp_root.st_gid)
        os.utime(rootfs / "srv/data", ns=(mp_root.st_atime_ns, mp_root.st_mtime_ns))
        self.root.config_path(vmid, GuestType.LXC).write_text(
            f"hostname: ct\nunprivileged: 1\n"
            f"rootfs: local:{vmid}/{rootfs.name},size=0T\n"
            f"mp0: local:{vmid}/{data.name},mp=/srv/data,backup=1,size=0T\n"
        )
        return rootfs, data


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Node:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return Node(tmp_path / "node")


def backup(node: Node, storeid: str, vmid: int, **kwargs: object) -> tuple[str, str]:
    """Back up one guest; returns its volid and its task log."""
    result: JobResult = run_backup_job(
        node.root,
        storeid,
        [vmid],
        terminal=None,
        **kwargs,  # type: ignore[arg-type]
    )
    guest = result.guests[0]
    assert guest.ok, guest.error
    assert guest.target is not None and guest.log_path is not None
    return guest.target, guest.log_path.read_text()


def same_image(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)]).returncode == 0


def test_vm_full_incremental_restore(node: Node, tmp_path: Path) -> None:
    disks = node.add_vm(100, [8 * MiB, 4 * MiB])
    first, log = backup(node, "plain", 100)
    assert len(re.findall(r"drive-scsi\d: exported .* bitmap mode new", log)) == 2

    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 5M 64k", str(disks[0]))
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x78 3M 4k", str(disks[1]))
    expected = [tmp_path / f"expected-{n}.qcow2" for n in range(2)]
    for disk, copy in zip(disks, expected, strict=True):
        shutil.copyfile(disk, copy)
    second, log = backup(node, "plain", 100)
    assert len(re.findall(r"drive-scsi\d: exported .* bitmap mode reuse", log)) == 2

    # the incremental is a small qcow2 on top of the full one
    volname = second.split(":", 1)[1]
    increment = node.path / "plain" / volname / "drive-scsi0.qcow2"
    assert increment.stat().st_size < 1 * MiB
    info = subprocess.run(["qemu-img", "info", str(increment)], capture_output=True, text=True)
    assert first.split("/")[-1] in info.stdout  # backing file: the first backup

    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 64k", str(disks[0]))  # after backup
    run_restore(node.root, second, 200, terminal=None)
    restored = sorted(node.images(200).glob("*.qcow2"))
    assert len(restored) == 2
    assert all(same_image(e, r) for e, r in zip(expected, restored, strict=True))


def test_missing_base_means_a_full_backup(node: Node) -> None:
    disks = node.add_vm(100, [4 * MiB])
    first, _ = backup(node, "plain", 100)
    shutil.rmtree(node.path / "plain" / first.split(":", 1)[1])  # lost behind our back
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x44 2M 4k", str(disks[0]))
    second, log = backup(node, "plain", 100)
    assert "bitmap mode reuse" not in log
    volname = second.split(":", 1)[1]
    image = node.path / "plain" / volname / "drive-scsi0.qcow2"
    info = subprocess.run(["qemu-img", "info", str(image)], capture_output=True, text=True)
    assert "backing file" not in info.stdout
    run_restore(node.root, second, 201, terminal=None)
    assert same_image(disks[0], next(node.images(201).glob("*.qcow2")))


@pytest.mark.slow
@pytest.mark.serial
def test_bandwidth_limit_holds_through_the_host(node: Node) -> None:
    disk = node.add_vm(100, [16 * MiB])[0]
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x12 0 12M", str(disk))
    _, log = backup(node, "plain", 100, bwlimit_kib=4096)  # 4 MiB/s: about 3 s
    final = [line for line in log.splitlines() if "100%" in line and "MiB/s" in line]
    assert final, log
    rate = float(re.findall(r"([\d.]+) MiB/s", final[-1])[-1])
    assert 3.6 <= rate <= 4.4, final[-1]


@pytest.mark.parametrize(("storeid", "mechanism"), [("plain", "tar"), ("tree", "directory")])
def test_container_restore_by_tar_and_by_directory(
    node: Node, storeid: str, mechanism: str
) -> None:
    rootfs, data = node.add_ct(101)
    volid, log = backup(node, storeid, 101)
    assert "mp0 (/srv/data)" in log
    stored = node.path / storeid / volid.split(":", 1)[1]
    assert (stored / "root.tar.zst").is_file() == (mechanism == "tar")
    assert (stored / "root").is_dir() == (mechanism == "directory")
    run_restore(node.root, volid, 301, terminal=None)
    new_rootfs = node.images(301) / "subvol-301-disk-0.subvol"
    new_data = node.images(301) / "subvol-301-disk-1.subvol"
    assert compare_trees(rootfs, new_rootfs) == []
    assert compare_trees(data, new_data) == []
    assert (new_rootfs / "home/u/notes").stat().st_uid == HOST + 1000
    assert os.getxattr(new_rootfs / "home/u/notes", "user.tag") == b"blue"


def test_raw_disk_with_a_4k_extent_and_an_efi_disk(node: Node) -> None:
    """Discards of a raw disk's lone 4 KiB extent must not kill the export.

    QEMU 7.2's copy-before-write asserts on discards not aligned to 64 KiB; a raw
    image reports its first 4 KiB as data even when it holds only zeros.
    """
    images = node.images(100)
    images.mkdir(parents=True)
    for name, fmt, size in (
        ("vm-100-disk-0.raw", "raw", 4 * MiB),
        ("vm-100-disk-1.qcow2", "qcow2", 4 * MiB),
    ):
        sh("qemu-img", "create", "-q", "-f", fmt, str(images / name), str(size))
    node.root.config_path(100, GuestType.QEMU).write_text(
        "bios: ovmf\n"  # PVE backs up an EFI disk only with OVMF
        "efidisk0: local:100/vm-100-disk-1.qcow2,efitype=4m,size=4M\n"
        "tpmstate0: local:100/vm-100-disk-0.raw,size=4M,version=v2.0\n"
    )
    volid, log = backup(node, "plain", 100)
    assert "exited unexpectedly" not in log
    run_restore(node.root, volid, 200, terminal=None)
    restored = sorted(node.images(200).iterdir())
    assert len(restored) == 2
    assert same_image(images / "vm-100-disk-1.qcow2", restored[0])
    assert same_image(images / "vm-100-disk-0.raw", restored[1])
