"""A small btrfs file system on a loop device, for the tests of the btrfs storage."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

MiB = 1024 * 1024


def _try(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@contextmanager
def btrfs_mounted(tmp_path: Path) -> Iterator[Path]:
    """A 128 MiB btrfs (sparse image, loop device with autoclear) mounted below
    ``tmp_path``; unmounted at the end. Skips where the machine cannot."""
    if shutil.which("mkfs.btrfs") is None or shutil.which("btrfs") is None:
        pytest.skip("btrfs-progs not installed (make test installs it)")
    image = tmp_path / "btrfs.img"
    with open(image, "wb") as f:
        f.truncate(128 * MiB)
    if _try("mkfs.btrfs", "-q", str(image)).returncode != 0:
        pytest.skip("mkfs.btrfs failed here")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = _try("mount", "-o", "loop", str(image), str(mnt))
    if res.returncode != 0:
        pytest.skip(f"cannot loop-mount btrfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def is_subvolume(path: Path) -> bool:
    return _try("btrfs", "subvolume", "show", str(path)).returncode == 0
