"""Restored guest configs never grant host access unless the operator asks for it.

The backups are made in the test: a volume of the recording provider written by
hand, the way a hostile storage would hold it, restored through ``run_restore``.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from sample_node import MiB, Node

from pvebackup.api.types import GuestType
from pvebackup.host.guests import CtConfig
from pvebackup.host.restore import run_restore

pytestmark = pytest.mark.e2e

# key -> value: each grants the restored VM some access to the host
VM_HOSTILE = {
    "hookscript": "local:snippets/evil.sh",
    "args": "-fw_cfg name=opt/x,file=/etc/shadow",
    "scsi1": "/dev/sdb",
    "sata0": "/srv/some/host-file.img",
    "efidisk0": "/dev/sdc,efitype=4m",
    "ide2": "cdrom,media=cdrom",
    "ide3": "local:200/vm-200-disk-0.qcow2,media=cdrom",
    "hostpci0": "0000:01:00.0,pcie=1",
    "hostpci1": "mapping=someGpu",
    "usb0": "host=1234:5678",
    "usb1": "host=1-14",
    "serial0": "/dev/ttyS0",
    "parallel0": "/dev/parport0",
    "virtiofs0": "dirid=hostdir",
    "ivshmem": "size=32,name=shared",
    "rng0": "source=/dev/hwrng",
    "cicustom": "user=local:snippets/user.yaml",
}
# look alike, but harmless: must survive
VM_HARMLESS = {
    "name": "evil",
    "usb2": "spice",
    "serial1": "socket",
    "ide0": "local:iso/debian.iso,media=cdrom",
    "rng1": "source=/dev/urandom",
}

CT_HOSTILE = {
    "hookscript": "local:snippets/evil.pl",
    "mp0": "/etc,mp=/mnt/hostetc",
    "mp1": "/dev/sdb1,mp=/mnt/disk",
    "dev0": "/dev/kvm,mode=0666",
    "lxc.mount.entry": "/etc etc2 none bind 0 0",
    "lxc.cgroup2.devices.allow": "a",
    "lxc.apparmor.profile": "unconfined",
}
ARCHIVE_IDMAP = ["u 0 0 65536", "g 0 0 65536"]  # the backup's root = host root


def fake_volume(node: Node, volname: str, vmtype: GuestType, config: str) -> Path:
    """A committed backup of the recording provider, written as a hostile storage would."""
    vol = node.backup_dir / volname
    vol.mkdir(parents=True)
    (vol / "vmtype").write_text(str(vmtype))
    (vol / "guest.conf").write_text(config)
    (vol / "meta.json").write_text(json.dumps({"vmid": 1, "ctime": 1}))
    return vol


def vm_volume(node: Node) -> None:
    lines = [f"{k}: {v}" for k, v in {**VM_HARMLESS, **VM_HOSTILE}.items()]
    lines.append("scsi0: local:100/vm-100-disk-0.qcow2,size=1M")
    vol = fake_volume(node, "qemu-100-000", GuestType.QEMU, "\n".join(lines) + "\n")
    (vol / "drive-scsi0.raw").write_bytes(b"\x5a" * MiB)


def ct_volume(node: Node, *, unprivileged: bool = True) -> None:
    lines = ["hostname: evil", "rootfs: local:100/subvol-100-disk-0.subvol,size=0T"]
    if unprivileged:
        lines.append("unprivileged: 1")
    lines += ["features: nesting=1,keyctl=1,mount=nfs"]
    lines += [f"{k}: {v}" for k, v in CT_HOSTILE.items()]
    lines += [f"lxc.idmap: {m}" for m in ARCHIVE_IDMAP]
    vol = fake_volume(node, "lxc-100-000", GuestType.LXC, "\n".join(lines) + "\n")
    tree = vol / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("evil\n")
    (tree / "etc/www").write_text("data\n")
    os.chown(tree / "etc/www", 33, 33)  # container ids, as a backup stores them


def config_lines(node: Node, vmid: int, vmtype: GuestType) -> set[str]:
    return set(node.root.config_path(vmid, vmtype).read_text().splitlines())


def test_vm_host_access_keys_dropped_with_a_warning_each(node: Node) -> None:
    vm_volume(node)
    log = io.StringIO()
    run_restore(node.root, "rec:qemu-100-000", 200, terminal=log)
    restored = config_lines(node, 200, GuestType.QEMU)
    warnings = [line for line in log.getvalue().splitlines() if line.startswith("WARN")]
    for key, value in VM_HOSTILE.items():
        assert not any(line.startswith(f"{key}:") for line in restored), key
        assert any(f"{key}: {value}: dropped" in w for w in warnings), key
    for key, value in VM_HARMLESS.items():
        assert f"{key}: {value}" in restored
    assert any(line.startswith("scsi0: local:200/") for line in restored)
    assert len(warnings) == len(VM_HOSTILE)


def test_vm_host_access_keys_kept_with_the_flag(node: Node) -> None:
    vm_volume(node)
    log = io.StringIO()
    run_restore(node.root, "rec:qemu-100-000", 200, keep_host_access=True, terminal=log)
    restored = config_lines(node, 200, GuestType.QEMU)
    for key, value in {**VM_HOSTILE, **VM_HARMLESS}.items():
        assert f"{key}: {value}" in restored
        if key in VM_HOSTILE:
            assert f"{key}: {value}: kept" in log.getvalue()


def owners(node: Node, vmid: int) -> dict[str, tuple[int, int]]:
    conf = node.root.load_guest(vmid)
    assert isinstance(conf, CtConfig)
    volname = conf.rootfs.spec.volume.partition(":")[2]
    rootfs = node.images / volname
    return {
        name: (os.lstat(rootfs / name).st_uid, os.lstat(rootfs / name).st_gid)
        for name in ("etc/hostname", "etc/www")
    }


@pytest.mark.parametrize("keep", [False, True])
def test_ct_host_access_keys_and_archive_idmap(node: Node, keep: bool) -> None:
    ct_volume(node)
    log = io.StringIO()
    run_restore(node.root, "rec:lxc-100-000", 300, keep_host_access=keep, terminal=log)
    restored = config_lines(node, 300, GuestType.LXC)
    text = log.getvalue()
    for key, value in CT_HOSTILE.items():
        assert (f"{key}: {value}" in restored) == keep, key
        assert f"{key}: {value}: {'kept' if keep else 'dropped'}" in text
    if keep:
        assert "features: nesting=1,keyctl=1,mount=nfs" in restored
    else:
        assert "features: nesting=1" in restored
        assert "features: nesting=1,keyctl=1,mount=nfs: restored as 'nesting=1'" in text
    # the archive's id map is never restored nor used, flag or not
    assert not any(line.startswith("lxc.idmap") for line in restored)
    for m in ARCHIVE_IDMAP:
        assert f"lxc.idmap: {m}: dropped" in text
    assert owners(node, 300) == {"etc/hostname": (100000, 100000), "etc/www": (100033, 100033)}
    assert "privileged container" not in text


def test_ct_restore_over_existing_container_uses_its_idmap(node: Node) -> None:
    ct_volume(node)
    target_map = ["u 0 200000 65536", "g 0 200000 65536"]
    node.add_ct(
        300, mp=False, extra="unprivileged: 1\n" + "".join(f"lxc.idmap: {m}\n" for m in target_map)
    )
    run_restore(
        node.root, "rec:lxc-100-000", 300, force=True, keep_host_access=True, terminal=None
    )
    restored = node.root.config_path(300, GuestType.LXC).read_text().splitlines()
    assert [line for line in restored if line.startswith("lxc.idmap")] == [
        f"lxc.idmap: {m}" for m in target_map
    ]
    assert owners(node, 300) == {"etc/hostname": (200000, 200000), "etc/www": (200033, 200033)}


def test_privileged_restore_is_announced(node: Node) -> None:
    ct_volume(node, unprivileged=False)
    log = io.StringIO()
    run_restore(node.root, "rec:lxc-100-000", 300, terminal=log)
    assert "restoring a privileged container" in log.getvalue()
    assert owners(node, 300) == {"etc/hostname": (0, 0), "etc/www": (33, 33)}

