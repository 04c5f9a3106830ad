"""The FUSE export of a restore source, and what a killed run leaves behind."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import pytest

from pvebackup.api.errors import PluginError, UnsupportedError
from pvebackup.host.vmfiles.blockfile import BlockFiles, source_blockdev
from pvebackup.host.vmfiles.session import _detach_stale_exports
from pvebackup.kit.proc import private_dir

pytestmark = pytest.mark.e2e


def test_source_blockdev_never_probes() -> None:
    """A path or NBD URI is raw; a json: name is taken as pinned; others are refused."""
    assert source_blockdev("/x/disk.img") == {
        "driver": "raw", "file": {"driver": "file", "filename": "/x/disk.img"}
    }  # fmt: skip
    assert source_blockdev("nbd+unix:///drive-scsi0?socket=/run/s.sock") == {
        "driver": "raw",
        "file": {"driver": "nbd", "server": {"type": "unix", "path": "/run/s.sock"},
                 "export": "drive-scsi0"},
    }  # fmt: skip
    spec = {"driver": "qcow2", "file": {"driver": "file", "filename": "/proc/1/fd/3"}}
    assert source_blockdev("json:" + json.dumps(spec)) == spec
    with pytest.raises(UnsupportedError):
        source_blockdev("http://example.com/disk")
    with pytest.raises(PluginError):
        source_blockdev("relative/disk.img")
    with pytest.raises(PluginError):
        source_blockdev('json:{"file": "x"}')


def test_a_range_reads_as_a_file_and_a_killed_daemon_is_detached(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"A" * 4096 + b"B" * 4096 + b"C" * 4096)
    base = tmp_path / "tmp"
    base.mkdir()
    workdir = private_dir("pvebackup-vmfiles-", base)
    files = BlockFiles(str(disk), workdir)
    with files:
        assert files.size() == 3 * 4096
        part = files.export(4096, 4096)
        assert part.read_bytes() == b"B" * 4096
        with pytest.raises(OSError):
            part.write_bytes(b"x")  # read-only export
        # A run killed with SIGKILL: its daemon dies with it, the mount stays dead.
        os.kill(files.daemon.pid, signal.SIGKILL)
        files.daemon._proc.wait(10)  # type: ignore[union-attr]
        with pytest.raises(OSError) as err:
            os.stat(part)
        assert err.value.errno == errno.ENOTCONN
    assert str(workdir) in Path("/proc/self/mounts").read_text()
    # A live export of another run beside it is left alone.
    other = private_dir("pvebackup-vmfiles-", base)
    with BlockFiles(str(disk), other) as live:
        live_part = live.export()
        _detach_stale_exports(base)
        assert not workdir.exists()
        assert live_part.read_bytes()[:1] == b"A"
    assert str(workdir) not in Path("/proc/self/mounts").read_text()
