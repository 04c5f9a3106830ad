"""SIGTERM in the middle of ``python -m pvebackup backup``: abort, clean up, exit 130."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from recording_provider import call_names, read_calls
from sample_node import MiB, Node

pytestmark = pytest.mark.e2e


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def daemons_below(path: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "qemu-storage-daemon"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if str(path) in line]


def test_sigterm_aborts_job_and_leaves_nothing(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    node = Node(tmp_path / "node")
    disk = node.add_vm(100, {"scsi0": 8 * MiB})[0]
    node.add_vm(102, {"scsi0": 1 * MiB})
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvebackup", "--root", str(node.path), "backup",
         "--storage", "rec", "--bwlimit", "256", "100", "102"],
        env=subprocess_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: "read_extents" in call_names(node.backup_dir))
        assert daemons_below(Path(subprocess_env["TMPDIR"]))  # the export is up
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "error: interrupted by SIGTERM" in err
    names = call_names(node.backup_dir)
    assert names[-3:] == ["backup_abort", "backup_handle_log_file", "job_abort"]
    assert "backup_end" not in names and "job_end" not in names
    assert [c[1] for c in read_calls(node.backup_dir) if c[0] == "backup_start"] == [100]
    assert "interrupted by SIGTERM" in read_calls(node.backup_dir)[-1][1]
    # nothing left running or lying around
    assert daemons_below(Path(subprocess_env["TMPDIR"])) == []
    assert list(Path(subprocess_env["TMPDIR"]).iterdir()) == []
    assert not list(node.backup_dir.glob(".staging-*"))
    info = subprocess.run(["qemu-img", "info", str(disk)], capture_output=True, text=True)
    assert info.returncode == 0  # image lock released
    assert "ERROR: Backup of VM 100 failed - interrupted by SIGTERM" in (
        node.root.log_dir / "qemu-100.log"
    ).read_text()
