"""``--bwlimit`` paces container restores: the archive's bytes or the directory's
tar stream, on the user-namespace path and the privileged one."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from lxc_fixtures import PASSTHROUGH_MAP, LogRecorder

from pvebackup.api.types import IdMapEntry
from pvebackup.host.lxc.restore import copy_directory, extract_tar

KIB = 1024
SIZE = 128 * KIB
RATE = 128 * KIB  # bytes/s: the tree needs about 0.75 s beyond the bucket's burst


def _tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "srv").mkdir(parents=True)
    # Random bytes: nothing to compress or skip as a hole.
    (src / "srv/blob").write_bytes(os.urandom(SIZE))
    return src


@pytest.mark.parametrize("mechanism", ["tar", "directory"])
@pytest.mark.parametrize("id_map", [PASSTHROUGH_MAP, []], ids=["userns", "privileged"])
def test_a_limit_slows_a_container_restore(
    tmp_path: Path, log: LogRecorder, mechanism: str, id_map: list[IdMapEntry]
) -> None:
    src = _tree(tmp_path)
    target = tmp_path / "target"
    target.mkdir()
    start = time.monotonic()
    if mechanism == "tar":
        archive = tmp_path / "ct.tar"
        subprocess.run(["tar", "-cf", str(archive), "-C", str(src), "."], check=True)
        extract_tar(archive, {"/": target}, id_map, log=log, rate=RATE)
    else:
        copy_directory(src, {"/": target}, id_map, log=log, rate=RATE)
    elapsed = time.monotonic() - start
    assert (target / "srv/blob").read_bytes() == (src / "srv/blob").read_bytes()
    # Unpaced this takes a few hundredths of a second; paced, the bytes beyond the
    # burst (a quarter of a second's worth) cost at least (SIZE - RATE/4) / RATE.
    assert elapsed >= (SIZE - RATE / 4) / RATE * 0.95
