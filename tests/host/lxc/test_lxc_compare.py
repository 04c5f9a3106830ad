"""compare_trees notices every kind of difference a restore could get wrong."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from lxc_fixtures import PASSTHROUGH_MAP, make_container_tree

from pvebackup.host.lxc.compare import compare_trees


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_container_tree(tmp_path_factory.mktemp("cmp") / "ct")


def clone(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def test_identical_copy_has_no_differences(original: Path, tmp_path: Path) -> None:
    assert compare_trees(original, clone(original, tmp_path / "b")) == []


def _relink(b: Path) -> None:
    p = b / "etc/hardlinked"
    data = p.read_bytes()
    st = p.stat()
    p.unlink()
    p.write_bytes(data)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


MUTATIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "mode": (lambda b: os.chmod(b / "usr/bin/su", 0o755), "usr/bin/su: mode"),
    "owner": (lambda b: os.chown(b / "etc/passwd", 1, 0), "etc/passwd: owner"),
    "mtime": (lambda b: os.utime(b / "etc/passwd", ns=(1, 1)), "etc/passwd: mtime"),
    "contents": (
        lambda b: (b / "srv/data/sub/b").write_text("c\n"),
        "srv/data/sub/b: contents",
    ),
    "missing": (lambda b: (b / "etc/shadow").unlink(), "etc/shadow: only in"),
    "extra": (lambda b: (b / "new").write_text(""), "new: only in"),
    "symlink target": (
        lambda b: ((b / "bin").unlink(), (b / "bin").symlink_to("usr/sbin")),
        "bin: symlink target",
    ),
    "type": (
        lambda b: (shutil.rmtree(b / "empty"), (b / "empty").write_text("")),
        "empty: type",
    ),
    "device": (
        lambda b: (
            (b / "dev/null").unlink(),
            os.mknod(b / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 5)),
        ),
        "dev/null: device",
    ),
    "xattr": (
        lambda b: os.setxattr(b / "srv/data/a.bin", "user.mp", b"2"),
        "srv/data/a.bin: xattrs",
    ),
    "acl": (
        lambda b: subprocess.run(
            ["setfacl", "-x", "u:1001", str(b / "home/user/notes.txt")], check=True
        ),
        "home/user/notes.txt: xattrs",
    ),
    "hard link": (_relink, "etc/hardlinked: hard links"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_difference_is_reported(original: Path, tmp_path: Path, name: str) -> None:
    b = clone(original, tmp_path / "b")
    mutate, expected = MUTATIONS[name]
    mutate(b)
    diffs = compare_trees(original, b)
    assert any(d.startswith(expected) for d in diffs), diffs


def test_mapping_of_owners_and_acl_ids(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "f").write_text("x")
        os.utime(d / "f", ns=(5, 5))
    os.chown(a / "f", 1001, 7)
    subprocess.run(["setfacl", "-m", "u:1001:r", str(a / "f")], check=True)
    os.chown(b / "f", 101001, 100007)
    subprocess.run(["setfacl", "-m", "u:101001:r", str(b / "f")], check=True)
    for d in (a, b):
        os.chown(d, *((0, 0) if d == a else (100000, 100000)))
        os.utime(d, ns=(9, 9))
    assert compare_trees(a, b, uid_map=PASSTHROUGH_MAP) == []
    assert any("owner" in d for d in compare_trees(a, b))


def test_mtime_resolution(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d, ns in ((a, 1_000_000_001), (b, 1_000_000_002)):
        d.mkdir()
        os.utime(d, ns=(ns, ns))
    assert compare_trees(a, b) != []
    assert compare_trees(a, b, mtime_resolution_ns=1_000_000_000) == []
