"""Guest volumes on lvm, lvmthin, zfspool and rbd: paths as ``pvesm path`` prints
them, and the storage tools' command lines, against fake tools on PATH.

The fakes record their argv (one JSON list per line) and answer listings from
a file, so every allocation, free and activation is checked without LVM, ZFS or
Ceph on this machine (device-mapper is missing here; see tests/host for what
runs for real).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path

import pytest

from pvebackup.api.errors import (
    ExternalToolError,
    StateError,
    StorageConfigError,
    StorageUnavailableError,
    UnsupportedError,
    UsageError,
)
from pvebackup.storage import (
    GuestVolumeStorage,
    guest_volume,
    parse_storage_config,
    registry,
    volume_path,
)
from pvebackup.storage.guestvol import next_disk_name

FAKE = """#!/bin/sh
printf '%s\\n' "$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "$(basename "$0")" "$@")" >> "{log}"
if [ -f "{dir}/fail-$(basename "$0")" ]; then echo "$(basename "$0"): it broke" >&2; exit 5; fi
cat "{dir}/list-$(basename "$0")" 2>/dev/null
exit 0
"""  # noqa: E501


class Tools:
    def __init__(self, path: Path) -> None:
        self.dir = path
        self.log = path / "calls.jsonl"

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def listing(self, tool: str, text: str) -> None:
        (self.dir / f"list-{tool}").write_text(text)

    def fail(self, tool: str) -> None:
        (self.dir / f"fail-{tool}").write_text("")


@pytest.fixture
def tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tools:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    t = Tools(bin_dir)
    for name in ("lvs", "lvcreate", "lvremove", "lvchange", "zfs", "rbd"):
        script = bin_dir / name
        script.write_text(FAKE.format(log=t.log, dir=bin_dir))
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return t


CFG = """\
lvmthin: local-lvm
\tthinpool data
\tvgname pve
\tcontent rootdir,images

lvm: thick
\tvgname san
\tcontent images

zfspool: tank
\tpool rpool/data
\tsparse
\tblocksize 16k
\tcontent images,rootdir

zfspool: tank2
\tpool tank
\tmountpoint /srv/tank
\tcontent rootdir

rbd: ceph
\tpool vms
\tnamespace ns1
\tcontent images

