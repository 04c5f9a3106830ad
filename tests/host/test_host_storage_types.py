"""Guests on the storage types real nodes use, end to end with real tools.

What this machine runs for real: ``btrfs`` on a loop-mounted file system (a VM
disk backed up from one btrfs storage and restored onto another, allocated as a
subvolume with ``disk.raw``), a passthrough block device (a loop device, opened
by QEMU as ``host_device``), and the refusals for container volumes on block
storages. LVM needs device-mapper, which this kernel may lack: the lvm, zfs and
rbd command lines are tested against fake tools in tests/storage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from recording_provider import RecordingPlugin
from sample_node import MiB, Node, sh

from btrfs_loop import btrfs_mounted, is_subvolume
from pvebackup.api.errors import UnsupportedError
from pvebackup.api.types import GuestType
from pvebackup.host.guests import CtConfig, VmConfig
from pvebackup.host.job import run_backup_job
from pvebackup.host.restore import run_restore
from pvebackup.host.runstate import GuestRun
from pvebackup.storage import GuestVolume, GuestVolumeStorage, read_storage_config, registry
from pvebackup.storage.guestvol import next_disk_name
from pvebackup.storage.plugin import COMMON_PROPERTIES, PropertyKind, PropertySpec

pytestmark = pytest.mark.e2e


def _try(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@pytest.fixture
def btrfs_mount(tmp_path: Path) -> Iterator[Path]:
    with btrfs_mounted(tmp_path) as mnt:
        yield mnt


def _node(tmp_path: Path, extra_cfg: str) -> Node:
    node = Node(tmp_path / "node")
    with open(node.root.storage_cfg, "a") as f:
        f.write("\n" + extra_cfg)
    return node


@pytest.mark.usefixtures("job_tmpdir")
def test_vm_on_btrfs_backed_up_and_restored_onto_another_btrfs(
    tmp_path: Path, btrfs_mount: Path
) -> None:
    cfg = (
        f"btrfs: bt1\n\tpath {btrfs_mount}/bt1\n\tcontent images,rootdir\n\n"
        f"btrfs: bt2\n\tpath {btrfs_mount}/bt2\n\tcontent images,rootdir\n"
    )
    with registry.registered(RecordingPlugin):
        node = _node(tmp_path, cfg)
        plugin = registry.lookup("btrfs")
        scfg = {"type": "btrfs", "path": f"{btrfs_mount}/bt1", "content": "images"}
        # Allocate the source disk as PVE would: a subvolume holding disk.raw.
        volname = plugin.next_volname(scfg, "bt1", 100, "raw")  # type: ignore[attr-defined]
        assert volname == "100/vm-100-disk-0.raw"
        plugin.allocate(scfg, "bt1", 100, "raw", 4 * MiB, volname)  # type: ignore[attr-defined]
        disk = btrfs_mount / "bt1/images/100/vm-100-disk-0/disk.raw"
        sh("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 512k", str(disk))
        node.root.config_path(100, GuestType.QEMU).write_text(
            "name: vm\nmemory: 512\nscsi0: bt1:100/vm-100-disk-0.raw,size=4M\n"
        )
        job = run_backup_job(node.root, "rec", [100], terminal=None)
        assert not job.failed, job.guests

        # onto another btrfs storage: allocated there with `btrfs subvolume create`
        run_restore(node.root, "rec:qemu-100-000", 200, target_storage="bt2", terminal=None)
        config = node.root.load_guest(200)
        assert isinstance(config, VmConfig)
        assert [d.spec.volid for d in config.disks] == ["bt2:200/vm-200-disk-0.raw"]
        restored = btrfs_mount / "bt2/images/200/vm-200-disk-0/disk.raw"
        assert is_subvolume(restored.parent)
        sh("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(disk), str(restored))

        # without --storage: back onto the storage the disk came from
        run_restore(node.root, "rec:qemu-100-000", 201, terminal=None)
        again = btrfs_mount / "bt1/images/201/vm-201-disk-0/disk.raw"
        sh("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(disk), str(again))

        # --force over 201 frees the replaced guest's subvolume with btrfs
        run_restore(
            node.root, "rec:qemu-100-000", 201, target_storage="bt2", force=True, terminal=None
        )
        assert not (btrfs_mount / "bt1/images/201").exists()

        # a container onto btrfs: its directories are subvolumes
        node.add_ct(101)
        assert not run_backup_job(node.root, "rec", [101], terminal=None).failed
        run_restore(node.root, "rec:lxc-101-000", 301, target_storage="bt2", terminal=None)
        ct = node.root.load_guest(301)
        assert isinstance(ct, CtConfig)
        assert [m.spec.volid for m in ct.mountpoints] == [
            "bt2:301/subvol-301-disk-0.subvol",
            "bt2:301/subvol-301-disk-1.subvol",
        ]
        rootfs = btrfs_mount / "bt2/images/301/subvol-301-disk-0.subvol"
        assert is_subvolume(rootfs)
        assert (rootfs / "etc/hostname").read_text() == "ct\n"


@pytest.mark.usefixtures("job_tmpdir")
def test_passthrough_block_device_is_opened_as_host_device(tmp_path: Path) -> None:
    """``scsi0: /dev/loopN``: QEMU's ``file`` driver refuses devices; we read it."""
    backing = tmp_path / "dev.img"
    with open(backing, "wb") as f:
        f.truncate(4 * MiB)
    sh("qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 1M", str(backing))
    res = _try("losetup", "--find", "--show", str(backing))
    if res.returncode != 0:
        pytest.skip(f"no loop devices here: {res.stderr.strip()}")
    loop = res.stdout.strip()
    try:
        with registry.registered(RecordingPlugin):
            node = _node(tmp_path, "")
            node.root.config_path(100, GuestType.QEMU).write_text(
                f"name: vm\nmemory: 512\nscsi0: {loop},size=4M\n"
            )
            job = run_backup_job(node.root, "rec", [100], terminal=None)
            assert not job.failed, job.guests
            stored = next(node.backup_dir.glob("qemu-100-*/drive-scsi0.raw"))
            assert stored.read_bytes() == backing.read_bytes()
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


