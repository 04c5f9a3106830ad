"""Hostile tar archives and source trees: refused, and nothing written outside."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from lxc_fixtures import LogRecorder

from pvebackup.api.errors import UnsafeArchiveError
from pvebackup.api.idmap import DEFAULT_UNPRIVILEGED_MAP
from pvebackup.host.lxc.restore import copy_directory, extract_tar

Member = tuple[str, str, str]  # (type, name, linkname or contents)


def build_tar(path: Path, members: list[Member]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for kind, name, extra in members:
            info = tarfile.TarInfo(name)
            data = None
            if kind == "file":
                payload = extra.encode()
                info.size = len(payload)
                data = io.BytesIO(payload)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
            elif kind == "sym":
                info.type = tarfile.SYMTYPE
                info.linkname = extra
            elif kind == "hard":
                info.type = tarfile.LNKTYPE
                info.linkname = extra
            tf.addfile(info, data)
    return path


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, Path]:
    """(target, outside): the restore target and a directory beside it."""
    target = tmp_path / "sandbox" / "target"
    outside = tmp_path / "sandbox" / "outside"
    target.mkdir(parents=True)
    outside.mkdir()
    (outside / "precious").write_text("keep")
    return target, outside


def everything_under(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): (p.read_text() if p.is_file() and not p.is_symlink() else "")
        for p in path.rglob("*")
    }


HOSTILE: dict[str, Callable[[Path], list[Member]]] = {
    "absolute path": lambda out: [("file", str(out / "evil"), "x")],
    "dot-dot escape": lambda out: [("file", "../outside/evil", "x")],
    "dot-dot inside": lambda out: [("dir", "a", ""), ("file", "a/../../outside/evil", "x")],
    "write through absolute symlink": lambda out: [
        ("sym", "link", str(out)),
        ("file", "link/evil", "x"),
    ],
    "overwrite through symlink": lambda out: [
        ("sym", "link", str(out)),
        ("file", "link/precious", "pwned"),
    ],
    "dir through symlink": lambda out: [("sym", "link", str(out)), ("dir", "link/sub", "")],
    "relative symlink leaving root": lambda out: [("sym", "up", "../outside")],
    "deep relative symlink leaving root": lambda out: [
        ("dir", "a", ""),
        ("sym", "a/up", "../../outside"),
    ],
    "hardlink to absolute": lambda out: [("hard", "pw", "/etc/passwd")],
    "hardlink escaping": lambda out: [("hard", "pw", "../outside/precious")],
    "hardlink to later entry": lambda out: [("hard", "pw", "later"), ("file", "later", "x")],
    "hardlink to directory": lambda out: [("dir", "d", ""), ("hard", "pw", "d")],
    "root replaced by file": lambda out: [("file", "./", "x")],
    "symlink replacing parent later": lambda out: [
        ("dir", "etc", ""),
        ("sym", "etc", str(out)),
        ("file", "etc/evil", "x"),
    ],
}


@pytest.mark.parametrize("unprivileged", [False, True], ids=["privileged", "userns"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tar_is_refused(
    case: str, unprivileged: bool, sandbox: tuple[Path, Path], tmp_path: Path, log: LogRecorder
) -> None:
    target, outside = sandbox
    before = everything_under(outside)
    archive = build_tar(tmp_path / "evil.tar", HOSTILE[case](outside))
    id_map = list(DEFAULT_UNPRIVILEGED_MAP) if unprivileged else []
    with pytest.raises(UnsafeArchiveError):
        # Through the helper the error keeps its class (and exit code).
        extract_tar(archive, {"/": target}, id_map, log=log)
    assert everything_under(outside) == before
    assert not (tmp_path / "sandbox" / "evil").exists()
    assert not (target / "pw").exists()


def test_absolute_symlink_is_kept_not_followed(
    sandbox: tuple[Path, Path], tmp_path: Path, log: LogRecorder
) -> None:
    target, outside = sandbox
    archive = build_tar(
        tmp_path / "ok.tar",
        [("sym", "etc", "/etc"), ("sym", "lt", "/usr/share/zoneinfo/UTC"), ("sym", "d", "x/../y")],
    )
    extract_tar(archive, {"/": target}, [], log=log)
    assert os.readlink(target / "etc") == "/etc"
    assert os.readlink(target / "d") == "x/../y"


def test_later_entry_replaces_earlier(tmp_path: Path, log: LogRecorder) -> None:
    target = tmp_path / "t"
    target.mkdir()
    archive = build_tar(
        tmp_path / "dup.tar",
        [("file", "f", "one"), ("file", "f", "two"), ("dir", "e", ""), ("sym", "e", "f")],
    )
    extract_tar(archive, {"/": target}, [], log=log)
    assert (target / "f").read_text() == "two"
    assert os.readlink(target / "e") == "f"


def test_non_empty_directory_is_not_replaced(tmp_path: Path, log: LogRecorder) -> None:
    target = tmp_path / "t"
    target.mkdir()
    archive = build_tar(
        tmp_path / "x.tar", [("dir", "d", ""), ("file", "d/f", "x"), ("file", "d", "y")]
    )
    with pytest.raises(UnsafeArchiveError, match="non-empty"):
        extract_tar(archive, {"/": target}, [], log=log)
    assert (target / "d/f").read_text() == "x"


def test_hardlink_across_mount_points_is_refused(tmp_path: Path, log: LogRecorder) -> None:
    root, data = tmp_path / "root", tmp_path / "data"
    root.mkdir()
    data.mkdir()
    archive = build_tar(tmp_path / "x.tar", [("file", "f", "x"), ("hard", "srv/data/f", "f")])
    with pytest.raises(UnsafeArchiveError, match="mount points"):
        extract_tar(archive, {"/": root, "/srv/data": data}, [], log=log)


def test_symlinked_mount_point_parent_does_not_redirect(
    sandbox: tuple[Path, Path], tmp_path: Path, log: LogRecorder
) -> None:
    # "srv" is a symlink in the rootfs; mount point entries go to their own target.
    target, outside = sandbox
    data = tmp_path / "data"
    data.mkdir()
    archive = build_tar(
        tmp_path / "x.tar", [("sym", "srv", str(outside)), ("file", "srv/data/f", "x")]
    )
    extract_tar(archive, {"/": target, "/srv/data": data}, [], log=log)
    assert (data / "f").read_text() == "x"
    assert everything_under(outside) == {"precious": "keep"}


def test_directory_source_with_escaping_symlink_is_refused(
    sandbox: tuple[Path, Path], tmp_path: Path, log: LogRecorder
) -> None:
    target, outside = sandbox
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a/up").symlink_to("../../outside")
    with pytest.raises(UnsafeArchiveError):
        copy_directory(src, {"/": target}, [], log=log)
    assert everything_under(outside) == {"precious": "keep"}
