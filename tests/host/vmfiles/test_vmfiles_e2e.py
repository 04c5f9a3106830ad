"""vm-files end to end: back up a VM whose disks hold hostile ext4 trees, list, extract.

Real tools throughout: the backup job, backup-dir and backup-store, qemu-storage-daemon
with its FUSE export, debugfs. Nothing is mounted but FUSE (which carries bytes only).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmfiles_support import (
    BAD_UTF8_NAME,
    NEWLINE_NAME,
    MiB,
    back_up,
    make_ext4,
    make_node,
    make_tree,
    private_tmp,
    run,
)

import pvebackup
from pvebackup.api.types import GuestType
from pvebackup.cli.main import main
from pvebackup.host.job import run_backup_job
from pvebackup.kit.hoststate import STATE_DIR_ENV

pytestmark = pytest.mark.e2e


Backed = tuple[Path, dict[str, str], Path, Path]


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backed]:
    """Node path, {storeid: volid}, the source tree, the "outside" dir (made once).

    scsi0: a GPT disk, partition 1 a small non-Linux one, partition 2 the Linux ext4.
    scsi1: ext4 on the whole disk (no partition table).
    """
    base = tmp_path_factory.mktemp("vmfiles")
    with pytest.MonkeyPatch.context() as mp:
        # Module scope: set up before the autouse host_state_dir, so its own here.
        mp.setenv(STATE_DIR_ENV, str(base / "state"))
        mp.setattr("tempfile.tempdir", None)
        private_tmp(base / "tmp")
        src, outside = base / "src", base / "outside"
        outside.mkdir()
        make_tree(src, outside)
        parted = base / "parted.raw"
        run("truncate", "-s", str(24 * MiB), str(parted))
        run("sgdisk", "-n", "1:2048:+2M", "-t", "1:ef00", "-n", "2:0:0", "-t", "2:8300",
            str(parted))  # fmt: skip
        info = run("sgdisk", "-i", "2", str(parted))
        start = int(info.split("First sector: ")[1].split()[0])
        end = int(info.split("Last sector: ")[1].split()[0])
        make_ext4(parted, src, (end - start + 1) * 512, offset=start * 512)
        whole = base / "whole.raw"
        run("truncate", "-s", str(16 * MiB), str(whole))
        (base / "small").mkdir()
        (base / "small/only-on-scsi1").write_text("scsi1\n")
        make_ext4(whole, base / "small", 16 * MiB, hostile=False)
        node = base / "node"
        root = make_node(node, {"scsi0": parted, "scsi1": whole})
        volids = {sid: back_up(root, sid) for sid in ("bdir", "store1")}
        yield node, volids, src, outside


@pytest.fixture
def vm_tmp(backed_up: Backed, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary directory vm-files works in during one test (checked empty after)."""
    tmp = backed_up[0].parent / "tmp"
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    return tmp


def cli(node: Path, *args: str) -> int:
    return main(["--root", str(node), "vm-files", *args])


def no_leftovers(tmp: Path) -> None:
    mounts = Path("/proc/self/mounts").read_text()
    assert str(tmp) not in mounts
    assert [p.name for p in tmp.iterdir()] == [], "temporary files left behind"


