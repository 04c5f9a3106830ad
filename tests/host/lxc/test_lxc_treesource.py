"""The directory mechanism's source: a storage that swaps paths for symlinks under us.

The provider's directory lies on backup storage that others may change while we
read it. Whatever they swap, nothing from outside the directory may reach the
restored container.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from lxc_fixtures import LogRecorder

from pvebackup.api.errors import PveBackupError, UnsafeArchiveError
from pvebackup.api.idmap import DEFAULT_UNPRIVILEGED_MAP
from pvebackup.host.lxc.restore import copy_directory
from pvebackup.host.lxc.treesource import MAX_DEPTH, walk_source
from pvebackup.host.lxc.writer import EntryKind

SECRET = "host secret"


@pytest.fixture
def host_dir(tmp_path: Path) -> Path:
    """A host directory a hostile storage would like to see copied into the container."""
    d = tmp_path / "host-etc"
    d.mkdir()
    (d / "shadow").write_text(SECRET)
    (d / "sub").mkdir()
    (d / "sub/key").write_text(SECRET)
    return d


def source_tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "b").mkdir(parents=True)
    (src / "a").write_text("a")
    (src / "b/inner").write_text("inner")
    (src / "c").write_text("c")
    return src


def leaked(target: Path) -> list[Path]:
    """Files in the restored tree that came from the host directory."""
    return [
        p for p in target.rglob("*")
        if p.name in ("shadow", "key", "sub")
        or (p.is_file() and not p.is_symlink() and p.read_bytes() == SECRET.encode())
    ]


@pytest.mark.parametrize("unprivileged", [False, True], ids=["privileged", "userns"])
def test_symlinked_source_root_is_refused(
    tmp_path: Path, host_dir: Path, log: LogRecorder, unprivileged: bool
) -> None:
    src = tmp_path / "src"
    src.symlink_to(host_dir)
    target = tmp_path / "target"
    target.mkdir()
    id_map = list(DEFAULT_UNPRIVILEGED_MAP) if unprivileged else []
    with pytest.raises(UnsafeArchiveError, match="symlink"):
        copy_directory(src, {"/": target}, id_map, log=log)
    assert leaked(target) == []


@pytest.mark.parametrize("unprivileged", [False, True], ids=["privileged", "userns"])
def test_symlinked_directory_is_copied_as_a_link(
    tmp_path: Path, host_dir: Path, log: LogRecorder, unprivileged: bool
) -> None:
    src = source_tree(tmp_path)
    os.rename(src / "b", tmp_path / "b-away")
    (src / "b").symlink_to(host_dir)  # absolute: fine as a link, never followed
    target = tmp_path / "target"
    target.mkdir()
    id_map = list(DEFAULT_UNPRIVILEGED_MAP) if unprivileged else []
    copy_directory(src, {"/": target}, id_map, log=log)
    assert os.readlink(target / "b") == str(host_dir)
    assert leaked(target) == []
    assert (target / "a").read_text() == "a"


def test_directory_swapped_for_symlink_after_listing(tmp_path: Path, host_dir: Path) -> None:
    # "b" is listed as a directory; before it is opened it becomes a symlink to
    # the host directory, and "c" a fifo nobody writes (opening it would block).
    src = source_tree(tmp_path)
    log = LogRecorder()
    seen = []
    for entry, _data in walk_source(src, log):
        seen.append((entry.name, entry.kind))
        if entry.name == "a":
            os.rename(src / "b", tmp_path / "b-away")
            (src / "b").symlink_to(host_dir)
            (src / "c").unlink()
            os.mkfifo(src / "c")
    assert seen == [
        ("", EntryKind.DIR),
        ("a", EntryKind.FILE),
        ("b", EntryKind.SYMLINK),
        ("c", EntryKind.FIFO),
    ]


def test_directory_swapped_after_open_keeps_reading_the_original(
    tmp_path: Path, host_dir: Path
) -> None:
    # "b" was opened; then its path is pointed at the host. Its children still
    # come from the directory that was opened, never from the host.
    src = source_tree(tmp_path)
    names = []
    for entry, _data in walk_source(src, LogRecorder()):
        names.append(entry.name)
        if entry.name == "b":
            os.rename(src / "b", tmp_path / "b-away")
            (src / "b").symlink_to(host_dir)
    assert names == ["", "a", "b", "b/inner", "c"]


@pytest.mark.parametrize("unprivileged", [False, True], ids=["privileged", "userns"])
def test_swap_race_during_copy(
    tmp_path: Path, host_dir: Path, log: LogRecorder, unprivileged: bool
) -> None:
    src = tmp_path / "src"
    for i in range(30):
        (src / f"d{i:02}" / "x").mkdir(parents=True)
        (src / f"d{i:02}" / "x" / "f").write_text("ok")
    stop = threading.Event()

    def flip() -> None:
        # Keep swapping every directory for a symlink to the host and back.
        while not stop.is_set():
            for i in range(30):
                d = src / f"d{i:02}"
                os.rename(d, tmp_path / "aside")
                d.symlink_to(host_dir)
                d.unlink()
                os.rename(tmp_path / "aside", d)

    flipper = threading.Thread(target=flip)
    flipper.start()
    id_map = list(DEFAULT_UNPRIVILEGED_MAP) if unprivileged else []
    try:
        for round_ in range(5):
            target = tmp_path / f"target{round_}"
            target.mkdir()
            try:
                copy_directory(src, {"/": target}, id_map, log=log)
            except PveBackupError:
                pass  # a vanished entry may fail the restore; leaking may not happen
            assert leaked(target) == []
    finally:
        stop.set()
        flipper.join()


def test_nesting_is_bounded(tmp_path: Path, log: LogRecorder) -> None:
    src = tmp_path / "src"
    deep = src
    deep.mkdir()
    fd = os.open(deep, os.O_RDONLY)
    try:
        for _ in range(MAX_DEPTH + 2):  # deeper than PATH_MAX allows by name
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)
    with pytest.raises(UnsafeArchiveError, match="nested deeper"):
        for _entry in walk_source(src, log):
            pass
