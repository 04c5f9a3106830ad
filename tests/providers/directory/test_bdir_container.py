"""Containers: the directory mechanism as a zstd tar and as a plain tree."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from bdir_helpers import STOREID, LogRecords, run

from pvebackup.api.errors import NotFoundError
from pvebackup.api.types import BackupMechanism, GuestType, IdMapEntry, RestoreMechanism
from pvebackup.providers.directory.provider import BackupDirProvider

ID_MAP = [IdMapEntry("u", 0, 100000, 65536), IdMapEntry("g", 0, 100000, 65536)]
EXCLUDES = ["*.log", "/var/cache/", "tmp/**"]
MTIME_NS = 1_700_000_000_123_456_000

# relpath -> (host uid, host gid, mode); expected container ids are host - 100000.
FILES = {
    "etc/hostname": (100000, 100000, 0o644),
    "etc/shadow": (100000, 100042, 0o640),
    "usr/bin/sudo": (100000, 100000, 0o4755),
    "home/user/notes.txt": (101000, 101000, 0o600),
    "home/user/hard1": (101000, 101000, 0o644),
    "var/log/syslog.log": (100000, 100000, 0o644),
    "var/cache/apt/pkg.bin": (100000, 100000, 0o644),
    "tmp/sub/junk": (100000, 100000, 0o644),
    "unmapped": (5000, 5000, 0o644),
    "srv/data/db.bin": (100033, 100033, 0o600),
}
EXCLUDED = {
    "var/log/syslog.log",
    "var/cache",
    "var/cache/apt",
    "var/cache/apt/pkg.bin",
    "tmp/sub",
    "tmp/sub/junk",
}


def expected_ct_id(host_id: int) -> int:
    return host_id - 100000 if 100000 <= host_id < 165536 else 65534


@pytest.fixture
def ct_root(tmp_path: Path) -> Path:
    """A container root with host-side ownership and every kind of file."""
    root = tmp_path / "ct"
    root.mkdir()
    os.chown(root, 100000, 100000)
    for relpath, (uid, gid, mode) in FILES.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(relpath.encode() * 100)
        os.chown(path, uid, gid)
        os.chmod(path, mode)
    os.link(root / "home/user/hard1", root / "home/user/hard2")
    os.symlink("notes.txt", root / "home/user/link")
    os.lchown(root / "home/user/link", 101000, 101000)
    (root / "dev").mkdir()
    os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkfifo(root / "dev/fifo", 0o620)
    os.setxattr(root / "etc/hostname", "user.comment", b"hello")
    os.setxattr(root / "etc/shadow", "user.bin", b"\xff\x00\xfe")
    run("setfacl", "-m", "u:101000:r,g:100042:r", str(root / "home/user/notes.txt"))
    run("setfacl", "-d", "-m", "u:101000:rwx", str(root / "home/user"))
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)
    os.utime(root, ns=(MTIME_NS, MTIME_NS))
    return root


def backup_ct(provider: BackupDirProvider, root: Path, vmid: int = 200) -> str:
    provider.job_start(0)
    provider.backup_start(vmid, GuestType.LXC)
    assert provider.backup_get_mechanism(vmid, GuestType.LXC) == (
        BackupMechanism.DIRECTORY,
        None,
    )
    volname = provider.backup_get_target(vmid, GuestType.LXC)
    conf = root.parent / "200.conf"
    conf.write_text("arch: amd64\nhostname: ct\n")
    provider.backup_guest_config(vmid, str(conf))
    provider.backup_directory(vmid, str(root), ID_MAP, EXCLUDES, [".", "./srv/data"], None)
    provider.backup_end(vmid)
    provider.job_end()
    return volname


def getfacl(path: Path, default: bool = False) -> str:
    args = ["getfacl", "-n", "-p", "-c"] + (["-d"] if default else []) + [str(path)]
    return run(*args)


def check_restored(source: Path, restored: Path, exact_ns: bool) -> None:
    """Compare the restored tree with the source, in container ids."""
    for dirpath, dirnames, filenames in os.walk(source):
        for name in dirnames + filenames:
            src = Path(dirpath) / name
            rel = str(src.relative_to(source))
            dst = restored / rel
            if rel in EXCLUDED:
                assert not os.path.lexists(dst), rel
                continue
            s, d = src.lstat(), dst.lstat()
            assert stat.S_IFMT(s.st_mode) == stat.S_IFMT(d.st_mode), rel
            assert stat.S_IMODE(s.st_mode) == stat.S_IMODE(d.st_mode), rel
            assert (d.st_uid, d.st_gid) == (expected_ct_id(s.st_uid), expected_ct_id(s.st_gid)), rel
            if exact_ns:
                assert d.st_mtime_ns == s.st_mtime_ns, rel
            else:
                assert abs(d.st_mtime_ns - s.st_mtime_ns) < 1000, rel
            if stat.S_ISREG(s.st_mode):
                assert src.read_bytes() == dst.read_bytes(), rel
            if stat.S_ISLNK(s.st_mode):
                assert os.readlink(src) == os.readlink(dst)
            if stat.S_ISCHR(s.st_mode):
                assert s.st_rdev == d.st_rdev
    assert (restored / "var").is_dir() and not (restored / "var/cache").exists()
    assert os.getxattr(restored / "etc/hostname", "user.comment") == b"hello"
    assert os.getxattr(restored / "etc/shadow", "user.bin") == b"\xff\x00\xfe"
    h1, h2 = (restored / "home/user/hard1").stat(), (restored / "home/user/hard2").stat()
    assert h1.st_ino == h2.st_ino
    assert "user:1000:r--" in getfacl(restored / "home/user/notes.txt")
    assert "group:42:r--" in getfacl(restored / "home/user/notes.txt")
    assert "user:1000:rwx" in getfacl(restored / "home/user", default=True)
    assert (restored / "srv/data/db.bin").stat().st_uid == 33


@pytest.mark.e2e
def test_tar_format_restores_with_gnu_tar(
    tmp_path: Path, ct_root: Path, provider: BackupDirProvider, logs: LogRecords
) -> None:
    volname = backup_ct(provider, ct_root)
    assert provider.restore_get_mechanism(volname, STOREID) == (
        RestoreMechanism.TAR,
        GuestType.LXC,
    )
    assert provider.extract_guest_config(volname, STOREID).startswith("arch: amd64")
    assert provider.extract_firewall_config(volname, STOREID) is None
    archive = provider.restore_tar_init(volname, STOREID)
    assert archive.endswith("root.tar.zst")
    names = run("tar", "--zstd", "-tf", archive).split()
    assert names[0] == "./"
    assert "./etc/hostname" in names and "./srv/data/db.bin" in names
    assert len(names) == len(set(names))  # nothing stored twice
    out = tmp_path / "restored"
    out.mkdir()
    run(
        "tar",
        "--zstd",
        "--xattrs",
        "--xattrs-include=*",
        "--acls",
        "--numeric-owner",
        "-xpf",
        archive,
        "-C",
        str(out),
    )
    check_restored(ct_root, out, exact_ns=False)
    provider.restore_tar_cleanup(volname, STOREID)
    provider.restore_tar_cleanup(volname, STOREID)  # idempotent
    assert any("excluded" in msg for _, msg in logs)


@pytest.mark.e2e
def test_directory_format_keeps_everything(
    ct_root: Path, make_provider: Callable[..., BackupDirProvider]
) -> None:
    provider = make_provider(**{"ct-format": "directory"})
    volname = backup_ct(provider, ct_root)
    assert provider.restore_get_mechanism(volname, STOREID) == (
        RestoreMechanism.DIRECTORY,
        GuestType.LXC,
    )
    tree = Path(provider.restore_directory_init(volname, STOREID))
    check_restored(ct_root, tree, exact_ns=True)
    provider.restore_directory_cleanup(volname, STOREID)


@pytest.mark.e2e
def test_aborted_container_backup_leaves_no_volume(
    ct_root: Path, provider: BackupDirProvider
) -> None:
    provider.job_start(0)
    provider.backup_start(200, GuestType.LXC)
    with pytest.raises(NotFoundError, match="missing"):
        provider.backup_directory(200, str(ct_root / "missing"), ID_MAP, [], ["."], None)
    provider.backup_abort(200, "failed")
    provider.job_end()
    assert [p.name for p in provider.layout.backup_dir.iterdir()] == []


def test_job_abort_removes_unfinished_backups(ct_root: Path, provider: BackupDirProvider) -> None:
    provider.job_start(0)
    provider.backup_start(200, GuestType.LXC)
    provider.backup_directory(200, str(ct_root), ID_MAP, [], ["."], None)
    provider.job_abort("interrupted")
    assert list(provider.layout.backup_dir.iterdir()) == []


@pytest.mark.serial
def test_bandwidth_limit_applies_to_file_data(tmp_path: Path, provider: BackupDirProvider) -> None:
    root = tmp_path / "small"
    root.mkdir()
    (root / "blob").write_bytes(os.urandom(2 * 1024 * 1024))
    provider.job_start(0)
    provider.backup_start(201, GuestType.LXC)
    import time

    start = time.monotonic()
    provider.backup_directory(201, str(root), [], [], ["."], 2 * 1024 * 1024)
    elapsed = time.monotonic() - start
    # 2 MiB at 2 MiB/s, less the token bucket's quarter second of burst
    assert 0.7 <= elapsed < 2.0
    provider.backup_end(201)
    assert (
        subprocess.run(
            [
                "zstd",
                "-t",
                "-q",
                str(
                    provider.layout.volume_path(provider.backup_get_target(201, GuestType.LXC))
                    / "root.tar.zst"
                ),
            ]
        ).returncode
        == 0
    )
