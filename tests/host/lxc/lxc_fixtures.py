"""Helpers for the pvebackup.host.lxc tests: a container tree with every kind of object."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from pvebackup.api.idmap import parse_lxc_idmap
from pvebackup.api.types import IdMapEntry

# Proxmox VE's common pass-through pattern: container uid 1000 is host uid 1000.
PASSTHROUGH_MAP: list[IdMapEntry] = [
    parse_lxc_idmap(line)
    for line in (
        "u 0 100000 1000",
        "u 1000 1000 1",
        "u 1001 101001 64535",
        "g 0 100000 65536",
    )
]

MTIME_NS = 1_600_000_000_123_456_789


def _set_times(path: Path, offset: int) -> None:
    t = MTIME_NS + offset * 1_000_000_007
    os.utime(path, ns=(t, t), follow_symlinks=False)


def make_container_tree(root: Path) -> Path:
    """Build a small container root file system with container ids in ``root``."""
    root.mkdir(parents=True)
    for d in ("etc", "usr/bin", "home/user", "tmp", "dev", "srv/data", "var/ro", "empty"):
        (root / d).mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "etc/shadow").write_text("secret\n")
    os.chmod(root / "etc/shadow", 0o640)
    os.chown(root / "etc/shadow", 0, 42)
    (root / "usr/bin/su").write_bytes(b"\x7fELF fake")
    os.chmod(root / "usr/bin/su", 0o4755)
    (root / "usr/bin/wall").write_bytes(b"wall")
    os.chown(root / "usr/bin/wall", 0, 5)
    os.chmod(root / "usr/bin/wall", 0o2755)
    os.chmod(root / "tmp", 0o1777)
    (root / "home/user/notes.txt").write_text("mine\n")
    os.chown(root / "home/user/notes.txt", 1000, 1000)
    os.chown(root / "home/user", 1000, 1000)
    (root / "home/user/other").write_text("1001\n")
    os.chown(root / "home/user/other", 1001, 999)
    (root / "home/user/top").write_text("top\n")
    os.chown(root / "home/user/top", 65535, 65535)
    # Hard links (three names, one inode) and a sparse file.
    (root / "usr/bin/python3.11").write_bytes(b"python" * 1000)
    os.link(root / "usr/bin/python3.11", root / "usr/bin/python3")
    os.link(root / "usr/bin/python3.11", root / "etc/hardlinked")
    with open(root / "srv/sparse.img", "wb") as f:
        f.seek(3 << 20)
        f.write(b"end")
    # Symlinks: absolute (resolved inside the container), relative, dangling.
    (root / "bin").symlink_to("usr/bin")
    (root / "etc/localtime").symlink_to("/usr/share/zoneinfo/UTC")
    (root / "home/user/up").symlink_to("../../etc/passwd")
    os.chown(root / "home/user/up", 1000, 1000, follow_symlinks=False)
    # Devices and a fifo.
    os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "dev/loop0", stat.S_IFBLK | 0o660, os.makedev(7, 0))
    os.chown(root / "dev/loop0", 0, 6)
    os.mkfifo(root / "dev/initctl", 0o600)
    # Mount point contents.
    (root / "srv/data/a.bin").write_bytes(os.urandom(70000))
    (root / "srv/data/sub").mkdir()
    (root / "srv/data/sub/b").write_text("b\n")
    os.chown(root / "srv/data/sub", 33, 33)
    # xattrs and ACLs (access on a file, access + default on a directory).
    os.setxattr(root / "etc/passwd", "user.comment", b"binary\x00\xffvalue")
    os.setxattr(root / "srv/data/a.bin", "user.mp", b"1")
    subprocess.run(
        ["setfacl", "-m", "u:1000:rw,u:1001:r,g:999:r", str(root / "home/user/notes.txt")],
        check=True,
    )
    subprocess.run(["setfacl", "-d", "-m", "u:1001:rwx", str(root / "home/user")], check=True)
    # A read-only directory with contents.
    (root / "var/ro/file").write_text("ro\n")
    os.chmod(root / "var/ro", 0o555)
    # Distinct nanosecond mtimes everywhere, directories last.
    paths = sorted(root.rglob("*"), key=lambda p: -len(p.parts))
    for i, p in enumerate(paths):
        _set_times(p, i)
    _set_times(root, len(paths))
    return root


class LogRecorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __call__(self, level: str, message: str) -> None:
        assert level in ("info", "warn", "err")
        self.lines.append((level, message))

    def warnings(self) -> list[str]:
        return [m for level, m in self.lines if level == "warn"]