THIN = "lvmthin: thin\n\tvgname pve\n\tthinpool data\n\tcontent images,rootdir\n"


@pytest.mark.usefixtures("job_tmpdir")
def test_container_volumes_on_block_storages_are_refused_cleanly(tmp_path: Path) -> None:
    with registry.registered(RecordingPlugin):
        node = _node(tmp_path, THIN)
        node.add_ct(101, mp=False)
        assert not run_backup_job(node.root, "rec", [101], terminal=None).failed
        # onto lvmthin: PVE would mkfs an ext4 in a raw LV; we refuse before
        # running any lvm tool, and nothing is left behind
        with pytest.raises(UnsupportedError, match="'thin' .*cannot hold container dir"):
            run_restore(node.root, "rec:lxc-101-000", 300, target_storage="thin", terminal=None)
        assert node.root.guest_type(300) is None

        # a container whose rootfs is an LV fails its backup with the reason
        node.root.config_path(102, GuestType.LXC).write_text(
            "hostname: ct\nrootfs: thin:vm-102-disk-0,size=1G\n"
        )
        result = run_backup_job(node.root, "rec", [102], terminal=None)
        (guest,) = result.guests
        assert not guest.ok
        assert guest.error is not None and "not mounting its file system" in guest.error

        # the container's own storage ('local') is an lvmthin now: without --storage
        # the restore warns and uses a storage that holds directories ('other')
        text = node.root.storage_cfg.read_text().replace(
            f"dir: local\n\tpath {node.path}/var/lib/vz\n", "lvmthin: local\n\tvgname pve\n"
            "\tthinpool data\n"
        )
        node.root.storage_cfg.write_text(text)
        log = tmp_path / "restore.log"
        with open(log, "w") as terminal:
            run_restore(node.root, "rec:lxc-101-000", 301, terminal=terminal)
        ct = node.root.load_guest(301)
        assert isinstance(ct, CtConfig)
        assert [m.spec.volid for m in ct.mountpoints] == ["other:301/subvol-301-disk-0.subvol"]
        assert "storage 'local' (type lvmthin) cannot hold rootdir" in log.read_text()


