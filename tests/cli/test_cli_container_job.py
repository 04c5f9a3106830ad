"""Container backups in a real ``python -m pvebackup backup`` process.

The recording provider holds inside ``backup_directory`` (``hold-directory``)
so that the test can act while the host's view of the container exists: write
to the container (a running container's view is a copy, a stopped one's is a
read-only bind mount) or send SIGTERM (the mounts and copies must go).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from recording_provider import call_names, read_calls
from sample_node import Node

pytestmark = pytest.mark.e2e


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def mounts_below(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


def start_backup(node: Node, env: dict[str, str]) -> subprocess.Popen[str]:
    node.set_provider_options(**{"hold-directory": "1"})
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pvebackup",
            "--root",
            str(node.path),
            "backup",
            "--storage",
            "rec",
            "101",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("running", [True, False])
def test_view_of_a_container_during_its_backup(
    tmp_path: Path, subprocess_env: dict[str, str], running: bool
) -> None:
    node = Node(tmp_path / "node")
    rootfs, data = node.add_ct(101)
    if running:
        node.root.running_marker(101).parent.mkdir(parents=True)
        node.root.running_marker(101).touch()
    proc = start_backup(node, subprocess_env)
    try:
        holding = node.backup_dir / "holding-101"
        wait_for(holding.exists)
        view = Path(holding.read_text())
        tmp = Path(subprocess_env["TMPDIR"])
        assert (view / "srv/data/record.txt").read_text() == "data\n"  # mount point in place
        # the "guest" writes while the provider reads
        (rootfs / "etc/hostname").write_text("written during the backup\n")
        if running:
            assert mounts_below(tmp) == []  # a copy, like vzdump's suspend mode
            assert (view / "etc/hostname").read_text() == "ct\n"
        else:
            assert str(view) in mounts_below(tmp)  # bind mounts, read-only
            with pytest.raises(OSError):
                (view / "etc/new-file").write_text("x")
        (node.backup_dir / "release-101").touch()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert mounts_below(tmp) == [] and list(tmp.iterdir()) == []
    stored = next(node.backup_dir.glob("lxc-101-*")) / "tree/etc/hostname"
    expected = "ct\n" if running else "written during the backup\n"
    assert stored.read_text() == expected


def test_sigterm_during_a_container_backup_unmounts_everything(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    node = Node(tmp_path / "node")
    node.add_ct(101)
    proc = start_backup(node, subprocess_env)
    tmp = Path(subprocess_env["TMPDIR"])
    try:
        wait_for((node.backup_dir / "holding-101").exists)
        assert mounts_below(tmp)  # the bind-mounted view is up
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert call_names(node.backup_dir)[-3:] == [
        "backup_abort",
        "backup_handle_log_file",
        "job_abort",
    ]
    assert "interrupted by SIGTERM" in read_calls(node.backup_dir)[-1][1]
    assert mounts_below(tmp) == []
    assert list(tmp.iterdir()) == []
