"""kit.safefs: walking storage content by directory fds, never following a symlink.

Every hostile layout is built in the test under tmp_path: ``storage`` plays the
storage's configured path, ``outside`` the host files an attacker aims at.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pvebackup.api.errors import UnsafeArchiveError, UnsafeStorageError
from pvebackup.kit import safefs
from pvebackup.kit.safefs import owned_fd


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A host directory with a file the storage must never reach."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "precious").write_text("host data\n")
    (d / "sub").mkdir()
    (d / "sub" / "deep").write_text("more host data\n")
    return d


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    d = tmp_path / "storage"
    d.mkdir()
    return d


def assert_outside_intact(outside: Path) -> None:
    assert (outside / "precious").read_text() == "host data\n"
    assert (outside / "sub" / "deep").read_text() == "more host data\n"
    assert sorted(os.listdir(outside)) == ["precious", "sub"]


# names -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "nul\0byte"])
def test_check_name_refuses_what_is_not_one_component(bad: str) -> None:
    with pytest.raises(UnsafeStorageError):
        safefs.check_name(bad)


@pytest.mark.parametrize("bad", ["/etc", "a/../b", "a//b", "a/", "./a", "a/\0"])
def test_split_relpath_refuses_escaping_paths(bad: str) -> None:
    with pytest.raises(UnsafeStorageError):
        safefs.split_relpath(bad)


def test_split_relpath_accepts_plain_paths() -> None:
    assert safefs.split_relpath("") == ()
    assert safefs.split_relpath("a/b.c/.d") == ("a", "b.c", ".d")


def test_unsafe_storage_error_is_the_exit_8_refusal() -> None:
    assert issubclass(UnsafeStorageError, UnsafeArchiveError)
    assert UnsafeStorageError.exit_code == 8


# open_dir ----------------------------------------------------------------------------


def test_open_dir_walks_real_directories(storage: Path) -> None:
    (storage / "a" / "b").mkdir(parents=True)
    (storage / "a" / "b" / "f").write_text("x")
    with owned_fd(safefs.open_dir(storage, "a/b")) as fd:
        assert safefs.read_file_at(fd, "f") == b"x"


def test_open_dir_refuses_a_symlinked_component(storage: Path, outside: Path) -> None:
    (storage / "a").mkdir()
    (storage / "a" / "b").symlink_to(outside)
    with pytest.raises(UnsafeStorageError, match="symlink"):
        safefs.open_dir(storage, "a/b/sub")
    with pytest.raises(UnsafeStorageError, match="symlink"):
        safefs.open_dir(storage, "a/b/sub/new", create=True)
    assert_outside_intact(outside)


def test_open_dir_create_never_creates_through_a_symlink(storage: Path, outside: Path) -> None:
    (storage / "link").symlink_to(outside)
    with pytest.raises(UnsafeStorageError):
        safefs.open_dir(storage, "link/made-by-us", create=True)
    assert not (outside / "made-by-us").exists()


def test_open_dir_root_may_be_a_symlink(tmp_path: Path, storage: Path) -> None:
    # The configured path is the operator's: linking it to a mounted disk is normal.
    (storage / "d").mkdir()
    (tmp_path / "configured").symlink_to(storage)
    with owned_fd(safefs.open_dir(tmp_path / "configured", "d")) as fd:
        assert safefs.listdir_at(fd) == []


def test_open_dir_a_regular_file_is_not_a_directory(storage: Path) -> None:
    (storage / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        safefs.open_dir(storage, "f/g")


def test_open_dir_refuses_a_fifo(storage: Path) -> None:
    os.mkfifo(storage / "fifo")
    with pytest.raises(UnsafeStorageError, match="special file"):
        safefs.open_dir(storage, "fifo")


def test_open_dir_missing_and_created(storage: Path) -> None:
    with pytest.raises(FileNotFoundError):
        safefs.open_dir(storage, "x/y")
    with owned_fd(safefs.open_dir(storage, "x/y", create=True, durable=True)) as fd:
        safefs.atomic_write_at(fd, "f", b"1")
    assert (storage / "x" / "y" / "f").read_bytes() == b"1"


def test_open_dir_race_directory_swapped_for_symlink_is_refused(
    storage: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the lstat a naive walker would do and the open, ``b`` becomes a link.

    The swap happens inside the walk, right before the step that opens ``b``: the
    lstat-then-open pattern would have passed its check and then followed it.
    """
    (storage / "a" / "b").mkdir(parents=True)
    real_open = safefs._open_component
    swapped: list[str] = []

    def racing_open(name: str, dir_fd: int) -> int:
        if name == "b" and not swapped:
            # The attacker's move, after any check a walker could have made.
            assert os.stat("b", dir_fd=dir_fd, follow_symlinks=False).st_mode & 0o40000
            os.rename("b", "b.moved", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.symlink(str(outside), "b", dir_fd=dir_fd)
            swapped.append(name)
        return real_open(name, dir_fd)

    monkeypatch.setattr(safefs, "_open_component", racing_open)
    with pytest.raises(UnsafeStorageError, match="symlink"):
        safefs.open_dir(storage, "a/b/sub", create=True)
    assert swapped == ["b"]
    assert_outside_intact(outside)


def test_a_held_directory_fd_ignores_a_later_swap(storage: Path, outside: Path) -> None:
    """Once opened, a directory stays itself: writes go to the real one, not the link."""
    (storage / "d").mkdir()
    with owned_fd(safefs.open_dir(storage, "d")) as fd:
        os.rename(storage / "d", storage / "d.moved")
        (storage / "d").symlink_to(outside)
        safefs.atomic_write_at(fd, "precious", b"attacker wins?")
    assert_outside_intact(outside)
    assert (storage / "d.moved" / "precious").read_bytes() == b"attacker wins?"


# files -------------------------------------------------------------------------------


def test_open_file_at_refuses_symlinks_and_special_files(storage: Path, outside: Path) -> None:
    (storage / "link").symlink_to(outside / "precious")
    os.mkfifo(storage / "fifo")
    (storage / "dir").mkdir()
    with owned_fd(safefs.open_root(storage)) as root:
        with pytest.raises(UnsafeStorageError, match="symlink"):
            safefs.read_file_at(root, "link")
        with pytest.raises(UnsafeStorageError, match="special file"):
            safefs.read_file_at(root, "fifo")  # and it does not hang on the fifo
        with pytest.raises(IsADirectoryError):
            safefs.read_file_at(root, "dir")
        with pytest.raises(UnsafeStorageError, match="symlink"):
            safefs.open_file_at(root, "link", os.O_WRONLY | os.O_TRUNC)
    assert_outside_intact(outside)


def test_read_file_at_bounds_the_size(storage: Path) -> None:
    (storage / "big").write_bytes(b"x" * 100)
    with owned_fd(safefs.open_root(storage)) as root:
        with pytest.raises(UnsafeStorageError, match="100 bytes"):
            safefs.read_file_at(root, "big", limit=99)
        assert safefs.read_file_at(root, "big", limit=100) == b"x" * 100


def test_atomic_write_at_replaces_a_symlink_instead_of_following_it(
    storage: Path, outside: Path
) -> None:
    (storage / "state").symlink_to(outside / "precious")
    with owned_fd(safefs.open_root(storage)) as root:
        assert safefs.atomic_write_at(root, "state", b"ours\n")
    assert not (storage / "state").is_symlink()
    assert (storage / "state").read_bytes() == b"ours\n"
    assert_outside_intact(outside)


def test_atomic_write_at_without_overwrite_leaves_a_symlink_alone(
    storage: Path, outside: Path
) -> None:
    (storage / "state").symlink_to(outside / "precious")
    with owned_fd(safefs.open_root(storage)) as root:
        assert safefs.atomic_write_at(root, "state", b"ours\n", overwrite=False) is False
    assert_outside_intact(outside)


def test_atomic_write_at_removes_its_temp_file_on_error(
    storage: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with owned_fd(safefs.open_root(storage)) as root:
        monkeypatch.setattr(os, "write", full)
        with pytest.raises(OSError, match="No space"):
            safefs.atomic_write_at(root, "f", b"data")
        monkeypatch.undo()
    assert os.listdir(storage) == []


def test_atomic_write_at_keeps_the_old_content_until_the_rename(storage: Path) -> None:
    (storage / "f").write_bytes(b"old")
    with owned_fd(safefs.open_root(storage)) as root:
        assert safefs.atomic_write_at(root, "f", b"new", mode=0o600)
    assert (storage / "f").read_bytes() == b"new"
    assert (storage / "f").stat().st_mode & 0o777 == 0o600
    assert os.listdir(storage) == ["f"]


def test_atomic_write_path_for_trusted_paths(tmp_path: Path) -> None:
    target = tmp_path / "etc" / "state.json"
    target.parent.mkdir()
    safefs.atomic_write_path(target, b"{}", mode=0o600)
    assert target.read_bytes() == b"{}" and target.stat().st_mode & 0o777 == 0o600
    assert os.listdir(target.parent) == ["state.json"]


def test_make_dir_at_never_reuses_a_name(storage: Path, outside: Path) -> None:
    (storage / "taken").symlink_to(outside)
    with owned_fd(safefs.open_root(storage)) as root:
        with pytest.raises(FileExistsError):
            safefs.make_dir_at(root, "taken")
        with owned_fd(safefs.make_dir_at(root, "new")) as fd:
            assert safefs.listdir_at(fd) == []


# rmtree_at ---------------------------------------------------------------------------


def test_rmtree_at_unlinks_symlinks_and_leaves_their_targets(
    storage: Path, outside: Path
) -> None:
    victim = storage / "vol"
    (victim / "a" / "b").mkdir(parents=True)
    (victim / "a" / "file").write_text("ours")
    (victim / "to-dir").symlink_to(outside)
    (victim / "a" / "to-file").symlink_to(outside / "precious")
    (victim / "a" / "b" / "to-sub").symlink_to(outside / "sub")
    (victim / "a" / "b" / "dangling").symlink_to(storage / "nowhere")
    os.mkfifo(victim / "a" / "fifo")
    with owned_fd(safefs.open_root(storage)) as root:
        safefs.rmtree_at(root, "vol")
    assert not victim.exists() and not victim.is_symlink()
    assert_outside_intact(outside)


def test_rmtree_at_refuses_a_symlink_at_the_top(storage: Path, outside: Path) -> None:
    (storage / "vol").symlink_to(outside)
    with owned_fd(safefs.open_root(storage)) as root:
        with pytest.raises(UnsafeStorageError, match="symlink"):
            safefs.rmtree_at(root, "vol")
    assert (storage / "vol").is_symlink()
    assert_outside_intact(outside)


def test_rmtree_at_missing(storage: Path) -> None:
    with owned_fd(safefs.open_root(storage)) as root:
        with pytest.raises(FileNotFoundError):
            safefs.rmtree_at(root, "nope")
        safefs.rmtree_at(root, "nope", missing_ok=True)


def test_rmtree_at_race_subdirectory_swapped_for_symlink(
    storage: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sub`` is listed as a directory, then replaced by a link before it is entered."""
    (storage / "vol" / "sub").mkdir(parents=True)
    (storage / "vol" / "sub" / "x").write_text("ours")
    real_open = safefs._open_component

    def racing_open(name: str, dir_fd: int) -> int:
        if name == "sub":
            os.rename("sub", "sub.moved", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.symlink(str(outside), "sub", dir_fd=dir_fd)
        return real_open(name, dir_fd)

    with owned_fd(safefs.open_root(storage)) as root:
        monkeypatch.setattr(safefs, "_open_component", racing_open)
        with pytest.raises(OSError, match="not empty"):
            safefs.rmtree_at(root, "vol")  # sub.moved appeared after the listing
    assert_outside_intact(outside)
    assert not (storage / "vol" / "sub").exists()  # the link went, as a link


def test_rmtree_at_deep_tree_needs_no_recursion(storage: Path) -> None:
    with owned_fd(safefs.open_dir(storage, "/".join(["d"] * 1200), create=True)):
        pass
    with owned_fd(safefs.open_root(storage)) as root:
        safefs.rmtree_at(root, "d")
    assert os.listdir(storage) == []


def test_fd_path_names_the_held_directory(storage: Path, outside: Path) -> None:
    (storage / "d").mkdir()
    with owned_fd(safefs.open_dir(storage, "d")) as fd:
        path = safefs.fd_path(fd, "f")
        os.rename(storage / "d", storage / "d.moved")
        (storage / "d").symlink_to(outside)
        Path(path).write_text("via /proc")
    assert (storage / "d.moved" / "f").read_text() == "via /proc"
    assert_outside_intact(outside)


_MOUNT_CHILD = """
import os, subprocess, sys
from pvebackup.api.errors import UnsafeStorageError
from pvebackup.kit import safefs
storage, mnt = sys.argv[1], sys.argv[2]
subprocess.run(["mount", "-t", "tmpfs", "none", mnt], check=True)
open(os.path.join(mnt, "on-other-fs"), "w").close()
fd = safefs.open_root(storage)
try:
    safefs.rmtree_at(fd, "vol")
    print("removed")
except UnsafeStorageError as exc:
    print("refused:", exc)
print("left:", sorted(os.listdir(mnt)))
"""


@pytest.mark.e2e
def test_rmtree_at_does_not_cross_a_mount_point(storage: Path) -> None:
    """A file system mounted inside a tree (a private mount namespace) is not entered."""
    mnt = storage / "vol" / "sub" / "mnt"
    mnt.mkdir(parents=True)
    src = Path(safefs.__file__).resolve().parents[2]
    result = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, "-c", _MOUNT_CHILD,
         str(storage), str(mnt)],
        capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": str(src)},
    )
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "mount point" in result.stdout
    assert "left: ['on-other-fs']" in result.stdout


def test_open_dir_on_create_sees_only_what_it_created(storage: Path, outside: Path) -> None:
    # The container restore gives new directories an owner through this hook: it
    # must run for created components only, relative to the parent fd.
    (storage / "a").mkdir()
    created: list[tuple[str, str]] = []

    def record(parent_fd: int, name: str) -> None:
        created.append((os.readlink(f"/proc/self/fd/{parent_fd}"), name))

    with owned_fd(safefs.open_root(storage)) as root:
        with owned_fd(safefs.open_dir(root, "a/b/c", create=True, on_create=record)):
            pass
        (storage / "a" / "link").symlink_to(outside)
        with pytest.raises(UnsafeStorageError, match="symlink"):
            safefs.open_dir(root, "a/link/x", create=True, on_create=record)
    assert created == [(str(storage / "a"), "b"), (str(storage / "a" / "b"), "c")]
    assert_outside_intact(outside)
