"""Helpers shared by the backup-dir provider tests (imported, not fixtures)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

STOREID = "bdir"

LogRecords = list[tuple[str, str]]


def run(*cmd: str) -> str:
    """Run a command, fail the test with its stderr if it fails, return stdout."""
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(cmd)} failed: {result.stderr}"
    return result.stdout


def qemu_io(image: Path, *commands: str) -> None:
    """Run qemu-io commands (``write -P 0x11 0 1M``) on a qcow2 image."""
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    run(*args, str(image))


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by init) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class NbdExports:
    """Starts ``qemu-nbd --fork`` exports and stops them by PID at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.pids: list[int] = []
        self.writable: set[int] = set()

    def start(
        self,
        image: Path,
        name: str = "drive-scsi0",
        *,
        bitmap: str | None = None,
        writable: bool = False,
    ) -> str:
        """Export ``image`` as ``name``; return the socket path."""
        n = len(self.pids)
        sock = self.tmp_path / f"nbd{n}.sock"
        pidfile = self.tmp_path / f"nbd{n}.pid"
        args = ["qemu-nbd", "--fork", "--persistent", "--pid-file", str(pidfile)]
        args += ["-f", "qcow2", "-k", str(sock), "-x", name]
        args += ["--discard=unmap"] if writable else ["-r"]
        if bitmap is not None:
            args += ["-B", bitmap]
        run(*args, str(image))
        self.pids.append(int(pidfile.read_text()))
        if writable:
            self.writable.add(self.pids[-1])
        return str(sock)

    def stop_all(self) -> None:
        for pid in self.pids:
            # qemu-nbd lingers ~1 s on SIGTERM once a client was connected; a
            # read-only export has nothing to flush, so SIGKILL it.
            sig = signal.SIGTERM if pid in self.writable else signal.SIGKILL
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        self.pids.clear()
