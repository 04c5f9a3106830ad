"""The dir storage with symlinks planted below its path: no write or delete outside."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pvebackup.api.errors import UnsafeStorageError
from pvebackup.storage import DirPlugin, lookup


@pytest.fixture
def scfg(tmp_path: Path) -> dict[str, str]:
    return {"type": "dir", "path": str(tmp_path / "store")}


@pytest.fixture
def plugin() -> DirPlugin:
    p = lookup("dir")
    assert isinstance(p, DirPlugin)
    return p


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "precious").write_text("host data\n")
    return d


def intact(outside: Path) -> bool:
    return sorted(os.listdir(outside)) == ["precious"] and (
        (outside / "precious").read_text() == "host data\n"
    )


@pytest.mark.parametrize("planted", ["images", "images/200"])
def test_alloc_refuses_a_symlinked_guest_directory(
    plugin: DirPlugin, scfg: dict[str, str], outside: Path, planted: str
) -> None:
    link = Path(scfg["path"]) / planted
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    with pytest.raises(UnsafeStorageError):
        plugin.alloc_subvol(scfg, "local", 200)
    with pytest.raises(UnsafeStorageError):
        plugin.alloc_image(scfg, "local", 200, "raw", 65536)
    with pytest.raises(UnsafeStorageError):
        plugin.image_path(scfg, "200/vm-200-disk-0.raw")
    with pytest.raises(UnsafeStorageError):
        plugin.free_image(scfg, "200/precious")
    assert intact(outside)


def test_free_of_a_subvol_unlinks_symlinks_inside_and_keeps_their_targets(
    plugin: DirPlugin, scfg: dict[str, str], outside: Path
) -> None:
    volname = plugin.alloc_subvol(scfg, "local", 200)
    path = Path(scfg["path"]) / "images" / volname
    (path / "etc").mkdir()
    (path / "etc" / "to-host").symlink_to(outside)
    (path / "to-file").symlink_to(outside / "precious")
    plugin.free_image(scfg, volname)
    assert not path.exists()
    assert intact(outside)


def test_free_refuses_a_volume_that_is_a_symlink(
    plugin: DirPlugin, scfg: dict[str, str], outside: Path
) -> None:
    (Path(scfg["path"]) / "images" / "200").mkdir(parents=True)
    link = Path(scfg["path"]) / "images" / "200" / "subvol-200-disk-0.subvol"
    link.symlink_to(outside)
    with pytest.raises(UnsafeStorageError):
        plugin.free_image(scfg, "200/subvol-200-disk-0.subvol")
    with pytest.raises(UnsafeStorageError):
        plugin.image_path(scfg, "200/subvol-200-disk-0.subvol")
    assert intact(outside)
