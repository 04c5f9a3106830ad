"""The built-in dir storage: image paths, alloc/free with real qemu-img."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pvebackup.api.errors import (
    ExternalToolError,
    StateError,
    StorageConfigError,
    UnsupportedError,
    UsageError,
    VolumeNotFoundError,
)
from pvebackup.storage import DirPlugin, lookup


@pytest.fixture
def scfg(tmp_path: Path) -> dict[str, str]:
    return {"type": "dir", "path": str(tmp_path / "store")}


@pytest.fixture
def plugin() -> DirPlugin:
    p = lookup("dir")
    assert isinstance(p, DirPlugin)
    return p


def qemu_img_info(path: Path) -> dict[str, object]:
    out = subprocess.run(
        ["qemu-img", "info", "--output", "json", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    info: dict[str, object] = json.loads(out)
    return info


def test_image_path(plugin: DirPlugin, scfg: dict[str, str]) -> None:
    assert plugin.image_path(scfg, "100/vm-100-disk-0.qcow2") == (
        Path(scfg["path"]) / "images" / "100" / "vm-100-disk-0.qcow2"
    )
    # a linked clone of template 900: its own image, the base is its backing file
    assert plugin.image_path(scfg, "900/base-900-disk-0.qcow2/100/vm-100-disk-0.qcow2") == (
        Path(scfg["path"]) / "images" / "100" / "vm-100-disk-0.qcow2"
    )


@pytest.mark.parametrize(
    "volname",
    [
        "vm-100-disk-0.qcow2",
        "abc/x.raw",
        "100/../x",
        "100/a/b",
        "100/",
        "/100/x",
        "900/base/100/../x",
        "a/b/100/x",
        "900/base/100/x/y",
    ],
)
def test_image_path_refuses_bad_volnames(
    plugin: DirPlugin, scfg: dict[str, str], volname: str
) -> None:
    with pytest.raises(UsageError, match="invalid dir volume name"):
        plugin.image_path(scfg, volname)


def test_dir_holds_no_backups_and_has_no_provider(plugin: DirPlugin, scfg: dict[str, str]) -> None:
    assert plugin.new_backup_provider(scfg, "local", lambda level, msg: None) is None
    with pytest.raises(UnsupportedError, match="storage type dir does not hold backups"):
        plugin.list_volumes(scfg, "local")
    with pytest.raises(UnsupportedError, match="does not hold backups"):
        plugin.free_volume(scfg, "local", "x")


def test_path_is_a_required_property(plugin: DirPlugin) -> None:
    assert plugin.properties["path"].required
    assert plugin.properties["shared"].flag
    assert {"content", "disable", "nodes", "shared"} <= set(plugin.properties)


@pytest.mark.e2e
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_alloc_image_numbers_and_creates(plugin: DirPlugin, scfg: dict[str, str], fmt: str) -> None:
    first = plugin.alloc_image(scfg, "local", 100, fmt, 4 * 1024 * 1024)
    second = plugin.alloc_image(scfg, "local", 100, fmt, 1024 * 1024)
    assert (first, second) == (f"100/vm-100-disk-0.{fmt}", f"100/vm-100-disk-1.{fmt}")
    info = qemu_img_info(plugin.image_path(scfg, first))
    assert info["format"] == fmt
    assert info["virtual-size"] == 4 * 1024 * 1024
    # a gap is reused; the number space is shared with subvols
    plugin.free_image(scfg, first)
    assert not plugin.image_path(scfg, first).exists()
    assert plugin.alloc_subvol(scfg, "local", 100) == "100/subvol-100-disk-0.subvol"
    assert plugin.alloc_image(scfg, "local", 100, fmt, 512) == f"100/vm-100-disk-2.{fmt}"
    # another vmid has its own numbers
    assert plugin.alloc_image(scfg, "local", 101, fmt, 512) == f"101/vm-101-disk-0.{fmt}"


@pytest.mark.e2e
def test_alloc_image_with_name(plugin: DirPlugin, scfg: dict[str, str]) -> None:
    volname = plugin.alloc_image(scfg, "local", 7, "qcow2", 65536, name="vm-7-disk-9.qcow2")
    assert volname == "7/vm-7-disk-9.qcow2"
    assert qemu_img_info(plugin.image_path(scfg, volname))["format"] == "qcow2"
    with pytest.raises(StateError, match="exists already"):
        plugin.alloc_image(scfg, "local", 7, "qcow2", 65536, name="vm-7-disk-9.qcow2")
    # the failed attempt did not clobber the existing image
    assert qemu_img_info(plugin.image_path(scfg, volname))["format"] == "qcow2"


@pytest.mark.parametrize(
    ("fmt", "size", "name", "needle"),
    [
        ("vmdk", 1024, None, "unsupported image format"),
        ("qcow2", 0, None, "invalid image size"),
        ("qcow2", 1024, "disk.raw", "ending in .qcow2"),
        ("qcow2", 1024, "../x.qcow2", "invalid image name"),
    ],
)
def test_alloc_image_refuses_bad_arguments(
    plugin: DirPlugin, scfg: dict[str, str], fmt: str, size: int, name: str | None, needle: str
) -> None:
    with pytest.raises(UsageError, match=needle):
        plugin.alloc_image(scfg, "local", 100, fmt, size, name=name)
    assert not Path(scfg["path"]).exists() or not any(Path(scfg["path"]).rglob("*.*"))


@pytest.mark.e2e
def test_alloc_image_tool_failure_leaves_nothing(plugin: DirPlugin, scfg: dict[str, str]) -> None:
    # qemu-img refuses a size it cannot represent (preallocation is checked
    # before, by storage.cfg parsing, so it can no longer make it fail)
    with pytest.raises(ExternalToolError, match="qemu-img create"):
        plugin.alloc_image(scfg, "local", 100, "qcow2", (1 << 63) - 1)
    assert list((Path(scfg["path"]) / "images" / "100").iterdir()) == []


def test_alloc_and_free_subvol(plugin: DirPlugin, scfg: dict[str, str]) -> None:
    volname = plugin.alloc_subvol(scfg, "local", 200)
    assert volname == "200/subvol-200-disk-0.subvol"
    path = plugin.image_path(scfg, volname)
    assert path == Path(scfg["path"]) / "images" / "200" / "subvol-200-disk-0.subvol"
    assert path.is_dir()
    (path / "etc").mkdir()
    (path / "etc" / "hostname").write_text("ct200\n")
    assert plugin.alloc_subvol(scfg, "local", 200) == "200/subvol-200-disk-1.subvol"
    assert plugin.alloc_subvol(scfg, "local", 200, name="mp0") == "200/mp0"
    with pytest.raises(StateError, match="exists already"):
        plugin.alloc_subvol(scfg, "local", 200, name="mp0")
    plugin.free_image(scfg, volname)  # removes the tree
    assert not path.exists()
    plugin.free_image(scfg, "200/subvol-200-disk-1.subvol")
    assert path.parent.is_dir()  # 200/mp0 is still there
    plugin.free_image(scfg, "200/mp0")
    assert not path.parent.exists()  # the guest's last volume took its directory along


def test_free_missing_volume(plugin: DirPlugin, scfg: dict[str, str]) -> None:
    with pytest.raises(VolumeNotFoundError, match="100/vm-100-disk-0.qcow2"):
        plugin.free_image(scfg, "100/vm-100-disk-0.qcow2")


def test_bad_vmid_and_missing_path(plugin: DirPlugin, scfg: dict[str, str]) -> None:
    with pytest.raises(UsageError, match="invalid vmid"):
        plugin.alloc_subvol(scfg, "local", 0)
    with pytest.raises(StorageConfigError, match="needs 'path'"):
        plugin.image_path({"type": "dir"}, "100/x.raw")
