"""Restore from tar archives (GNU tar, compressed) and from directories."""

from __future__ import annotations

import gzip
import os
import stat
import subprocess
from pathlib import Path

import pytest
import zstandard
from lxc_fixtures import PASSTHROUGH_MAP, LogRecorder

from pvebackup.api.errors import IntegrityError
from pvebackup.host.lxc.restore import copy_directory, extract_tar
from treecompare import compare_trees


def gnu_tar(source: Path, archive: Path) -> None:
    subprocess.run(
        [
            "tar",
            "--xattrs",
            "--xattrs-include=*",
            "--acls",
            "--numeric-owner",
            "--sparse",
            "-cpf",
            str(archive),
            "-C",
            str(source),
            ".",
        ],
        check=True,
    )


def compress(archive: Path, kind: str) -> Path:
    data = archive.read_bytes()
    if kind == "zstd":
        out = archive.with_suffix(".tar.zst")
        out.write_bytes(zstandard.ZstdCompressor().compress(data))
    elif kind == "gzip":
        out = archive.with_suffix(".tar.gz")
        out.write_bytes(gzip.compress(data))
    else:
        out = archive
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("compression", ["plain", "zstd", "gzip"])
def test_gnu_tar_roundtrip_unprivileged(
    container_tree: Path, tmp_path: Path, log: LogRecorder, compression: str
) -> None:
    archive = tmp_path / "ct.tar"
    gnu_tar(container_tree, archive)
    archive = compress(archive, compression)
    target = tmp_path / "target"
    target.mkdir()
    extract_tar(archive, {"/": target}, PASSTHROUGH_MAP, log=log)
    # Written in the container's user namespace: the kernel refuses device nodes.
    assert compare_trees(container_tree, target, uid_map=PASSTHROUGH_MAP) == (
        skipped_devices(container_tree)
    )
    # Spot checks that the comparison itself saw the mapping.
    assert (target / "home/user/notes.txt").stat().st_uid == 1000
    assert (target / "home/user/other").stat().st_uid == 101001
    assert target.stat().st_uid == 100000
    assert_device_warnings(log)


@pytest.mark.e2e
def test_gnu_tar_roundtrip_privileged(
    container_tree: Path, tmp_path: Path, log: LogRecorder
) -> None:
    archive = tmp_path / "ct.tar"
    gnu_tar(container_tree, archive)
    target = tmp_path / "target"
    target.mkdir()
    extract_tar(archive, {"/": target}, [], log=log)
    assert compare_trees(container_tree, target) == []
    assert (target / "srv/sparse.img").stat().st_blocks * 512 < 1 << 20


@pytest.mark.e2e
def test_tar_with_mount_point_targets(
    container_tree: Path, tmp_path: Path, log: LogRecorder
) -> None:
    archive = tmp_path / "ct.tar"
    gnu_tar(container_tree, archive)
    root, data = tmp_path / "root", tmp_path / "data"
    root.mkdir()
    data.mkdir()
    extract_tar(archive, {"/": root, "/srv/data": data}, [], log=log)
    assert compare_trees(container_tree / "srv/data", data) == []
    assert_mount_point_dir(root / "srv/data", container_tree / "srv/data")
    assert (root / "srv/sparse.img").is_file()


def test_directory_roundtrip(container_tree: Path, tmp_path: Path, log: LogRecorder) -> None:
    target = tmp_path / "target"
    target.mkdir()
    copy_directory(container_tree, {"/": target}, PASSTHROUGH_MAP, log=log)
    assert compare_trees(container_tree, target, uid_map=PASSTHROUGH_MAP) == (
        skipped_devices(container_tree)
    )
    assert_device_warnings(log)


def test_directory_roundtrip_privileged(
    container_tree: Path, tmp_path: Path, log: LogRecorder
) -> None:
    target = tmp_path / "target"
    target.mkdir()
    copy_directory(container_tree, {"/": target}, [], log=log)
    assert compare_trees(container_tree, target) == []
    assert log.warnings() == []


def test_directory_with_mount_point(container_tree: Path, tmp_path: Path, log: LogRecorder) -> None:
    root, data = tmp_path / "root", tmp_path / "data"
    root.mkdir()
    data.mkdir()
    copy_directory(container_tree, {"/": root, "/srv/data/": data}, [], log=log)
    assert compare_trees(container_tree / "srv/data", data) == []
    assert_mount_point_dir(root / "srv/data", container_tree / "srv/data")


def test_unmapped_owner_becomes_nobody(tmp_path: Path, log: LogRecorder) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    os.chown(src / "f", 70000, 70001)
    target = tmp_path / "target"
    target.mkdir()
    copy_directory(src, {"/": target}, PASSTHROUGH_MAP, log=log)
    st = (target / "f").stat()
    assert (st.st_uid, st.st_gid) == (100000 + 65534, 100000 + 65534)
    assert any("uid 70000" in w for w in log.warnings())
    assert any("gid 70001" in w for w in log.warnings())


def test_corrupt_archive(tmp_path: Path, log: LogRecorder) -> None:
    bad = tmp_path / "bad.tar.zst"
    bad.write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(600))
    target = tmp_path / "t"
    target.mkdir()
    with pytest.raises(IntegrityError):
        extract_tar(bad, {"/": target}, [], log=log)


def test_targets_need_root(tmp_path: Path, log: LogRecorder) -> None:
    with pytest.raises(ValueError, match="root"):
        copy_directory(tmp_path, {"/srv": tmp_path}, [], log=log)


def assert_mount_point_dir(made: Path, source: Path) -> None:
    """The rootfs gets the directory the mount point is mounted on, like its root."""
    got, want = made.lstat(), source.lstat()
    assert stat.S_ISDIR(got.st_mode)
    assert not any(made.iterdir())
    assert (got.st_uid, got.st_gid, stat.S_IMODE(got.st_mode)) == (
        want.st_uid, want.st_gid, stat.S_IMODE(want.st_mode))
    assert got.st_mtime_ns == want.st_mtime_ns


def skipped_devices(tree: Path) -> list[str]:
    """What compare_trees reports for the fixture's device nodes, left out."""
    return [f"dev/loop0: only in {tree}", f"dev/null: only in {tree}"]


def assert_device_warnings(log: LogRecorder) -> None:
    warnings = log.warnings()
    assert len(warnings) == 2, warnings
    assert "dev/loop0: device node 7:0 not restored" in warnings[0]
    assert "dev/null: device node 1:3 not restored" in warnings[1]
