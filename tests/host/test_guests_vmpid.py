"""A VM runs only when its pid file names a live QEMU (NodeRoot.vm_pid, is_running)."""

from __future__ import annotations

import os
from pathlib import Path

from pvebackup.api.types import GuestType
from pvebackup.host.guests import NodeRoot


def _vm(root: NodeRoot, vmid: int) -> None:
    cfg = root.config_path(vmid, GuestType.QEMU)
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text("name: vm\n")
    root.qemu_run_dir.mkdir(parents=True, exist_ok=True)


def test_stale_or_hostile_pid_files_do_not_make_a_vm_run(tmp_path: Path) -> None:
    root = NodeRoot(tmp_path)
    _vm(root, 100)
    pidfile = root.qemu_run_dir / "100.pid"
    assert not root.is_running(100)  # no pid file
    # A stale pid file whose number now belongs to another program (here: pytest).
    pidfile.write_text(f"{os.getpid()}\n")
    assert root.vm_pid(100) is None and not root.is_running(100)
    for junk in ("", "abc", "-1", "0", "99999999999999999999", "1\x00"):
        pidfile.write_text(junk)
        assert not root.is_running(100), junk
    # The old stand-in marker no longer makes a VM run.
    root.running_marker(100).parent.mkdir(parents=True, exist_ok=True)
    root.running_marker(100).touch()
    assert not root.is_running(100)
