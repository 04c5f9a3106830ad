"""The btrfs storage on a real btrfs (loop device): layout, allocation, freeing,
and what a hostile writer of the file system can plant."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from btrfs_loop import btrfs_mounted, is_subvolume
from pvebackup.api.errors import (
    ExternalToolError,
    StateError,
    UnsafeStorageError,
    VolumeNotFoundError,
)
from pvebackup.storage import GuestVolumeStorage, registry

MiB = 1024 * 1024


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[Path]:
    with btrfs_mounted(tmp_path) as mnt:
        yield mnt


def plugin_scfg(fs: Path) -> tuple[GuestVolumeStorage, dict[str, str]]:
    plugin = registry.lookup("btrfs")
    assert isinstance(plugin, GuestVolumeStorage)
    return plugin, {"type": "btrfs", "path": str(fs / "st"), "content": "images,rootdir"}


def test_raw_images_are_subvolumes_with_disk_raw(fs: Path) -> None:
    plugin, scfg = plugin_scfg(fs)
    volname = plugin.next_volname(scfg, "bt", 100, "raw")
    assert volname == "100/vm-100-disk-0.raw"
    plugin.allocate(scfg, "bt", 100, "raw", 3 * MiB, volname)
    vol = plugin.guest_volume(scfg, "bt", volname)
    disk = fs / "st/images/100/vm-100-disk-0/disk.raw"
    assert (vol.path, vol.format, vol.protocol) == (str(disk), "raw", "file")
    assert disk.stat().st_size == 3 * MiB
    assert is_subvolume(disk.parent)
    # the next number skips the subvolume's name (it has no .raw)
    assert plugin.next_volname(scfg, "bt", 100, "raw") == "100/vm-100-disk-1.raw"
    with pytest.raises(StateError, match="exists already"):
        plugin.allocate(scfg, "bt", 100, "raw", MiB, volname)
    assert plugin.volume_exists(scfg, "bt", volname)
    plugin.free(scfg, "bt", volname)
    assert not (fs / "st/images/100").exists()
    with pytest.raises(VolumeNotFoundError):
        plugin.free(scfg, "bt", volname)


def test_qcow2_is_a_plain_file_and_subvols_are_subvolumes(fs: Path) -> None:
    plugin, scfg = plugin_scfg(fs)
    plugin.allocate(scfg, "bt", 100, "qcow2", MiB, "100/vm-100-disk-0.qcow2")
    assert (fs / "st/images/100/vm-100-disk-0.qcow2").is_file()
    sub = plugin.next_volname(scfg, "bt", 100, "subvol")
    assert sub == "100/subvol-100-disk-1.subvol"
    plugin.allocate(scfg, "bt", 100, "subvol", 0, sub)
    path = Path(plugin.guest_volume(scfg, "bt", sub).path)
    assert is_subvolume(path)
    (path / "file").write_text("x")
    plugin.free(scfg, "bt", sub)
    assert not path.exists()


def test_planted_symlinks_are_refused(fs: Path, tmp_path: Path) -> None:
    plugin, scfg = plugin_scfg(fs)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "disk.raw").write_text("host data")
    images = fs / "st/images/100"
    images.mkdir(parents=True)
    # Threat: whoever writes the file system swaps the volume's subvolume for a
    # symlink to a host directory: reading it would back up host data, freeing
    # it would delete it.
    os.symlink(victim, images / "vm-100-disk-0")
    with pytest.raises(UnsafeStorageError):
        plugin.guest_volume(scfg, "bt", "100/vm-100-disk-0.raw")
    with pytest.raises(UnsafeStorageError):
        plugin.free(scfg, "bt", "100/vm-100-disk-0.raw")
    assert (victim / "disk.raw").read_text() == "host data"
    # disk.raw itself a symlink inside a real subvolume
    plugin.allocate(scfg, "bt", 100, "raw", MiB, "100/vm-100-disk-1.raw")
    raw = images / "vm-100-disk-1/disk.raw"
    raw.unlink()
    os.symlink(victim / "disk.raw", raw)
    with pytest.raises(UnsafeStorageError):
        plugin.guest_volume(scfg, "bt", "100/vm-100-disk-1.raw")
    # an images/<vmid> symlink: allocation refuses to write through it
    os.symlink(victim, fs / "st/images/101")
    with pytest.raises(UnsafeStorageError):
        plugin.allocate(scfg, "bt", 101, "raw", MiB, "101/vm-101-disk-0.raw")
    assert sorted(os.listdir(victim)) == ["disk.raw"]


def test_a_plain_directory_is_not_a_btrfs_storage(tmp_path: Path) -> None:
    """btrfs on another file system fails with btrfs's own message, leaving nothing."""
    plugin, scfg = plugin_scfg(tmp_path)
    if os.system("which btrfs >/dev/null") != 0:
        pytest.skip("btrfs-progs not installed")
    with pytest.raises(ExternalToolError, match="btrfs"):
        plugin.allocate(scfg, "bt", 100, "raw", MiB, "100/vm-100-disk-0.raw")
    assert not (tmp_path / "st/images/100/vm-100-disk-0").exists()
