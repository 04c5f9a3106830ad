"""Proxmox VE's own configuration files, read as PVE reads them.

The corpus (``../shared/corpus`` beside the project: test fixtures and doc
examples of qemu-server, pve-container, pve-storage, pve-installer and pve-docs;
its README names sources and groups) is read in place, never copied here. Every
file in it is accepted by Proxmox VE, so none may be refused, and the disks, mount
points and storages we find must be the ones PVE finds. Where the corpus is not
present (a fresh clone), these tests skip and say so.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pvebackup.api.errors import GuestConfigError
from pvebackup.api.types import GuestType
from pvebackup.host.guests import CtConfig, VmConfig, parse_guest_config
from pvebackup.storage import parse_storage_config

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"

pytestmark = pytest.mark.skipif(
    not (CORPUS / "README.md").is_file(),
    reason=f"PVE config corpus not found at {CORPUS} (it sits beside the project in CI)",
)

# What PVE's parsers see as a drive / mount point key in a config's main section.
_DRIVE = re.compile(r"^((?:ide|sata|scsi|virtio)\d+|efidisk0|tpmstate0):")
_MOUNT = re.compile(r"^(rootfs|mp\d+):")
_HEADER = re.compile(r"^(\S+):\s*(\S+)\s*$")


def _files(group: str) -> list[Path]:
    if not CORPUS.is_dir():
        return []
    return sorted(
        p for p in (CORPUS / group).rglob("*")
        if p.is_file() and not p.name.endswith(".strict.error")
    )


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(CORPUS)) for p in paths]


def _main_section_keys(path: Path, pattern: re.Pattern[str]) -> list[str]:
    keys = []
    for line in path.read_text().splitlines():
        if line.startswith("["):
            break
        m = pattern.match(line)
        if m:
            keys.append(m.group(1))
    return keys


QEMU = _files("qemu")
LXC = _files("lxc")
STORAGE = _files("storage")


def test_corpus_is_whole() -> None:
    # the README's counts: a corpus that shrank would make every other test weaker
    assert (len(QEMU), len(LXC), len(STORAGE)) == (231, 126, 24)


@pytest.mark.parametrize("path", QEMU, ids=_ids(QEMU))
def test_vm_configs_parse_with_pves_drives(path: Path) -> None:
    config = parse_guest_config(path.read_text(), 100, GuestType.QEMU, where=str(path))
    assert isinstance(config, VmConfig)
    assert [d.key for d in config.disks] == _main_section_keys(path, _DRIVE)
    bios = config.get("bios")
    for disk in config.disks:
        # PVE::QemuConfig->get_backup_volumes, restated: CD-ROMs are not volumes;
        # the rest by their backup flag, except an EFI disk without OVMF
        cdrom = disk.spec.option("media") == "cdrom" or disk.spec.volume in ("cdrom", "none")
        flag = disk.spec.option("backup") not in ("0", "no", "off", "false")
        efi_off = disk.key == "efidisk0" and bios != "ovmf"
        assert disk.included == (not cdrom and flag and not efi_off), disk


@pytest.mark.parametrize("path", LXC, ids=_ids(LXC))
def test_ct_configs_parse_with_pves_mount_points(path: Path) -> None:
    keys = _main_section_keys(path, _MOUNT)
    text = path.read_text()
    if "rootfs" not in keys:
        # distro-setup snippets and doc fragments: not containers on their own
        with pytest.raises(GuestConfigError, match="no rootfs"):
            parse_guest_config(text, 101, GuestType.LXC, where=str(path))
        return
    config = parse_guest_config(text, 101, GuestType.LXC, where=str(path))
    assert isinstance(config, CtConfig)
    assert sorted(m.key for m in config.mountpoints) == sorted(keys)
    for mp in config.mountpoints:
        # PVE::LXC::Config->mountpoint_backup_enabled
        volume = mp.spec.volid is not None
        wanted = mp.key == "rootfs" or (volume and mp.spec.option("backup") == "1")
        assert mp.included == wanted, mp


# Hand-derived from PVE's rules for a sample of files: (key, volume) backed up.
EXPECTED_BACKUP = {
    "qemu/cfg2cmd/simple-disk-passthrough.conf": [("scsi0", "/dev/sda"),
                                                  ("scsi1", "/mnt/file.raw")],
    "qemu/cfg2cmd/scsiblk.conf": [("scsi0", "/dev/sdg")],
    "qemu/parse-config-input/regular-vm-efi.conf": [
        ("efidisk0", "mydir:139/vm-139-disk-0.qcow2"), ("scsi0", "rbdkvm:vm-139-disk-1")],
    "qemu/cfg2cmd/efi-secboot-and-tpm.conf": [
        ("efidisk0", "local:100/vm-100-disk-0.raw"), ("tpmstate0", "local:108/vm-100-disk-1.raw")],
    "lxc/snapshot-expected/rollback/209.conf": [("rootfs", "local:snapshotable-disk-1")],
    "lxc/docs/pct.adoc.L930.conf": None,  # mp0 only, backup=1: a fragment, no rootfs
    "lxc/docs/pct.adoc.L503.conf": [("rootfs", "thin1:base-100-disk-1")],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_BACKUP))
def test_expected_backup_volumes(name: str) -> None:
    path = CORPUS / name
    vmtype = GuestType.QEMU if name.startswith("qemu/") else GuestType.LXC
    expected = EXPECTED_BACKUP[name]
    if expected is None:
        with pytest.raises(GuestConfigError, match="no rootfs"):
            parse_guest_config(path.read_text(), 101, vmtype, where=name)
        return
    config = parse_guest_config(path.read_text(), 101, vmtype, where=name)
    if isinstance(config, VmConfig):
        found = [(d.key, d.spec.volume) for d in config.disks if d.included]
    else:
        assert isinstance(config, CtConfig)
        found = [(m.key, m.spec.volume) for m in config.mountpoints if m.included]
    assert found == expected


@pytest.mark.parametrize("path", STORAGE, ids=_ids(STORAGE))
def test_storage_cfgs_parse_whole(path: Path) -> None:
    text = path.read_text()
    # strict: no section of a file PVE accepts may be refused
    cfg = parse_storage_config(text, str(path))
    headers = [m.groups() for line in text.splitlines() if (m := _HEADER.match(line))]
    assert [(s.type, s.storeid) for s in cfg.values()] == headers
    for section in cfg.values():
        for key in section.properties:
            assert re.search(rf"^\s+{re.escape(key)}(\s|$)", text, re.M), key
    # only legacy options warn, and each names the line it is on
    for note in cfg.warnings:
        assert "maxfiles" in note or "glusterfs" in note, note
    assert bool(cfg.warnings) == bool(re.search(r"^\s+maxfiles\s", text, re.M))