class ThickLike(GuestVolumeStorage):
    """A raw-only block-like storage whose new volumes hold old data, as a thick LV
    does: files under ``path`` named ``vm-<vmid>-disk-<n>``, allocated full of 0xAA."""

    type = "test-thick"
    properties = {**COMMON_PROPERTIES, "path": PropertySpec(PropertyKind.PATH, required=True)}
    image_formats = ("raw",)
    zeroed_images = False

    def _dir(self, scfg: Mapping[str, str]) -> Path:
        return Path(scfg["path"])

    def guest_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> GuestVolume:
        return GuestVolume(str(self._dir(scfg) / volname), "raw", "file")

    def volume_exists(self, scfg: Mapping[str, str], storeid: str, volname: str) -> bool:
        return (self._dir(scfg) / volname).exists()

    def next_volname(self, scfg: Mapping[str, str], storeid: str, vmid: int, fmt: str) -> str:
        self.check_format(storeid, fmt)
        return next_disk_name(os.listdir(self._dir(scfg)), vmid)

    def allocate(
        self, scfg: Mapping[str, str], storeid: str, vmid: int, fmt: str, size: int, volname: str
    ) -> str:
        (self._dir(scfg) / volname).write_bytes(b"\xaa" * size)
        return volname

    def free(self, scfg: Mapping[str, str], storeid: str, volname: str) -> None:
        (self._dir(scfg) / volname).unlink()


@pytest.mark.usefixtures("job_tmpdir")
def test_restore_onto_a_storage_whose_new_volumes_are_not_zeroed(tmp_path: Path) -> None:
    """A thick LV holds its extents' old data: zero areas must be written too."""
    thick = tmp_path / "thick"
    thick.mkdir()
    with registry.registered(RecordingPlugin), registry.registered(ThickLike):
        node = _node(tmp_path, f"test-thick: thick\n\tpath {thick}\n\tcontent images\n")
        (disk,) = node.add_vm(100, {"scsi0": 4 * MiB})  # 1 MiB of data, 3 MiB of zeroes
        assert not run_backup_job(node.root, "rec", [100], terminal=None).failed
        run_restore(node.root, "rec:qemu-100-000", 200, target_storage="thick", terminal=None)
        config = node.root.load_guest(200)
        assert isinstance(config, VmConfig)
        assert [d.spec.volid for d in config.disks] == ["thick:vm-200-disk-0"]
        sh("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(disk),
           str(thick / "vm-200-disk-0"))  # fmt: skip
        # --force: the replaced guest's vm-200-... volume is its own and is freed
        result = run_restore(
            node.root, "rec:qemu-100-000", 200, target_storage="thick", force=True, terminal=None
        )
        assert result.removed == ["thick:vm-200-disk-0"]
        assert sorted(os.listdir(thick)) == ["vm-200-disk-1"]


def _no_lvm() -> str | None:
    """Why LVM cannot run on this machine, or None."""
    if shutil.which("lvcreate") is None:
        return "lvm2 is not installed"
    try:
        os.close(os.open("/dev/mapper/control", os.O_RDWR))
    except OSError as exc:
        return f"no device-mapper in this kernel (/dev/mapper/control: {exc.strerror})"
    return None


