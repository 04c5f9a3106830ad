"""storage.basepath: PVE's booleans, mount detection, and the dir storage's use of them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pvebackup.api.errors import StorageUnavailableError
from pvebackup.storage import DirPlugin
from pvebackup.storage.basepath import BasePath, is_mounted
from pvebackup.storage.properties import parse_boolean


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", True), ("on", True), ("YES", True), ("True", True),
     ("0", False), ("off", False), ("No", False), ("FALSE", False),
     ("2", None), ("", None), ("y", None), ("/mnt", None)],
)  # fmt: skip
def test_parse_boolean_like_pve(text: str, value: bool | None) -> None:
    assert parse_boolean(text) is value


def mount(source: str, target: Path, *opts: str) -> None:
    subprocess.run(["mount", *opts, source, str(target)], check=True)


def test_is_mounted_reads_mountinfo(tmp_path: Path) -> None:
    spaced = tmp_path / "a b\\c"  # written escaped (\040, \134) in mountinfo
    spaced.mkdir()
    plain = tmp_path / "plain"
    plain.mkdir()
    link = tmp_path / "link"
    link.symlink_to(spaced)
    assert not is_mounted(spaced) and not is_mounted(tmp_path / "missing")
    mount("pvebackup-test", spaced, "-t", "tmpfs", "-o", "size=1m")
    try:
        assert is_mounted(spaced) and is_mounted(link)  # symlinks resolved, as PVE does
        assert not is_mounted(plain)
        mount(str(plain), plain, "--bind")  # same file system: ismount() would miss it
        try:
            assert is_mounted(plain)
        finally:
            subprocess.run(["umount", str(plain)], check=True)
    finally:
        subprocess.run(["umount", str(spaced)], check=True)


def test_dir_storage_keeps_pve_default_and_honours_is_mountpoint(tmp_path: Path) -> None:
    plugin = DirPlugin()
    path = tmp_path / "vz"
    scfg = {"type": "dir", "path": str(path), "is_mountpoint": "yes"}
    with pytest.raises(StorageUnavailableError, match="not mounted"):
        plugin.alloc_subvol(scfg, "local", 100)
    assert not path.exists()
    scfg = {"type": "dir", "path": str(path), "create-base-path": "0"}
    with pytest.raises(StorageUnavailableError, match="does not exist"):
        plugin.alloc_image(scfg, "local", 100, "raw", 4096)
    assert not path.exists()
    # no property: Proxmox VE's default creates the base path
    volname = plugin.alloc_subvol({"type": "dir", "path": str(path)}, "local", 100)
    assert (path / "images" / volname).is_dir()


def test_a_file_in_place_of_the_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    base = BasePath("s1", tmp_path / "f", create_base_path=True)
    with pytest.raises(StorageUnavailableError, match="not a directory"):
        base.activate(create=True)
