"""Volume names, index.json, listing, chains and removal through the plugin."""

from __future__ import annotations

from pathlib import Path

import pytest
from bdir_helpers import STOREID

from pvebackup.api.errors import (
    CorruptIndexError,
    IntegrityError,
    StorageConfigError,
    VolumeInUseError,
    VolumeNotFoundError,
)
from pvebackup.api.types import GuestType
from pvebackup.kit import safefs
from pvebackup.kit.safefs import owned_fd
from pvebackup.providers.directory.plugin import BackupDirPlugin
from pvebackup.providers.directory.volumes import (
    BackupIndex,
    DeviceEntry,
    VolumeLayout,
    VolumeName,
)
from pvebackup.storage import registry

T0 = 1795685400  # 2026-11-26 09:30:00 UTC


def test_volume_name_round_trip() -> None:
    name = VolumeName(GuestType.QEMU, 100, T0)
    assert str(name) == "backup/vm-100-2026-11-26T09:30:00Z"
    assert name.dirname == "vm-100-2026-11-26T09:30:00Z"
    assert VolumeName.parse(str(name)) == name


@pytest.mark.parametrize(
    "bad",
    [
        "vm-100-2026-11-26T09:30:00Z",
        "backup/qemu-100-2026_11_26-09_30_00",  # the old scheme: never parsed
        "backup/vm-100-2026_11_26-09_30_00",
        "backup/vm-0100-2026-11-26T09:30:00Z",
        "backup/vm-100-2026-11-26",
        "backup/vm-100-2026-11-26T09:30:00",
        "backup/VM-100-2026-11-26T09:30:00Z",
        "backup/../vm-100-2026-11-26T09:30:00Z",
        "backup/vm-100-2026-11-26T09:30:00Z/x",
    ],
)
def test_bad_volume_names_are_refused(bad: str) -> None:
    with pytest.raises(VolumeNotFoundError, match="not a backup-dir volume"):
        VolumeName.parse(bad)


def test_new_volname_skips_taken_seconds(tmp_path: Path) -> None:
    layout = VolumeLayout(tmp_path)
    first = layout.new_volname(GuestType.LXC, 200, T0)
    layout.temp_path(first).mkdir(parents=True)
    second = layout.new_volname(GuestType.LXC, 200, T0 + 0.5)
    assert second == "backup/ct-200-2026-11-26T09:30:01Z"


def test_index_round_trip_and_corruption(tmp_path: Path) -> None:
    index = BackupIndex(
        vmid=100,
        vmtype=GuestType.QEMU,
        ctime=T0,
        devices={"drive-scsi0": DeviceEntry(1024, "drive-scsi0.qcow2", "backup/x", "reuse")},
        bitmap_id="backup-dir-s",
        parent="backup/x",
        stored_size=4096,
    )
    assert BackupIndex.from_json(index.to_json(), "here") == index
    with pytest.raises(CorruptIndexError, match="here: malformed index.json"):
        BackupIndex.from_json('{"format": "other"}', "here")
    with pytest.raises(CorruptIndexError):
        BackupIndex.from_json("not json", "here")


def commit(layout: VolumeLayout, vmid: int, ctime: int, parent: str | None = None) -> str:
    volname = str(VolumeName(GuestType.QEMU, vmid, ctime))
    work = layout.temp_path(volname)
    work.mkdir(parents=True)
    (work / "drive-scsi0.qcow2").write_bytes(b"x" * 5000)
    index = BackupIndex(
        vmid=vmid,
        vmtype=GuestType.QEMU,
        ctime=ctime,
        devices={"drive-scsi0": DeviceEntry(1 << 20, "drive-scsi0.qcow2", parent)},
        parent=parent,
        stored_size=8192,
    )
    with owned_fd(safefs.open_root(work)) as work_fd:
        layout.write_index(work_fd, index)
    layout.commit(volname)
    return volname


def test_list_and_free_through_the_registered_plugin(tmp_path: Path) -> None:
    plugin = registry.lookup("backup-dir")
    assert isinstance(plugin, BackupDirPlugin)
    scfg = {"type": "backup-dir", "path": str(tmp_path)}
    layout = VolumeLayout(tmp_path)
    full = commit(layout, 100, T0)
    inc = commit(layout, 100, T0 + 60, parent=full)
    other = commit(layout, 101, T0 + 30)
    (layout.backup_dir / ".tmp-vm-102-2026-11-26T09:40:00Z").mkdir()  # in progress

    volumes = plugin.list_volumes(scfg, STOREID)
    assert [v.volid for v in volumes] == [f"{STOREID}:{n}" for n in (full, other, inc)]
    assert volumes[2].parent == full and volumes[0].parent is None
    assert (volumes[0].vmid, volumes[0].vmtype, volumes[0].ctime) == (100, GuestType.QEMU, T0)
    assert volumes[0].size == 8192 and volumes[0].format == "qcow2"

    with pytest.raises(VolumeInUseError, match=inc):
        plugin.free_volume(scfg, STOREID, full)
    plugin.free_volume(scfg, STOREID, inc)
    plugin.free_volume(scfg, STOREID, full)
    with pytest.raises(VolumeNotFoundError):
        plugin.free_volume(scfg, STOREID, full)
    assert [v.volid for v in plugin.list_volumes(scfg, STOREID)] == [f"{STOREID}:{other}"]
    with pytest.raises(StorageConfigError):
        plugin.list_volumes({"type": "backup-dir"}, STOREID)


def test_image_chain_names_what_is_missing(tmp_path: Path) -> None:
    layout = VolumeLayout(tmp_path)
    full = commit(layout, 100, T0)
    inc = commit(layout, 100, T0 + 60, parent=full)
    assert [p.parent.name for p in layout.image_chain(inc, "drive-scsi0")] == [
        VolumeName.parse(inc).dirname,
        VolumeName.parse(full).dirname,
    ]
    with pytest.raises(IntegrityError, match="no disk 'drive-virtio1'"):
        layout.image_chain(inc, "drive-virtio1")
    (layout.volume_path(full) / "index.json").unlink()
    with pytest.raises(VolumeNotFoundError, match=f"depends on '{full}'"):
        layout.image_chain(inc, "drive-scsi0")


def test_last_successful_ignores_removed_volumes(tmp_path: Path) -> None:
    layout = VolumeLayout(tmp_path)
    assert layout.last_successful(GuestType.QEMU, 100) is None
    full = commit(layout, 100, T0)
    layout.set_last_successful(GuestType.QEMU, 100, full)
    assert layout.last_successful(GuestType.QEMU, 100) == full
    layout.remove(full)
    assert layout.last_successful(GuestType.QEMU, 100) is None
