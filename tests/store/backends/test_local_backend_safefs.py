"""The local backend never follows a symlink below the store's root.

Hostile layouts are built in the test: ``store`` is the configured path, ``outside``
a host directory an attacker with write access to the store aims at.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

from pvebackup.api.errors import ObjectNotFoundError, UnsafeStorageError
from pvebackup.store.backends.local import LocalBackend


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "precious").write_bytes(b"host data")
    return d


def intact(outside: Path) -> bool:
    return os.listdir(outside) == ["precious"] and (outside / "precious").read_bytes() == (
        b"host data"
    )


@pytest.mark.parametrize("link", ["chunks", "chunks/ab12"])
def test_put_refuses_a_symlinked_directory(tmp_path: Path, outside: Path, link: str) -> None:
    b = LocalBackend(tmp_path / "store")
    (tmp_path / "store" / link).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "store" / link).symlink_to(outside)
    with pytest.raises(UnsafeStorageError, match="symlink"):
        b.put("chunks/ab12/ab12cd", b"chunk", overwrite=False, durable=False)
    with pytest.raises(UnsafeStorageError):
        b.exists("chunks/ab12/ab12cd")
    assert intact(outside)


def test_snapshot_directory_symlink_is_refused_and_not_listed(
    tmp_path: Path, outside: Path
) -> None:
    b = LocalBackend(tmp_path / "store")
    b.put("snapshots/vm/100/real/manifest", b"m", overwrite=False)
    (tmp_path / "store" / "snapshots" / "vm" / "100" / "fake").symlink_to(outside)
    assert list(b.list("snapshots/")) == ["snapshots/vm/100/real/manifest"]
    for call in (b.get, b.exists, b.stat, b.delete):
        with pytest.raises(UnsafeStorageError):
            call("snapshots/vm/100/fake/precious")
    assert intact(outside)


def test_symlinked_object_is_refused_and_deleted_as_a_link(tmp_path: Path, outside: Path) -> None:
    b = LocalBackend(tmp_path / "store")
    b.put("d/x", b"x", overwrite=False)
    (tmp_path / "store" / "d" / "link").symlink_to(outside / "precious")
    with pytest.raises(UnsafeStorageError):
        b.get("d/link")
    with pytest.raises(UnsafeStorageError):
        b.stat("d/link")
    with pytest.raises(UnsafeStorageError):
        b.get_range("d/link", 0, 4)
    assert sorted(b.list("d/")) == ["d/x"]
    b.put("d/link", b"ours", overwrite=True)  # replaces the link, never writes through it
    assert b.get("d/link") == b"ours"
    (tmp_path / "store" / "d" / "link2").symlink_to(outside / "precious")
    b.delete("d/link2")
    assert not (tmp_path / "store" / "d" / "link2").is_symlink()
    assert intact(outside)


def test_fifo_object_does_not_hang_a_read(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "store")
    os.mkfifo(tmp_path / "store" / "fifo")
    with pytest.raises(UnsafeStorageError, match="special file"):
        b.get("fifo")


def test_the_store_root_itself_may_be_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "disk"
    real.mkdir()
    (tmp_path / "store").symlink_to(real)
    b = LocalBackend(tmp_path / "store")
    b.put("chunks/ab/abcd", b"x", overwrite=False)
    assert (real / "chunks" / "ab" / "abcd").read_bytes() == b"x"
    assert list(b.list()) == ["chunks/ab/abcd"]


def test_root_swapped_after_open_keeps_writing_into_the_store(
    tmp_path: Path, outside: Path
) -> None:
    """The backend holds its root open: a later swap of a directory below does not count."""
    b = LocalBackend(tmp_path / "store")
    b.put("chunks/ab/1", b"x", overwrite=False)
    os.rename(tmp_path / "store" / "chunks", tmp_path / "chunks.moved")
    (tmp_path / "store" / "chunks").symlink_to(outside)
    with pytest.raises(UnsafeStorageError):
        b.put("chunks/ab/2", b"y", overwrite=False)
    with pytest.raises(UnsafeStorageError):
        b.get("chunks/ab/1")
    assert intact(outside)


def test_a_file_where_a_directory_is_expected_is_just_missing(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "store")
    b.put("obj", b"x", overwrite=False)
    with pytest.raises(ObjectNotFoundError):
        b.get("obj/below")
    assert not b.exists("obj/below")
    b.delete("obj/below")


def test_list_of_a_wide_store_holds_few_fds(tmp_path: Path) -> None:
    """Directories to visit are names, not open fds: 600 of them fit under 64 fds."""
    b = LocalBackend(tmp_path / "store")
    for i in range(600):
        b.put(f"chunks/{i:03x}/{i:064x}", b"x", overwrite=False, durable=False)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    try:
        keys = list(b.list("chunks/"))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(keys) == 600