@pytest.fixture
def thin_vg(tmp_path: Path) -> Iterator[str]:
    """A volume group with a thin pool ``data`` on a loop device (where LVM runs)."""
    why = _no_lvm()
    if why is not None:
        pytest.skip(f"LVM-thin not testable here: {why}")
    backing = tmp_path / "pv.img"
    with open(backing, "wb") as f:
        f.truncate(192 * MiB)
    loop = sh("losetup", "--find", "--show", str(backing)).strip()
    vg = f"pvbtest{os.getpid()}"
    try:
        sh("pvcreate", "-q", loop)
        sh("vgcreate", "-q", vg, loop)
        sh("lvcreate", "-q", "--type", "thin-pool", "-L", "96M", "-n", "data", vg)
        yield vg
    finally:
        _try("vgremove", "-f", vg)
        _try("pvremove", "-f", loop)
        _try("losetup", "-d", loop)


@pytest.mark.usefixtures("job_tmpdir")
def test_vm_on_lvmthin_backed_up_and_restored_onto_lvmthin(tmp_path: Path, thin_vg: str) -> None:
    cfg = "".join(
        f"lvmthin: {sid}\n\tvgname {thin_vg}\n\tthinpool data\n\tcontent images\n\n"
        for sid in ("t1", "t2")
    )
    with registry.registered(RecordingPlugin):
        node = _node(tmp_path, cfg)
        plugin = registry.lookup("lvmthin")
        assert isinstance(plugin, GuestVolumeStorage)
        scfg = {"type": "lvmthin", "vgname": thin_vg, "thinpool": "data"}
        volname = plugin.next_volname(scfg, "t1", 100, "raw")
        plugin.allocate(scfg, "t1", 100, "raw", 4 * MiB, volname)
        disk = f"/dev/{thin_vg}/{volname}"
        sh("qemu-io", "-f", "raw", "-c", "write -P 0x6b 1M 512k", disk)
        node.root.config_path(100, GuestType.QEMU).write_text(
            f"name: vm\nmemory: 512\nscsi0: t1:{volname},size=4M\n"
        )
        assert not run_backup_job(node.root, "rec", [100], terminal=None).failed
        run_restore(node.root, "rec:qemu-100-000", 200, target_storage="t2", terminal=None)
        config = node.root.load_guest(200)
        assert isinstance(config, VmConfig)
        assert [d.spec.volid for d in config.disks] == ["t2:vm-200-disk-0"]
        sh("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", disk,
           f"/dev/{thin_vg}/vm-200-disk-0")  # fmt: skip


@pytest.mark.usefixtures("job_tmpdir")
def test_a_killed_restore_s_btrfs_volume_is_freed_by_the_next_run(
    tmp_path: Path, btrfs_mount: Path
) -> None:
    with registry.registered(RecordingPlugin):
        node = _node(tmp_path, f"btrfs: bt1\n\tpath {btrfs_mount}/bt1\n\tcontent images\n")
        plugin = registry.lookup("btrfs")
        assert isinstance(plugin, GuestVolumeStorage)
        scfg = {"type": "btrfs", "path": f"{btrfs_mount}/bt1"}
        plugin.allocate(scfg, "bt1", 100, "raw", MiB, "100/vm-100-disk-0.raw")
        # what a restore killed after the allocation left in its state file
        state = node.root.run_dir / "state/100.json"
        state.parent.mkdir(parents=True)
        state.write_text(json.dumps({
            "pid": 4242, "action": "restore", "children": [], "dirs": [],
            "volumes": ["bt1:100/vm-100-disk-0.raw", "bt1:100/vm-100-disk-7.raw"],
        }))  # fmt: skip
        logs: list[str] = []
        cfg = read_storage_config(node.root.storage_cfg)
        with GuestRun(node.root, 100, action="backup", log=lambda _, m: logs.append(m), cfg=cfg):
            pass
        assert not (btrfs_mount / "bt1/images/100").exists()  # subvolume deleted
        assert any("freed volume bt1:100/vm-100-disk-0.raw" in m for m in logs)
        assert not any("disk-7" in m for m in logs)  # never allocated: nothing to say
