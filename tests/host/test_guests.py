"""Guest config parsing and the node root (pvebackup.host.guests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvebackup.api.errors import GuestConfigError, GuestNotFoundError
from pvebackup.api.types import GuestType, IdMapEntry
from pvebackup.host.guests import (
    CtConfig,
    NodeRoot,
    VmConfig,
    format_size,
    parse_guest_config,
    write_config_file,
)

VM_CONF = """\
# first line of the description
# second line
boot: order=scsi0
bios: ovmf
scsi0: local:100/vm-100-disk-0.qcow2,size=1G,discard=on
virtio1: file=local:100/vm-100-disk-1.raw,size=2G
sata0: local:100/vm-100-disk-2.qcow2,backup=0,size=1G
ide2: local:iso/debian.iso,media=cdrom
ide0: none,media=cdrom
ide1: cdrom
efidisk0: local:100/vm-100-disk-3.qcow2,efitype=4m,size=1M
tpmstate0: local:100/vm-100-disk-4.raw,size=4M,version=v2.0
scsi3: /dev/sdb,size=10G
unused0: local:100/vm-100-disk-9.qcow2
net0: virtio=BC:24:11:00:00:01,bridge=vmbr0
parent: snap1

[snap1]
scsi0: local:100/vm-100-disk-0.qcow2,size=1G
this line would not parse
"""


def vm(text: str = VM_CONF) -> VmConfig:
    config = parse_guest_config(text, 100, GuestType.QEMU, where="/x/100.conf")
    assert isinstance(config, VmConfig)
    return config


def ct(text: str) -> CtConfig:
    config = parse_guest_config(text, 101, GuestType.LXC, where="/x/101.conf")
    assert isinstance(config, CtConfig)
    return config


def test_vm_disks_and_what_is_backed_up() -> None:
    config = vm()
    assert config.description == (" first line of the description", " second line")
    disks = {d.key: d for d in config.disks}
    assert set(disks) == {
        "scsi0", "virtio1", "sata0", "ide2", "ide0", "ide1", "efidisk0", "tpmstate0", "scsi3"
    }
    included = [d.key for d in config.disks if d.included]
    # PVE's get_backup_volumes: a passthrough disk (scsi3) is backed up like any other
    assert included == ["scsi0", "virtio1", "efidisk0", "tpmstate0", "scsi3"]
    assert disks["scsi0"].devicename == "drive-scsi0"
    assert disks["virtio1"].spec.volid == "local:100/vm-100-disk-1.raw"
    assert disks["sata0"].reason == "backup=0"
    assert disks["ide2"].reason == "CD-ROM drive"
    assert disks["ide0"].reason == disks["ide1"].reason == "CD-ROM drive"
    assert disks["scsi3"].spec.volid is None
    assert disks["scsi0"].spec.option("discard") == "on"


def test_snapshot_sections_are_not_read() -> None:
    config = vm()
    assert config.get("parent") == "snap1"
    assert "[snap1]" not in config.render()
    assert "would not parse" not in config.render()


def test_vm_volume_ids_are_the_guests_own() -> None:
    vols = vm().volume_ids()
    assert "local:100/vm-100-disk-9.qcow2" in vols  # unused0
    assert "local:100/vm-100-disk-2.qcow2" in vols  # backup=0 is still the guest's
    assert "local:iso/debian.iso" not in vols


def test_render_replaces_and_drops_keys() -> None:
    config = vm()
    spec = config.disks[0].spec
    text = config.render(
        {"scsi0": spec.render(volume="other:200/vm-200-disk-0.qcow2", size="2G"), "sata0": None}
    )
    assert "scsi0: other:200/vm-200-disk-0.qcow2,size=2G,discard=on\n" in text
    assert "sata0" not in text
    assert text.startswith("# first line of the description\n")
    again = vm(text)
    assert again.get("scsi0") == "other:200/vm-200-disk-0.qcow2,size=2G,discard=on"


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("name: a\nthis is not a key value line\n", 2, "cannot parse"),
        ("name: a\nname: b\n", 2, "duplicate key"),
        ("memory: 1\nscsi0: local:100/x.qcow2,size\n", 2, "unexpected 'size'"),
        ("scsi0: ,size=1G\n", 1, "no volume"),
        ("scsi0: local:100/x.raw,file=local:100/y.raw\n", 1, "given twice"),
        ("scsi0: local:100/x.raw,volume=local:100/y.raw\n", 1, "given twice"),
        ("scsi0: size=1G\n", 1, "no volume"),
        ("\n\nscsi0: 1bad:100/x.qcow2\n", 3, "bad volume id"),
        ("scsi0: local:100/x.qcow2,backup=maybe\n", 1, "not a boolean"),
        ("scsi1:\n", 1, "empty value"),
    ],
)
def test_vm_parse_errors_name_file_and_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(GuestConfigError) as info:
        vm(text)
    assert info.value.path == "/x/100.conf"
    assert info.value.line == line
    assert str(info.value).startswith(f"/x/100.conf:{line}: ")
    assert fragment in str(info.value)


CT_CONF = """\
arch: amd64
mp1: local:101/subvol-101-disk-2.subvol,mp=/srv/off,size=1G
mp0: local:101/subvol-101-disk-1.subvol,mp=/srv/data/,backup=1,size=0T
mp2: /host/share,mp=/mnt/share,backup=1
rootfs: local:101/subvol-101-disk-0.subvol,size=0T
unprivileged: 1
"""


def test_container_mountpoints_follow_pve_backup_rules() -> None:
    config = ct(CT_CONF)
    assert [m.key for m in config.mountpoints] == ["rootfs", "mp0", "mp1", "mp2"]
    assert config.rootfs.ct_path == "/"
    assert [m.key for m in config.mountpoints if m.included] == ["rootfs", "mp0"]
    mps = {m.key: m for m in config.mountpoints}
    assert mps["mp0"].ct_path == "/srv/data"
    assert mps["mp1"].reason == "no backup=1"
    assert mps["mp2"].reason == "bind or device mount"


def test_unprivileged_gets_default_map_privileged_none() -> None:
    assert ct(CT_CONF).id_map() == [
        IdMapEntry("u", 0, 100000, 65536),
        IdMapEntry("g", 0, 100000, 65536),
    ]
    privileged = CT_CONF.replace("unprivileged: 1", "unprivileged: 0")
    assert ct(privileged).id_map() == []


def test_explicit_idmap_lines() -> None:
    text = CT_CONF + "lxc.idmap: u 0 200000 1000\nlxc.idmap: g 0 300000 1000\n"
    assert ct(text).id_map() == [
        IdMapEntry("u", 0, 200000, 1000),
        IdMapEntry("g", 0, 300000, 1000),
    ]


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("arch: amd64\n", None, "no rootfs"),
        ("rootfs: /some/dir\n", None, "not a storage volume"),
        ("rootfs: local:1/a\nmp0: local:1/b\n", 2, "mp=/path"),
        ("rootfs: local:1/a\nmp0: local:1/b,mp=relative\n", 2, "mp=/path"),
        ("rootfs: local:1/a\nmp0: local:1/b,mp=/x/../y\n", 2, "bad mount path"),
        ("rootfs: local:1/a\nlxc.idmap: x 0 1 2\n", 2, "lxc.idmap"),
        ("rootfs: local:1/a\nunprivileged: perhaps\n", 2, "not a boolean"),
    ],
)
def test_container_parse_errors(text: str, line: int | None, fragment: str) -> None:
    with pytest.raises(GuestConfigError) as info:
        ct(text)
    assert info.value.path == "/x/101.conf"
    assert info.value.line == line
    assert fragment in str(info.value)


def test_duplicate_mount_path_is_refused() -> None:
    text = "rootfs: local:1/a\nmp0: local:1/b,mp=/x\nmp1: local:1/c,mp=/x/\n"
    with pytest.raises(GuestConfigError, match="already used by mp0"):
        ct(text)


def test_node_root_lists_and_loads_guests(tmp_path: Path) -> None:
    node = NodeRoot(tmp_path)
    assert node.list_guests() == []
    assert node.storage_cfg == tmp_path / "etc/pve/storage.cfg"
    (tmp_path / "etc/pve/qemu-server").mkdir(parents=True)
    (tmp_path / "etc/pve/lxc").mkdir(parents=True)
    node.config_path(105, GuestType.QEMU).write_text("scsi0: local:105/a.qcow2\n")
    node.config_path(101, GuestType.LXC).write_text("rootfs: local:101/a\n")
    (tmp_path / "etc/pve/lxc/notes.txt").write_text("ignored")
    assert node.list_guests() == [(101, GuestType.LXC), (105, GuestType.QEMU)]
    assert node.guest_type(105) == GuestType.QEMU
    assert node.guest_type(999) is None
    assert isinstance(node.load_guest(101), CtConfig)
    with pytest.raises(GuestNotFoundError):
        node.load_guest(999)
    node.config_path(105, GuestType.LXC).write_text("rootfs: local:105/a\n")
    with pytest.raises(GuestConfigError, match="both a VM and a container"):
        node.guest_type(105)


def test_load_guest_error_names_the_real_file(tmp_path: Path) -> None:
    node = NodeRoot(tmp_path)
    path = node.config_path(100, GuestType.QEMU)
    path.parent.mkdir(parents=True)
    path.write_text("name: x\n!!!\n")
    with pytest.raises(GuestConfigError) as info:
        node.load_guest(100)
    assert str(info.value).startswith(f"{path}:2: ")


def test_write_config_file_is_atomic_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub/100.conf"
    write_config_file(target, "a: 1\n")
    write_config_file(target, "a: 2\n")
    assert target.read_text() == "a: 2\n"
    assert [p.name for p in target.parent.iterdir()] == ["100.conf"]


def test_format_size() -> None:
    assert format_size(1 << 30) == "1G"
    assert format_size(3 << 20) == "3M"
    assert format_size(4096) == "4K"
    assert format_size(1000) == "1000"
