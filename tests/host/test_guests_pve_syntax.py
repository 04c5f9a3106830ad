"""Guest configs as Proxmox VE writes and reads them (issue 16, corpus findings)."""

from __future__ import annotations

import pytest

from pvebackup.api.errors import GuestConfigError
from pvebackup.api.types import GuestType
from pvebackup.host.guests import CtConfig, VmConfig, parse_guest_config


def vm(text: str) -> VmConfig:
    config = parse_guest_config(text, 100, GuestType.QEMU, where="/x/100.conf")
    assert isinstance(config, VmConfig)
    return config


def ct(text: str) -> CtConfig:
    config = parse_guest_config(text, 101, GuestType.LXC, where="/x/101.conf")
    assert isinstance(config, CtConfig)
    return config


def test_empty_boot_is_an_empty_boot_order() -> None:
    config = vm("boot: \nscsi0: local:100/vm-100-disk-0.raw,size=1G\n")
    assert config.get("boot") == ""
    assert "boot: \n" in config.render()


def test_lxc_keys_with_equals_as_pct_adoc_writes_them() -> None:
    config = ct(
        "rootfs: local:101/subvol-101-disk-0.subvol,size=8G\n"
        "lxc.apparmor.profile = unconfined\n"
        "lxc.init_cmd = /sbin/my_own_init\n"
        "lxc.idmap = u 0 100000 65536\n"
        "lxc.idmap: g 0 100000 65536\n"
    )
    assert config.get("lxc.apparmor.profile") == "unconfined"
    assert config.get("lxc.init_cmd") == "/sbin/my_own_init"
    assert [(e.kind, e.count) for e in config.id_map()] == [("u", 65536), ("g", 65536)]
    assert "lxc.apparmor.profile: unconfined\n" in config.render()  # written with ':'


@pytest.mark.parametrize("line", ["memory = 512", "lxc = x", "scsi0 = local:100/x.raw"])
def test_equals_is_only_for_lxc_keys(line: str) -> None:
    with pytest.raises(GuestConfigError, match="cannot parse"):
        vm(f"name: a\n{line}\n")


def test_explicit_volume_keys_and_empty_parts() -> None:
    config = vm(
        "scsi0: file=local:100/vm-100-disk-0.raw,,size=1G\n"
        "scsi1: local:100/vm-100-disk-1.raw,cache=none,,size=2G,\n"
        "virtio0: volume=local:100/vm-100-disk-2.raw,size=1G\n"
    )
    vols = {d.key: d.spec.volid for d in config.disks}
    assert vols == {
        "scsi0": "local:100/vm-100-disk-0.raw",
        "scsi1": "local:100/vm-100-disk-1.raw",
        "virtio0": "local:100/vm-100-disk-2.raw",
    }
    assert config.disks[1].spec.options == (("cache", "none"), ("size", "2G"))
    c = ct("rootfs: volume=local:101/subvol-101-disk-0.subvol,size=8G\n"
           "mp0: volume=local:101/subvol-101-disk-1.subvol,,mp=/data,backup=1\n")
    assert [m.spec.volid for m in c.mountpoints if m.included] == [
        "local:101/subvol-101-disk-0.subvol", "local:101/subvol-101-disk-1.subvol"]


@pytest.mark.parametrize(
    ("extra", "included", "reason"),
    [
        ("scsi1: /dev/sdg\n", True, ""),  # passthrough: PVE backs it up
        ("scsi1: /mnt/file.raw,size=1G\n", True, ""),
        ("scsi1: /dev/sdg,backup=0\n", False, "backup=0"),
        ("scsi1: /dev/sdg,backup=no\n", False, "backup=0"),
        ("efidisk0: local:100/vm-100-disk-1.raw,size=4M\n", False, "efidisk but no OVMF BIOS"),
        ("bios: seabios\nefidisk0: local:100/vm-100-disk-1.raw\n", False,
         "efidisk but no OVMF BIOS"),
        ("bios: ovmf\nefidisk0: local:100/vm-100-disk-1.raw\n", True, ""),
        # cdrom wins over backup, as drive_is_cdrom is tested first
        ("ide2: local:iso/x.iso,media=cdrom,backup=1\n", False, "CD-ROM drive"),
        ("tpmstate0: local:100/vm-100-disk-1.raw,version=v2.0\n", True, ""),
    ],
)
def test_get_backup_volumes_rules(extra: str, included: bool, reason: str) -> None:
    config = vm("scsi0: local:100/vm-100-disk-0.raw\n" + extra)
    disk = config.disks[-1]
    assert (disk.included, disk.reason) == (included, reason)


def test_empty_volume_values_stay_errors() -> None:
    # a disk silently missing from backups would be worse than a refused config
    for text in ("scsi0: \n", "rootfs: \n", "mp0:\n", "scsi0: ,,\n", "scsi0: 0\n",
                 "scsi0: relative.raw\n", "rootfs: none\n", "mp0: data,mp=/x\n"):
        with pytest.raises(GuestConfigError):
            parse_guest_config(text, 100, GuestType.LXC if text[0] in "rm" else GuestType.QEMU,
                               where="/x/1.conf")
