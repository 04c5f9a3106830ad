"""Restores (pvebackup.host.restore) and container backups, end to end.

A VM with two qcow2 disks and a container with a mount point are backed up,
changed, backed up again (the VM incrementally), and restored to new VMIDs; the
restores must equal what the guests held at the second backup.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from recording_provider import RecordingProvider, call_names, read_calls
from sample_node import MiB, Node, sh

from pvebackup.api.errors import ExternalToolError, GuestExistsError, NotFoundError
from pvebackup.api.types import GuestType
from pvebackup.host.guests import CtConfig, VmConfig
from pvebackup.host.job import run_backup_job
from pvebackup.host.lxc.compare import compare_trees
from pvebackup.host.restore import run_restore

pytestmark = pytest.mark.e2e


def snapshot_tree(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    # --modify-window=-1: otherwise rsync leaves directory mtimes unset when the
    # copy happens within the same second as the last change
    sh("rsync", "-aHAX", "--numeric-ids", "--modify-window=-1", f"{src}/", f"{dst}/")


@pytest.mark.parametrize("mechanism", ["tar", "directory"])
def test_backup_change_incremental_restore(node: Node, tmp_path: Path, mechanism: str) -> None:
    node.set_provider_options(**{"restore-mechanism": mechanism})
    disks = node.add_vm(100, {"scsi0": 4 * MiB, "scsi1": 2 * MiB})
    rootfs, data = node.add_ct(101, extra="unprivileged: 1\n")
    for d in (rootfs, data):
        for dirpath, dirnames, filenames in os.walk(d):
            for name in [".", *dirnames, *filenames]:
                os.lchown(os.path.join(dirpath, name), 100000, 100000)
    os.lchown(data / "record.txt", 100033, 100033)
    os.symlink("../etc/hostname", rootfs / "srv/link")
    os.lchown(rootfs / "srv/link", 100000, 100000)
    os.link(rootfs / "etc/hostname", rootfs / "etc/hostname.hard")
    node.root.firewall_path(101).write_text("[OPTIONS]\nenable: 0\n")

    first = run_backup_job(
        node.root, "rec", [100, 101], exclude_paths=["/var/cache/**"], terminal=None
    )
    assert not first.failed
    ct_call = next(c for c in read_calls(node.backup_dir) if c[0] == "backup_directory")
    assert ct_call[3] == [["u", "0", "100000", "65536"], ["g", "0", "100000", "65536"]]
    assert ct_call[4] == ["/var/cache/**"]
    assert ct_call[5] == [".", "./srv/data"]
    tree = node.backup_dir / "lxc-101-000/tree"
    assert (tree / "srv/data/record.txt").stat().st_uid == 33  # container ids stored
    assert not (tree / "var/cache/junk.tmp").exists()

    # change the guests, back up again
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 2M 128k", str(disks[0]))
    (rootfs / "etc/hostname").write_text("changed\n")
    (data / "new.txt").write_text("new\n")
    os.lchown(data / "new.txt", 101000, 101000)
    expected_vm = tmp_path / "expected-vm"
    expected_vm.mkdir()
    for disk in disks:
        shutil.copyfile(disk, expected_vm / disk.name)
    expected_ct = tmp_path / "expected-ct"
    snapshot_tree(rootfs, expected_ct / "rootfs")
    snapshot_tree(data, expected_ct / "data")
    # the directory the mount point is mounted on is hidden by the mount: the
    # restore recreates it in the rootfs with what the container saw there
    mp_dir, mp_root = expected_ct / "rootfs/srv/data", data.stat()
    os.chown(mp_dir, mp_root.st_uid, mp_root.st_gid)
    os.chmod(mp_dir, mp_root.st_mode & 0o7777)
    os.utime(mp_dir, ns=(mp_root.st_atime_ns, mp_root.st_mtime_ns))
    second = run_backup_job(node.root, "rec", [100, 101], terminal=None)
    assert not second.failed
    modes = [c[3] for c in read_calls(node.backup_dir) if c[0] == "backup_nbd"]
    assert modes == ["new", "new", "reuse", "reuse"]

    # change the originals after the backup: the restore must not see this
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 64k", str(disks[1]))
    (data / "after.txt").write_text("after the backup\n")

    vm = run_restore(node.root, "rec:qemu-100-001", 200, terminal=None)
    assert vm.vmtype == GuestType.QEMU
    config = node.root.load_guest(200)
    assert isinstance(config, VmConfig)
    assert [d.spec.volid for d in config.disks] == [
        "local:200/vm-200-disk-0.qcow2",
        "local:200/vm-200-disk-1.qcow2",
    ]
    assert config.disks[0].spec.option("size") == "4M"
    for n, disk in enumerate(disks):
        sh("qemu-img", "compare", "-q", str(expected_vm / disk.name),
           str(node.image(200, f"vm-200-disk-{n}.qcow2")))
    assert not node.root.firewall_path(200).exists()

    ct = run_restore(node.root, "rec:lxc-101-001", 201, target_storage="other", terminal=None)
    cconf = node.root.load_guest(201)
    assert isinstance(cconf, CtConfig)
    assert [m.spec.volid for m in cconf.mountpoints] == [
        "other:201/subvol-201-disk-0.subvol",
        "other:201/subvol-201-disk-1.subvol",
    ]
    assert ct.volumes == [m.spec.volid for m in cconf.mountpoints]
    other = node.path / "var/lib/other/images/201"
    assert compare_trees(expected_ct / "rootfs", other / "subvol-201-disk-0.subvol") == []
    assert compare_trees(expected_ct / "data", other / "subvol-201-disk-1.subvol") == []
    assert node.root.firewall_path(201).read_text() == "[OPTIONS]\nenable: 0\n"
    names = call_names(node.backup_dir)
    assert f"restore_{mechanism}_init" in names and f"restore_{mechanism}_cleanup" in names


def test_existing_guest_is_refused_then_replaced_with_force(node: Node) -> None:
    node.add_vm(100, {"scsi0": 2 * MiB})
    old = node.add_vm(150, {"scsi0": MiB})
    assert not run_backup_job(node.root, "rec", [100], terminal=None).failed
    before = node.root.config_path(150, GuestType.QEMU).read_text()
    with pytest.raises(GuestExistsError, match="150"):
        run_restore(node.root, "rec:qemu-100-000", 150, terminal=None)
    assert node.root.config_path(150, GuestType.QEMU).read_text() == before
    assert "restore_get_mechanism" not in call_names(node.backup_dir)

    result = run_restore(node.root, "rec:qemu-100-000", 150, force=True, terminal=None)
    assert node.root.guest_type(150) == GuestType.QEMU
    assert result.removed == ["local:150/vm-150-disk-0.qcow2"]
    assert not old[0].exists()
    assert node.image(150, "vm-150-disk-1.qcow2").exists()  # new volume, new name


@pytest.mark.parametrize("direction", ["vm-over-ct", "ct-over-vm"])
def test_force_never_replaces_a_guest_of_the_other_type(node: Node, direction: str) -> None:
    node.add_vm(100, {"scsi0": MiB})
    node.add_ct(101, mp=False)
    assert not run_backup_job(node.root, "rec", [100, 101], terminal=None).failed
    if direction == "vm-over-ct":
        kept = node.add_ct(300, mp=False)[0]
        volid, kind, other = "rec:qemu-100-000", GuestType.LXC, "VM 300 - CT 300"
    else:
        kept = node.add_vm(300, {"scsi0": MiB})[0]
        volid, kind, other = "rec:lxc-101-000", GuestType.QEMU, "CT 300 - VM 300"
    before = node.root.config_path(300, kind).read_text()
    with pytest.raises(GuestExistsError, match=f"unable to restore {other} already exists"):
        run_restore(node.root, volid, 300, force=True, terminal=None)
    assert node.root.guest_type(300) == kind
    assert node.root.config_path(300, kind).read_text() == before
    assert kept.exists()
    assert sorted(p.name for p in node.image(300, "x").parent.iterdir()) == [kept.name]


def test_failed_restore_removes_what_it_created(node: Node) -> None:
    node.add_vm(100, {"scsi0": 2 * MiB, "scsi1": 1 * MiB})
    assert not run_backup_job(node.root, "rec", [100], terminal=None).failed
    node.set_provider_options(**{"fail-restore": "drive-scsi1"})
    existing = node.add_vm(300, {"scsi0": 1 * MiB})
    existing_conf = node.root.config_path(300, GuestType.QEMU).read_text()

    with pytest.raises(ExternalToolError, match="drive-scsi1"):
        run_restore(node.root, "rec:qemu-100-000", 300, force=True, terminal=None)
    assert sorted(p.name for p in (node.images / "300").iterdir()) == [existing[0].name]
    assert node.root.config_path(300, GuestType.QEMU).read_text() == existing_conf
    calls = call_names(node.backup_dir)
    # scsi0 done; scsi1 init failed and its cleanup ran all the same (the seed: "both")
    assert calls.count("restore_qemu_img_cleanup") == 2

    with pytest.raises(ExternalToolError):
        run_restore(node.root, "rec:qemu-100-000", 301, terminal=None)
    assert not (node.images / "301").exists()
    assert node.root.guest_type(301) is None


def test_qemu_img_failure_still_cleans_up(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    node.add_vm(100, {"scsi0": 2 * MiB})
    assert not run_backup_job(node.root, "rec", [100], terminal=None).failed

    def bad_source(self: RecordingProvider, volname: str, storeid: str, dev: str) -> str:
        self._record("restore_qemu_img_init", volname, storeid, dev)
        return str(node.path / "missing.raw")

    monkeypatch.setattr(RecordingProvider, "restore_qemu_img_init", bad_source)
    # A missing source is "not found" (exit 3), with qemu-img's own message.
    with pytest.raises(NotFoundError, match="qemu-img convert"):
        run_restore(node.root, "rec:qemu-100-000", 200, terminal=None)
    assert call_names(node.backup_dir)[-1] == "restore_qemu_img_cleanup"
    assert node.root.guest_type(200) is None
    assert not (node.images / "200").exists()  # the directory the restore made too
