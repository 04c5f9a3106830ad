"""prepare_backup_directory: bind-mounted and copied views, always cleaned up."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from lxc_fixtures import make_container_tree

from pvebackup.api.errors import UnsafeArchiveError
from pvebackup.host.lxc.directory import backup_sources, prepare_backup_directory
from treecompare import compare_trees


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == str(path) or p.startswith(f"{path}/")]


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, list[tuple[str, Path]], Path]:
    """(rootfs, mount points, workdir) of a small container."""
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc/hostname").write_text("ct100\n")
    (rootfs / "srv").mkdir()
    srv, data, new = tmp_path / "mp-srv", tmp_path / "mp-data", tmp_path / "mp-new"
    for d in (srv, data, new):
        d.mkdir()
    (srv / "data").mkdir()
    # Hidden by the mount points in the running container: not in the view.
    (rootfs / "srv/hidden").write_text("under /srv\n")
    (srv / "data/hidden").write_text("under /srv/data\n")
    (srv / "srv-file").write_text("srv\n")
    (data / "data-file").write_text("data\n")
    (new / "new-file").write_text("new\n")
    # Config order on purpose not parents-first.
    mps = [("/srv/data", data), ("/mnt/new/deep", new), ("/srv", srv)]
    workdir = tmp_path / "work"
    workdir.mkdir()
    return rootfs, mps, workdir


def check_view(view: Path) -> None:
    assert (view / "etc/hostname").read_text() == "ct100\n"
    assert (view / "srv/srv-file").read_text() == "srv\n"
    assert (view / "srv/data/data-file").read_text() == "data\n"
    assert (view / "mnt/new/deep/new-file").read_text() == "new\n"
    assert not (view / "srv/hidden").exists()
    assert not (view / "srv/data/hidden").exists()


def test_backup_sources_in_config_order(layout: tuple[Path, list[tuple[str, Path]], Path]) -> None:
    _rootfs, mps, _workdir = layout
    assert backup_sources(mps) == [".", "./srv/data", "./mnt/new/deep", "./srv"]
    assert backup_sources([]) == ["."]
    with pytest.raises(ValueError):
        backup_sources([("srv", Path("/x"))])
    with pytest.raises(UnsafeArchiveError):
        backup_sources([("/srv/../etc", Path("/x"))])


@pytest.mark.e2e
def test_bind_view_is_read_only_and_unmounted(
    layout: tuple[Path, list[tuple[str, Path]], Path],
) -> None:
    rootfs, mps, workdir = layout
    with prepare_backup_directory(rootfs, mps, running=False, workdir=workdir) as view:
        check_view(view)
        assert len(mounts_under(workdir)) == 4
        with pytest.raises(OSError) as info:
            (view / "srv/data/x").write_text("no")
        assert info.value.errno == errno.EROFS
        with pytest.raises(OSError):
            (view / "etc/new").write_text("no")
    assert mounts_under(workdir) == []
    assert list(workdir.iterdir()) == []
    # Nothing mounted below the view leaked into the real rootfs ...
    assert mounts_under(rootfs) == []
    assert not (rootfs / "srv/srv-file").exists()
    # ... but missing mount point directories were created there, as PVE does.
    assert (rootfs / "mnt/new/deep").is_dir()
    # The nested mount point was not mounted into the host directory of "/srv".
    assert not (rootfs.parent / "mp-srv/data/data-file").exists()


@pytest.mark.e2e
def test_bind_view_unmounted_when_body_raises(
    layout: tuple[Path, list[tuple[str, Path]], Path],
) -> None:
    rootfs, mps, workdir = layout
    with pytest.raises(RuntimeError, match="boom"):
        with prepare_backup_directory(rootfs, mps, running=False, workdir=workdir) as view:
            check_view(view)
            raise RuntimeError("boom")
    assert mounts_under(workdir) == []
    assert list(workdir.iterdir()) == []


@pytest.mark.e2e
@pytest.mark.parametrize("running", [False, True])
def test_symlinked_mount_point_is_refused(
    layout: tuple[Path, list[tuple[str, Path]], Path], tmp_path: Path, running: bool
) -> None:
    rootfs, _mps, workdir = layout
    host_dir = tmp_path / "hostdir"
    host_dir.mkdir()
    (rootfs / "opt").symlink_to(host_dir)
    with pytest.raises(UnsafeArchiveError, match="symlink"):
        with prepare_backup_directory(
            rootfs, [("/opt/x", tmp_path / "mp-data")], running=running, workdir=workdir
        ):
            pass
    assert mounts_under(workdir) == []
    assert list(workdir.iterdir()) == []
    assert list(host_dir.iterdir()) == []


@pytest.mark.e2e
def test_copy_view_preserves_everything_and_is_removed(tmp_path: Path) -> None:
    rootfs = make_container_tree(tmp_path / "ct")
    data = tmp_path / "mp-data"
    (data / "sub").mkdir(parents=True)
    (data / "sub/f").write_text("mp\n")
    workdir = tmp_path / "work"
    workdir.mkdir()
    mps = [("/srv/data", data)]
    with prepare_backup_directory(rootfs, mps, running=True, workdir=workdir) as view:
        assert compare_trees(data, view / "srv/data") == []
        diffs = compare_trees(rootfs, view)
        # Only the mount point's contents differ from the rootfs.
        assert diffs and all(d.startswith("srv/data") for d in diffs), diffs
        (view / "scratch").write_text("the copy is ours")
    assert list(workdir.iterdir()) == []
    assert not (rootfs / "scratch").exists()


@pytest.mark.e2e
def test_copy_view_removed_when_body_raises(
    layout: tuple[Path, list[tuple[str, Path]], Path],
) -> None:
    rootfs, mps, workdir = layout
    with pytest.raises(RuntimeError):
        with prepare_backup_directory(rootfs, mps, running=True, workdir=workdir) as view:
            check_view(view)
            raise RuntimeError("boom")
    assert list(workdir.iterdir()) == []
