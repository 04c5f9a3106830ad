"""The reference provider's tar, read back by the host's safe extractor."""

from __future__ import annotations

import os
from pathlib import Path

from pvebackup.api.types import IdMapEntry
from pvebackup.host.lxc.compare import compare_trees
from pvebackup.host.lxc.restore import extract_tar
from pvebackup.kit.paxtar import write_tar

ID_MAP = [IdMapEntry("u", 0, 100000, 65536), IdMapEntry("g", 0, 100000, 65536)]


def test_tar_round_trip_keeps_nanosecond_mtimes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    times = {"etc/a": 1_700_000_000_123_456_789, "etc/b": 1_700_000_001_000_000_001}
    for rel, ns in times.items():
        (src / rel).write_text(rel)
        os.chown(src / rel, 100000, 100000)
        os.utime(src / rel, ns=(ns, ns))
    os.chown(src / "etc", 100000, 100000)
    os.chown(src, 100000, 100000)
    os.utime(src / "etc", ns=(1_600_000_000_999_999_999,) * 2)
    archive = tmp_path / "root.tar.zst"
    write_tar(str(src), ["."], ID_MAP, [], archive, None, lambda level, msg: None)

    dst = tmp_path / "dst"
    dst.mkdir()
    extract_tar(archive, {"/": dst}, ID_MAP, log=lambda level, msg: None)

    for rel, ns in times.items():
        assert (dst / rel).stat().st_mtime_ns == ns, rel
    assert compare_trees(src, dst) == []