rbd: kceph
\tpool vms
\tkrbd 1
\tfsid 0B3F4A2C-1111-2222-3333-444455556666
\tcontent images
"""


def plugin_of(storeid: str) -> tuple[Mapping[str, str], GuestVolumeStorage]:
    section = parse_storage_config(CFG)[storeid].scfg()
    plugin = registry.lookup(section["type"])
    assert isinstance(plugin, GuestVolumeStorage)
    return section, plugin


def cfg_path(volid: str) -> str:
    return str(volume_path(parse_storage_config(CFG), volid))


# -- paths ----------------------------------------------------------------------


def test_paths_are_what_pvesm_path_prints() -> None:
    assert cfg_path("local-lvm:vm-100-disk-0") == "/dev/pve/vm-100-disk-0"
    assert cfg_path("local-lvm:base-100-disk-0") == "/dev/pve/base-100-disk-0"
    assert cfg_path("thick:vm-100-disk-1") == "/dev/san/vm-100-disk-1"
    assert cfg_path("tank:vm-100-disk-0") == "/dev/zvol/rpool/data/vm-100-disk-0"
    # a linked clone's zvol: the base part names the origin, not the path
    assert cfg_path("tank:base-9-disk-0/vm-100-disk-0") == "/dev/zvol/rpool/data/vm-100-disk-0"
    assert cfg_path("tank:subvol-101-disk-0") == "/rpool/data/subvol-101-disk-0"
    assert cfg_path("tank2:subvol-101-disk-0") == "/srv/tank/subvol-101-disk-0"
    assert cfg_path("kceph:vm-100-disk-0") == (
        "/dev/rbd-pve/0b3f4a2c-1111-2222-3333-444455556666/vms/vm-100-disk-0"
    )


def test_formats_and_protocols() -> None:
    scfg, lvm = plugin_of("thick")
    vol = lvm.guest_volume(scfg, "thick", "vm-100-disk-0.qcow2")  # PVE 9 volume chains
    assert (vol.format, vol.protocol) == ("qcow2", "host_device")
    assert vol.file_node() == {"driver": "host_device", "filename": "/dev/san/vm-100-disk-0.qcow2"}
    scfg, zfs = plugin_of("tank")
    sub = zfs.guest_volume(scfg, "tank", "subvol-101-disk-0")
    assert (sub.format, sub.protocol) == ("subvol", "dir")
    with pytest.raises(UnsupportedError, match="directory"):
        sub.file_node()


def test_rbd_through_qemus_rbd_driver() -> None:
    scfg, rbd = plugin_of("ceph")
    vol = rbd.guest_volume(scfg, "ceph", "vm-100-disk-0")
    assert vol.path.startswith("rbd:vms/ns1/vm-100-disk-0")
    assert vol.protocol == "rbd"
    node = vol.file_node()
    assert node["driver"] == "rbd"
    assert (node["pool"], node["namespace"], node["image"]) == ("vms", "ns1", "vm-100-disk-0")
    # qemu-img gets the protocol pinned in a json: name, never a guessed one
    name = vol.qemu_name()
    assert name.startswith("json:")
    assert json.loads(name[5:])["file"]["driver"] == "rbd"


@pytest.mark.parametrize(
    ("storeid", "volname"),
    [
        # Threat: a volume name is pasted into a device path or an rbd: name;
        # '/', '..', ':' or '@' there would name another device or inject options.
        ("local-lvm", "vm-100-disk-0/../../sda"),
        ("local-lvm", "../vm-100-disk-0"),
        ("local-lvm", "disk-0"),
        ("thick", "base-100-disk-0"),  # no templates on thick lvm (PVE: vm- only)
        ("tank", "vm-100-disk-0/../../x"),
        ("tank", "vm-100-disk-0/vm-101-disk-0"),
        ("ceph", "vm-100-disk-0:conf=/tmp/evil.conf"),
        ("ceph", "vm-100-disk-0@snap"),
        ("ceph", "other-name"),
    ],
)
def test_hostile_volume_names_are_refused(storeid: str, volname: str) -> None:
    scfg, plugin = plugin_of(storeid)
    with pytest.raises(UsageError):
        plugin.guest_volume(scfg, storeid, volname)


def test_krbd_needs_a_valid_fsid() -> None:
    scfg, rbd = plugin_of("kceph")
    bad = {**scfg, "fsid": "not-a-uuid"}
    with pytest.raises(StorageConfigError, match="fsid"):
        rbd.guest_volume(bad, "kceph", "vm-100-disk-0")


# -- allocation and freeing, against fake tools ------------------------------------


def test_lvmthin_allocates_a_thin_volume_after_the_used_numbers(tools: Tools) -> None:
    scfg, plugin = plugin_of("local-lvm")
    tools.listing("lvs", "  data\n  vm-100-disk-0\n  base-100-disk-1\n  vm-101-disk-2\n")
    volname = plugin.next_volname(scfg, "local-lvm", 100, "raw")
    assert volname == "vm-100-disk-2"
    assert plugin.allocate(scfg, "local-lvm", 100, "raw", 4 * 1024 * 1024 + 1, volname) == (
        "vm-100-disk-2"
    )
    assert tools.calls()[-1] == [
        "lvcreate", "-aly", "-V", "4097k", "--name", "vm-100-disk-2",
        "--setautoactivation", "n", "--thinpool", "pve/data",
    ]  # fmt: skip
    plugin.free(scfg, "local-lvm", volname)
    assert tools.calls()[-1] == ["lvremove", "-f", "pve/vm-100-disk-2"]
    assert plugin.zeroed_images


def test_thick_lvm_allocates_with_size_and_is_not_zeroed(tools: Tools) -> None:
    scfg, plugin = plugin_of("thick")
    plugin.allocate(scfg, "thick", 100, "raw", 1024 * 1024, "vm-100-disk-0")
    assert tools.calls()[-1] == [
        "lvcreate", "-aly", "-Wy", "--yes", "--size", "1024k", "--name", "vm-100-disk-0",
        "--setautoactivation", "n", "san",
    ]  # fmt: skip
    # a thick LV holds what its extents held: a restore must write every block
    assert not plugin.zeroed_images


def test_lvm_refuses_an_existing_name_and_a_foreign_one(tools: Tools) -> None:
    scfg, plugin = plugin_of("local-lvm")
    tools.listing("lvs", "  vm-100-disk-0\n")
    with pytest.raises(StateError, match="exists already"):
        plugin.allocate(scfg, "local-lvm", 100, "raw", 1024, "vm-100-disk-0")
    with pytest.raises(UsageError, match="should be 'vm-100-"):
        plugin.allocate(scfg, "local-lvm", 100, "raw", 1024, "vm-101-disk-0")
    assert not any(c[0] == "lvcreate" for c in tools.calls())


def test_lvm_activates_an_inactive_volume(tools: Tools) -> None:
    scfg, plugin = plugin_of("local-lvm")
    plugin.activate_volume(scfg, "local-lvm", "vm-100-disk-0")  # no /dev/pve here
    assert tools.calls() == [["lvchange", "-aly", "pve/vm-100-disk-0"]]


def test_a_failing_tool_is_an_external_tool_error_with_its_message(tools: Tools) -> None:
    scfg, plugin = plugin_of("local-lvm")
    tools.fail("lvcreate")
    with pytest.raises(ExternalToolError, match="lvcreate: it broke") as info:
        plugin.allocate(scfg, "local-lvm", 100, "raw", 1024, "vm-100-disk-0")
    assert info.value.returncode == 5


def test_zfs_zvol_and_subvol_command_lines(tools: Tools) -> None:
    scfg, plugin = plugin_of("tank")
    tools.listing("zfs", "rpool/data\nrpool/data/vm-100-disk-0\nrpool/data/subvol-100-disk-1\n")
    assert plugin.next_volname(scfg, "tank", 100, "raw") == "vm-100-disk-2"
    assert plugin.next_volname(scfg, "tank", 100, "subvol") == "subvol-100-disk-2"
    assert tools.calls()[0] == [
        "zfs", "list", "-H", "-o", "name", "-t", "volume,filesystem", "-d", "1", "rpool/data",
    ]  # fmt: skip
    plugin.allocate(scfg, "tank", 100, "raw", 3 * 1024 * 1024 + 5, "vm-100-disk-2")
    # sparse and blocksize from storage.cfg; size in KiB rounded up to 1 MiB as PVE
    assert tools.calls()[-1] == [
        "zfs", "create", "-s", "-b", "16k", "-V", "4096k", "rpool/data/vm-100-disk-2",
    ]  # fmt: skip
    plugin.allocate(scfg, "tank", 100, "subvol", 0, "subvol-100-disk-2")
    assert tools.calls()[-1] == [
        "zfs", "create", "-o", "acltype=posixacl", "-o", "xattr=sa", "-o", "refquota=none",
        "rpool/data/subvol-100-disk-2",
    ]  # fmt: skip
    plugin.free(scfg, "tank", "subvol-100-disk-2")
    assert tools.calls()[-1] == ["zfs", "destroy", "-r", "rpool/data/subvol-100-disk-2"]
    assert plugin.volume_exists(scfg, "tank", "vm-100-disk-0")
    assert not plugin.volume_exists(scfg, "tank", "vm-100-disk-9")


def test_rbd_command_lines(tools: Tools) -> None:
    scfg, plugin = plugin_of("ceph")
    tools.listing("rbd", "vm-100-disk-0\nvm-100-disk-1\n")
    assert plugin.next_volname(scfg, "ceph", 100, "raw") == "vm-100-disk-2"
    plugin.allocate(scfg, "ceph", 100, "raw", 5 * 1024 * 1024 + 1, "vm-100-disk-2")
    assert tools.calls()[-1] == [
        "rbd", "-p", "vms", "--namespace", "ns1", "-n", "client.admin", "create",
        "--image-format", "2", "--size", "6", "vm-100-disk-2",
    ]  # fmt: skip
    plugin.free(scfg, "ceph", "vm-100-disk-2")
    assert [c[-2:] for c in tools.calls()[-2:]] == [
        ["purge", "vm-100-disk-2"],
        ["rm", "vm-100-disk-2"],
    ]


def test_krbd_maps_a_missing_device(tools: Tools) -> None:
    scfg, plugin = plugin_of("kceph")
    plugin.activate_volume(scfg, "kceph", "vm-100-disk-0")
    assert tools.calls()[-1][-2:] == ["map", "vm-100-disk-0"]


@pytest.mark.parametrize(
    ("storeid", "fmt", "message"),
    [
        ("local-lvm", "subvol", "cannot hold container directories"),
        ("local-lvm", "qcow2", "cannot hold qcow2 images .*allocates: raw"),
        ("ceph", "subvol", "cannot hold container directories"),
        ("tank", "qcow2", "allocates: raw, subvol"),
    ],
)
def test_formats_a_storage_cannot_allocate_are_refused_before_any_tool(
    tools: Tools, storeid: str, fmt: str, message: str
) -> None:
    scfg, plugin = plugin_of(storeid)
    with pytest.raises(UnsupportedError, match=message):
        plugin.next_volname(scfg, storeid, 100, fmt)
    with pytest.raises(UnsupportedError, match=message):
        plugin.allocate(scfg, storeid, 100, fmt, 1024, "vm-100-disk-0")
    assert tools.calls() == []


def test_next_disk_name_shares_numbers_across_prefixes() -> None:
    names = ["vm-100-disk-0", "subvol-100-disk-1.subvol", "base-100-disk-2", "vm-10-disk-3"]
    assert next_disk_name(names, 100) == "vm-100-disk-3"
    assert next_disk_name(names, 10) == "vm-10-disk-0"
    with pytest.raises(UsageError):
        next_disk_name([], 0)


# -- nfs / cifs: dir-like, only while mounted ---------------------------------------


def test_nfs_is_used_only_while_mounted(tmp_path: Path) -> None:
    share = tmp_path / "mnt-pve-nas"
    share.mkdir()
    text = (
        f"nfs: nas\n\tpath {share}\n\tserver 192.0.2.1\n\texport /pve\n\tcontent images\n"
    )
    cfg = parse_storage_config(text)
    scfg = cfg["nas"].scfg()
    plugin = registry.lookup("nfs")
    assert isinstance(plugin, GuestVolumeStorage)
    # Unmounted, /mnt/pve/nas is a directory on the node's root file system:
    # reading there would back up nothing real, allocating would fill '/'.
    with pytest.raises(StorageUnavailableError, match="not mounted"):
        plugin.guest_volume(scfg, "nas", "100/vm-100-disk-0.qcow2")
    with pytest.raises(StorageUnavailableError, match="not mounted"):
        plugin.allocate(scfg, "nas", 100, "qcow2", 1024 * 1024, "100/vm-100-disk-0.qcow2")
    assert list(share.iterdir()) == []
    source = tmp_path / "export"
    source.mkdir()
    if os.system(f"mount --bind {source} {share}") != 0:
        pytest.skip("bind mounts are not allowed here")
    try:
        volname = plugin.next_volname(scfg, "nas", 100, "qcow2")
        assert plugin.allocate(scfg, "nas", 100, "qcow2", 1024 * 1024, volname) == volname
        vol = plugin.guest_volume(scfg, "nas", volname)
        assert vol.path == f"{share}/images/100/vm-100-disk-0.qcow2"
        assert (source / "images/100/vm-100-disk-0.qcow2").is_file()
    finally:
        os.system(f"umount {share}")


def test_types_without_guest_volumes_say_which_types_are_reached() -> None:
    cfg = parse_storage_config(
        "iscsi: san\n\tportal 192.0.2.5\n\ttarget iqn.2003-01.org.example:t\n\tcontent images\n"
    )
    with pytest.raises(UnsupportedError, match="'san' is a storage of type iscsi; .* rbd"):
        guest_volume(cfg, "san:0.0.1.scsi-36001405")
    with pytest.raises(UnsupportedError, match="type iscsi"):
        volume_path(cfg, "san:0.0.1.scsi-36001405")


def test_lvm_and_krbd_deactivate_what_they_activated(
    tools: Tools, monkeypatch: pytest.MonkeyPatch
) -> None:
    scfg, plugin = plugin_of("local-lvm")
    assert plugin.activate_volume(scfg, "local-lvm", "vm-100-disk-0") is True  # it ran lvchange
    plugin.deactivate_volume(scfg, "local-lvm", "vm-100-disk-0")
    assert tools.calls()[-1] == ["lvchange", "-aln", "pve/vm-100-disk-0"]
    kscfg, kplugin = plugin_of("kceph")
    assert kplugin.activate_volume(kscfg, "kceph", "vm-100-disk-0") is True
    dev = "/dev/rbd-pve/0b3f4a2c-1111-2222-3333-444455556666/vms/vm-100-disk-0"
    monkeypatch.setattr("pvebackup.storage.rbd.os.path.exists", lambda p: p == dev)
    assert kplugin.activate_volume(kscfg, "kceph", "vm-100-disk-0") is False  # mapped already
    kplugin.deactivate_volume(kscfg, "kceph", "vm-100-disk-0")
    assert tools.calls()[-1][-2:] == ["unmap", dev]
    # QEMU's own rbd driver: nothing to map, nothing to unmap
    cscfg, cplugin = plugin_of("ceph")
    before = len(tools.calls())
    assert cplugin.activate_volume(cscfg, "ceph", "vm-100-disk-0") is False
    cplugin.deactivate_volume(cscfg, "ceph", "vm-100-disk-0")
    assert len(tools.calls()) == before