@pytest.mark.parametrize("storeid", ["bdir", "store1"])
def test_ls_and_extract_match_the_source_tree(
    backed_up: Backed,
    vm_tmp: Path,
    storeid: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    node, volids, src, outside = backed_up
    volid = volids[storeid]
    capsys.readouterr()
    assert cli(node, volid, "--disk", "scsi0", "ls", "/", "--output", "json") == 0
    listed = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    expected = {os.fsencode(p.name).decode(errors="backslashreplace") for p in src.iterdir()}
    # "HOSTILE2" became "..", never listed; "HOSTILE1" became "../../x1", listed as is.
    expected = (expected - {"HOSTILE1", "HOSTILE2"}) | {"../../x1", "lost+found"}
    assert set(listed) == expected
    assert listed["shadow-link"]["type"] == "symlink"
    assert listed["shadow-link"]["target"] == "/etc/shadow"
    assert listed["fifo"]["type"] == "fifo" and listed["null"]["type"] == "chardev"
    assert listed["home"]["type"] == "dir"
    assert listed["bad\\xffname"]["size"] == 7
    assert cli(node, volid, "ls", "/usr/bin/suid", "--output", "json") == 0
    (suid,) = json.loads(capsys.readouterr().out)
    assert suid["mode"] == 0o4755 and suid["type"] == "file"
    assert cli(node, volid, "ls", "/etc") == 0
    text = capsys.readouterr().out
    assert " 1234  5678 " in text and text.rstrip().endswith("hostname")

    target = tmp_path / f"out-{storeid}"
    assert cli(node, volid, "extract", "/", "--target", str(target), "--output", "json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["partition"] == 2 and result["disk"] == "drive-scsi0"
    assert sorted(result["skipped"]) == ["/../../x1", "/null"]
    # The contents and the permissions came across; nothing left the target.
    for rel in ("etc/hostname", "home/user/docs/report.txt", "home/user/empty", "sp ace"):
        assert (target / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert (target / os.fsdecode(NEWLINE_NAME)).read_text() == "newline\n"
    assert (target / os.fsdecode(BAD_UTF8_NAME)).read_text() == "latin1\n"
    assert os.readlink(target / "shadow-link") == "/etc/shadow"
    assert os.readlink(target / "up-link") == "../../../../../../../../etc"
    assert os.readlink(target / "out-link") == str(outside)
    assert list(outside.iterdir()) == []
    assert not (tmp_path.parent / "x1").exists() and not (tmp_path / "x1").exists()
    mode = (target / "usr/bin/suid").stat().st_mode
    assert stat.S_IMODE(mode) == 0o755, oct(mode)  # setuid dropped
    assert stat.S_ISFIFO((target / "fifo").lstat().st_mode)
    assert not (target / "null").exists()  # no device node
    assert (target / "etc/hostname").stat().st_uid == 0  # owners not applied by default
    no_leftovers(vm_tmp)


def test_whole_disk_keep_owner_and_one_file(
    backed_up: Backed,
    vm_tmp: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    node, volids, _src, _outside = backed_up
    volid = volids["bdir"]
    assert cli(node, volid, "--disk", "scsi1", "ls", "/", "--output", "json") == 0
    names = {e["name"] for e in json.loads(capsys.readouterr().out)}
    assert names == {"lost+found", "only-on-scsi1"}
    target = tmp_path / "one"
    assert cli(node, volid, "extract", "/etc/hostname", "--target", str(target),
               "--keep-owner") == 0  # fmt: skip
    assert [p.name for p in target.iterdir()] == ["hostname"]
    st = (target / "hostname").stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert cli(node, volid, "--disk", "scsi9", "ls") == 2
    assert cli(node, volid, "--partition", "7", "ls") == 2
    assert cli(node, volid, "ls", "/no/such") == 3
    assert cli(node, volid, "ls", "/../etc") == 2


def test_non_empty_target_is_refused(
    backed_up: Backed,
    vm_tmp: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    node, volids, _src, outside = backed_up
    target = tmp_path / "busy"
    target.mkdir()
    (target / "mine").write_text("keep\n")
    assert cli(node, volids["store1"], "extract", "/etc", "--target", str(target)) == 7
    assert [p.name for p in target.iterdir()] == ["mine"]
    link = tmp_path / "link-target"
    link.symlink_to(outside)
    assert cli(node, volids["store1"], "extract", "/etc", "--target", str(link)) == 7
    assert list(outside.iterdir()) == []
    assert "not empty" in capsys.readouterr().err
    no_leftovers(vm_tmp)


def _single_disk_node(tmp_path: Path, disk: Path) -> tuple[Path, str]:
    private_tmp(tmp_path / "tmp")
    node = tmp_path / "node"
    root = make_node(node, {"scsi0": disk})
    return node, back_up(root, "bdir")


def test_corrupt_superblock_is_a_typed_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ext magic, the rest of the superblock garbage: exit 5, nothing left behind."""
    monkeypatch.setattr("tempfile.tempdir", None)
    disk = tmp_path / "bad.raw"
    run("truncate", "-s", str(8 * MiB), str(disk))
    with open(disk, "r+b") as f:
        f.seek(1024)
        f.write(os.urandom(1024))
        f.seek(1024 + 56)
        f.write(b"\x53\xef")
    node, volid = _single_disk_node(tmp_path, disk)
    assert cli(node, volid, "ls") == 5
    assert "cannot be opened" in capsys.readouterr().err
    no_leftovers(tmp_path / "tmp")


@pytest.mark.parametrize(
    ("magic_at", "magic", "code", "message"),
    [
        (0x10040, b"_BHRfS_M", 4, "btrfs file systems cannot be read"),
        (None, b"", 4, "no file system"),
        (0, b"XFSB", 5, "the xfs file system cannot be opened"),
    ],
)
def test_unsupported_filesystem_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    magic_at: int | None,
    magic: bytes,
    code: int,
    message: str,
) -> None:
    monkeypatch.setattr("tempfile.tempdir", None)
    disk = tmp_path / "other.raw"
    run("truncate", "-s", str(8 * MiB), str(disk))
    if magic_at is not None:
        with open(disk, "r+b") as f:
            f.seek(magic_at)
            f.write(magic)
    node, volid = _single_disk_node(tmp_path, disk)
    assert cli(node, volid, "ls") == code
    assert message in capsys.readouterr().err
    no_leftovers(tmp_path / "tmp")


def test_container_backup_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("tempfile.tempdir", None)
    private_tmp(tmp_path / "tmp")
    node = tmp_path / "node"
    root = make_node(node, {})
    rootfs = node / "var/lib/vz/images/101/subvol-101-disk-0.subvol"
    (rootfs / "etc").mkdir(parents=True)
    root.config_path(101, GuestType.LXC).write_text(
        f"hostname: ct\nrootfs: local:101/{rootfs.name},size=0T\n"
    )
    job = run_backup_job(root, "bdir", [101], terminal=None)
    assert not job.failed, job.guests
    target = job.guests[0].target
    assert target is not None
    volid = target if target.startswith("bdir:") else f"bdir:{target}"
    assert cli(node, volid, "ls") == 4
    assert "VM backups only" in capsys.readouterr().err


def test_sigterm_stops_the_daemon_and_removes_its_exports(
    backed_up: Backed, tmp_path: Path
) -> None:
    """SIGTERM during an extraction: exit 130, no FUSE mount and no temporary file left."""
    node, volids, _src, _outside = backed_up
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    slow = bin_dir / "debugfs"
    # debugfs that hangs on file contents: the run is surely inside the extraction.
    slow.write_text(
        '#!/bin/sh\ncase "$*" in *cat*) touch "$STARTED"; exec sleep 60;; esac\n'
        'exec /usr/sbin/debugfs "$@"\n'
    )
    slow.chmod(0o755)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    started = tmp_path / "started"
    src_dir = Path(pvebackup.__file__).resolve().parents[1]
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp),
               PYTHONPATH=str(src_dir), STARTED=str(started))  # fmt: skip
    argv = [sys.executable, "-m", "pvebackup", "--root", str(node), "vm-files",
            volids["bdir"], "extract", "/", "--target", str(tmp_path / "out")]  # fmt: skip
    log = tmp_path / "stderr.log"
    with open(log, "wb") as errfile:
        child = subprocess.Popen(argv, env=env, stderr=errfile)
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert child.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the extraction never started"
            time.sleep(0.1)
        child.send_signal(signal.SIGTERM)
        assert child.wait(60) == 130, log.read_text()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert str(tmp) not in Path("/proc/self/mounts").read_text()
    assert os.listdir(tmp) == []


def test_a_damaged_inode_fails_the_extraction_after_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One file's extent header destroyed: the others are extracted, exit 5 names it."""
    monkeypatch.setattr("tempfile.tempdir", None)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "bad").write_bytes(b"B" * 10_000)
    (tree / "good").write_text("good\n")
    disk = tmp_path / "damaged.raw"
    run("truncate", "-s", str(8 * MiB), str(disk))
    make_ext4(disk, tree, 8 * MiB, hostile=False)
    imap = run("debugfs", "-c", "-R", "imap /bad", str(disk))
    block = int(imap.split("located at block ")[1].split(",")[0])
    offset = int(imap.split("offset ")[1].split()[0], 16)
    with open(disk, "r+b") as f:
        f.seek(1024 + 24)
        block_size = 1024 << int.from_bytes(f.read(4), "little")
        f.seek(block * block_size + offset + 40)  # i_block: the extent header's magic
        f.write(b"\0\0")
    node, volid = _single_disk_node(tmp_path, disk)
    target = tmp_path / "out"
    assert cli(node, volid, "extract", "/", "--target", str(target)) == 5
    assert "1 entries could not be read" in capsys.readouterr().err
    assert sorted(os.listdir(target)) == ["good", "lost+found"]
    assert (target / "good").read_text() == "good\n"
