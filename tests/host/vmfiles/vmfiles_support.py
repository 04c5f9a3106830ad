"""A node with one VM whose disks hold ext4 file systems made from a hostile tree."""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pvebackup.api.types import GuestType
from pvebackup.host.guests import NodeRoot
from pvebackup.host.job import run_backup_job

MiB = 1024 * 1024
NEWLINE_NAME = b"new\nline"
BAD_UTF8_NAME = b"bad\xffname"


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def make_tree(src: Path, outside: Path) -> None:
    """The guest's files: ordinary ones and what an extraction must not honour."""
    (src / "etc").mkdir(parents=True)
    (src / "etc/hostname").write_text("guest\n")
    (src / "home/user/docs").mkdir(parents=True)
    (src / "home/user/docs/report.txt").write_bytes(os.urandom(70_000))
    (src / "home/user/empty").write_bytes(b"")
    (src / "sp ace").write_text("space\n")
    (src / os.fsdecode(NEWLINE_NAME)).write_text("newline\n")
    (src / os.fsdecode(BAD_UTF8_NAME)).write_text("latin1\n")
    os.symlink("/etc/shadow", src / "shadow-link")
    os.symlink("../../../../../../../../etc", src / "up-link")
    os.symlink(str(outside), src / "out-link")
    suid = src / "usr/bin/suid"
    suid.parent.mkdir(parents=True)
    suid.write_bytes(b"#!/bin/sh\n")
    os.chmod(suid, 0o4755)
    os.mkfifo(src / "fifo", 0o640)
    os.mknod(src / "null", 0o666 | 0o020000, os.makedev(1, 3))
    os.chown(src / "etc/hostname", 1234, 5678)
    # Renamed to "../../x1" and ".." in the image (see make_ext4(hostile=True)).
    (src / "HOSTILE1").write_text("escaped\n")
    (src / "HOSTILE2").write_text("escaped\n")


def make_ext4(image: Path, src: Path, size: int, *, offset: int = 0, hostile: bool = True) -> None:
    """An ext4 file system of ``src`` at ``offset`` of raw file ``image``."""
    fs = image.with_suffix(".fs")
    run("truncate", "-s", str(size), str(fs))
    # No metadata checksums: the dirent names are patched below, as a forger would.
    run("mkfs.ext4", "-q", "-F", "-O", "^metadata_csum", "-d", str(src), str(fs))
    if hostile:
        data = bytearray(fs.read_bytes())
        at = data.find(b"HOSTILE1")
        assert at > 0
        data[at : at + 8] = b"../../x1"
        at = data.find(b"HOSTILE2")
        assert at > 0
        data[at - 2] = 2  # name_len
        data[at : at + 2] = b".."
        fs.write_bytes(bytes(data))
    with open(image, "r+b") as out, open(fs, "rb") as inp:
        out.seek(offset)
        while chunk := inp.read(MiB):
            out.write(chunk)
    fs.unlink()


@dataclass
class VmNode:
    root: NodeRoot
    path: Path
    src: Path
    outside: Path


def make_node(path: Path, disks: dict[str, Path]) -> NodeRoot:
    root = NodeRoot(path)
    for sub in ("qemu-server", "lxc", "firewall"):
        (root.pve_dir / sub).mkdir(parents=True, exist_ok=True)
    (path / "store").mkdir(parents=True, exist_ok=True)
    (path / "bdir").mkdir(parents=True, exist_ok=True)
    root.storage_cfg.write_text(
        f"dir: local\n\tpath {path}/var/lib/vz\n\tcontent images,rootdir\n\n"
        f"backup-store: store1\n\tpath {path}/store\n\n"
        f"backup-dir: bdir\n\tpath {path}/bdir\n"
    )
    images = path / "var/lib/vz/images/100"
    images.mkdir(parents=True, exist_ok=True)
    lines = ["name: vm", "memory: 512"]
    for n, (key, disk) in enumerate(disks.items()):
        name = f"vm-100-disk-{n}.qcow2"
        run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(disk), str(images / name))
        lines.append(f"{key}: local:100/{name},size={disk.stat().st_size // MiB}M")
    root.config_path(100, GuestType.QEMU).write_text("\n".join(lines) + "\n")
    return root


def back_up(root: NodeRoot, storeid: str) -> str:
    result = run_backup_job(root, storeid, [100], terminal=None)
    assert not result.failed, result.guests
    target = result.guests[0].target
    assert target is not None
    return target if target.startswith(f"{storeid}:") else f"{storeid}:{target}"


def private_tmp(path: Path) -> None:
    path.mkdir(exist_ok=True)
    tempfile.tempdir = str(path)
