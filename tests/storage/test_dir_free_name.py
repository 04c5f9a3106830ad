"""DirPlugin.free_name: the name an allocation would pick, known before allocating."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvebackup.api.errors import UsageError
from pvebackup.storage import DirPlugin, lookup


def test_free_name_is_what_alloc_picks(tmp_path: Path) -> None:
    plugin = lookup("dir")
    assert isinstance(plugin, DirPlugin)
    scfg = {"type": "dir", "path": str(tmp_path)}
    assert plugin.free_name(scfg, 100, "qcow2") == "vm-100-disk-0.qcow2"
    name = plugin.free_name(scfg, 100, "qcow2")
    assert plugin.alloc_image(scfg, "local", 100, "qcow2", 1 << 20, name=name) == f"100/{name}"
    # vm- and subvol- share one number space: the next of either is disk-1
    assert plugin.free_name(scfg, 100, "subvol") == "subvol-100-disk-1.subvol"
    assert plugin.alloc_subvol(scfg, "local", 100) == "100/subvol-100-disk-1.subvol"
    assert plugin.free_name(scfg, 100, "raw") == "vm-100-disk-2.raw"
    with pytest.raises(UsageError):
        plugin.free_name(scfg, 100, "vmdk")


def test_free_name_creates_nothing(tmp_path: Path) -> None:
    plugin = lookup("dir")
    assert isinstance(plugin, DirPlugin)
    scfg = {"type": "dir", "path": str(tmp_path / "missing")}
    assert plugin.free_name(scfg, 7, "subvol") == "subvol-7-disk-0.subvol"
    assert not (tmp_path / "missing").exists()
