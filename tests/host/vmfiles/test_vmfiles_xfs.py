"""vm-files on XFS: xfs_db lists, we read the blocks; backed up through backup-store.

The image is made with ``mkfs.xfs -p`` (a prototype file: no mount). mkfs.xfs
refuses file systems under 300 MB unless it runs under fstests (TEST_DIR,
TEST_DEV, QA_CHECK_FS set): those keep the image at 64 MiB.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from vmfiles_support import MiB, back_up, make_node, private_tmp, run

from pvebackup.cli.main import main

pytestmark = pytest.mark.e2e

LONG = "/" + "t" * 900  # a remote (block) symlink
MEDIUM = "/" + "m" * 300  # an inline one


def make_xfs(image: Path, src: Path) -> None:
    (src / "d").mkdir(parents=True)
    (src / "d/report.bin").write_bytes(os.urandom(200_000))
    (src / "small").write_text("small\n")
    proto = src.parent / "proto"
    proto.write_text(
        "dummy\n0 0\nd--755 0 0\n"
        f"d d--750 1000 100\nreport.bin ---640 1000 100 {src}/d/report.bin\n$\n"
        f"small ---644 0 0 {src}/small\n"
        f"suid -u-755 0 0 {src}/small\n"
        "shadow l--777 0 0 /etc/shadow\n"
        f"long l--777 0 0 {LONG}\n"
        f"medium l--777 0 0 {MEDIUM}\n"
        "fifo p--640 0 0\n"
        "null c--666 0 0 1 3\n$\n"
    )
    run("truncate", "-s", str(64 * MiB), str(image))
    env = dict(os.environ, TEST_DIR=str(src.parent), TEST_DEV="/dev/null", QA_CHECK_FS="1")
    subprocess.run(["mkfs.xfs", "-f", "-q", "-p", str(proto), str(image)], check=True, env=env)


def test_xfs_ls_and_extract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("tempfile.tempdir", None)
    private_tmp(tmp_path / "tmp")
    src = tmp_path / "src"
    image = tmp_path / "xfs.raw"
    make_xfs(image, src)
    tpm = tmp_path / "tpm.raw"
    run("truncate", "-s", str(4 * MiB), str(tpm))
    node = tmp_path / "node"
    # The TPM state comes first: the default disk is the first that can hold files.
    volid = back_up(make_node(node, {"tpmstate0": tpm, "virtio0": image}), "store1")
    argv = ["--root", str(node), "vm-files", volid]
    assert main([*argv, "ls", "/", "--output", "json"]) == 0
    listed = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert set(listed) == {"d", "small", "suid", "shadow", "long", "medium", "fifo", "null"}
    assert listed["long"]["target"] == LONG and listed["medium"]["target"] == MEDIUM
    assert listed["suid"]["mode"] == 0o4755 and listed["null"]["type"] == "chardev"
    assert main([*argv, "ls", "/d"]) == 0
    assert " 1000   100       200000 report.bin" in capsys.readouterr().out
    target = tmp_path / "out"
    assert main([*argv, "extract", "/", "--target", str(target), "--output", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["skipped"] == ["/null"] and result["partition"] is None
    assert result["disk"] == "drive-virtio0"
    assert (target / "d/report.bin").read_bytes() == (src / "d/report.bin").read_bytes()
    assert (target / "small").read_text() == "small\n"
    assert stat.S_IMODE((target / "suid").stat().st_mode) == 0o755
    assert os.readlink(target / "long") == LONG
    assert os.readlink(target / "shadow") == "/etc/shadow"
    assert stat.S_ISFIFO((target / "fifo").lstat().st_mode)
    assert stat.S_IMODE((target / "d").stat().st_mode) == 0o750
    assert os.listdir(tmp_path / "tmp") == []


def test_xfs_with_a_broken_superblock_is_a_typed_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("tempfile.tempdir", None)
    private_tmp(tmp_path / "tmp")
    image = tmp_path / "xfs.raw"
    make_xfs(image, tmp_path / "src")
    with open(image, "r+b") as f:
        f.seek(4)
        f.write(os.urandom(200))  # block size, counts, root inode: garbage
    node = tmp_path / "node"
    volid = back_up(make_node(node, {"virtio0": image}), "bdir")
    assert main(["--root", str(node), "vm-files", volid, "ls"]) == 5
    assert "xfs" in capsys.readouterr().err
    assert os.listdir(tmp_path / "tmp") == []
