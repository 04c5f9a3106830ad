"""A running VM for the live-backup tests: qemu-system-x86_64 started as Proxmox VE does.

TCG, no guest OS: the "guest" writes through its device with HMP ``qemu-io`` on a
second QMP monitor (the VM's own ``VMID.qmp`` is the one the backup uses; QEMU
serves one client per monitor socket). Started and stopped by PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from pvebackup.host.guests import NodeRoot
from pvebackup.host.qemu.qmp import QmpClient

MiB = 1024 * 1024


class LiveVm:
    def __init__(
        self,
        root: NodeRoot,
        vmid: int,
        disk: Path,
        key: str = "scsi0",
        *,
        fmt: str = "qcow2",
        blockdev: bool = False,
    ) -> None:
        """``blockdev``: as qemu-server 9 starts it (``-blockdev`` nodes with a throttle
        filter on top, an anonymous block backend found by its device); else
        ``-drive id=drive-<key>``."""
        self.root = root
        self.vmid = vmid
        self.key = key
        self.blockdev = blockdev
        run = root.qemu_run_dir
        run.mkdir(parents=True, exist_ok=True)
        self.pidfile = run / f"{vmid}.pid"
        self.qmp_path = run / f"{vmid}.qmp"
        self.test_qmp = run / f"{vmid}.test.qmp"
        self.proc = subprocess.Popen(
            [
                "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-nodefaults",
                "-display", "none", "-m", "32", "-pidfile", str(self.pidfile),
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                "-qmp", f"unix:{self.test_qmp},server=on,wait=off",
                *_drive(disk, key, fmt, blockdev),
                "-device", "virtio-scsi-pci,id=scsihw0",
                "-device", f"scsi-hd,bus=scsihw0.0,drive=drive-{key},id={key}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not (self.pidfile.exists() and self.test_qmp.exists() and self.qmp_path.exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qemu did not start: {self.proc.stderr.read()!r}")  # type: ignore[union-attr]
            time.sleep(0.05)
        self.qmp = QmpClient(str(self.test_qmp))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def hmp(self, line: str) -> str:
        # HMP's qemu-io takes a block backend name, or the device's qdev id.
        return str(self.qmp.execute("human-monitor-command", **{"command-line": line}))

    def write(self, pattern: int, offset: int, length: int) -> None:
        out = self.hmp(f'qemu-io {self._dev()} "write -P {pattern} {offset} {length}"')
        assert "error" not in out.lower(), out

    def read_ok(self, pattern: int, offset: int, length: int) -> bool:
        out = self.hmp(f'qemu-io {self._dev()} "read -P {pattern} {offset} {length}"')
        return "fail" not in out.lower() and "error" not in out.lower()

    def _dev(self) -> str:
        return f"-d {self.key}" if self.blockdev else f"drive-{self.key}"

    def status(self) -> str:
        return str(self.qmp.execute("query-status")["status"])

    def graph(self) -> tuple[Any, ...]:
        nodes = sorted(
            (n["node-name"], n["drv"]) for n in self.qmp.execute("query-named-block-nodes")
        )
        top = [
            (b["device"], b.get("qdev"), b["inserted"]["node-name"])
            for b in self.qmp.execute("query-block")
        ]
        exports = self.qmp.execute("query-block-exports")
        return tuple(nodes), tuple(top), tuple(json.dumps(e) for e in exports)

    def wait_exports(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.qmp.execute("query-block-exports"):
            assert time.monotonic() < deadline, "no export appeared"
            time.sleep(0.01)

    def stop(self) -> None:
        self.qmp.close()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.pidfile.unlink(missing_ok=True)


def _drive(disk: Path, key: str, fmt: str, blockdev: bool) -> list[str]:
    driver = "host_device" if stat.S_ISBLK(os.stat(disk).st_mode) else "file"
    if not blockdev:
        return ["-drive", f"file={disk},if=none,id=drive-{key},format={fmt}"]
    # qemu-server 9's layout: a throttle filter named drive-<key> (the disk's
    # limits, its own throttle group) above the format node f<hash>, above e<hash>.
    node = {
        "driver": "throttle",
        "node-name": f"drive-{key}",
        "throttle-group": f"throttle-drive-{key}",
        "file": {
            "driver": fmt,
            "node-name": f"f{key}",
            "file": {"driver": driver, "filename": str(disk), "node-name": f"e{key}"},
        },
    }
    return ["-object", f"throttle-group,id=throttle-drive-{key}", "-blockdev", json.dumps(node)]


class FakeAgent(threading.Thread):
    """A guest agent on ``VMID.qga`` that records the commands; ``hang`` never answers."""

    def __init__(self, path: Path, *, hang: bool = False) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.hang = hang
        self.commands: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.stopping = False
        self.start()

    def run(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                buf = b""
                conn.settimeout(0.2)
                while not self.stopping:
                    try:
                        chunk = conn.recv(4096)
                    except TimeoutError:
                        continue
                    if not chunk:
                        break
                    buf += chunk
                    while b"\n" in buf:
                        line, _, buf = buf.partition(b"\n")
                        msg = json.loads(line)
                        self.commands.append(msg["execute"])
                        if self.hang:
                            continue
                        ret = msg.get("arguments", {}).get("id", 0)
                        conn.sendall(json.dumps({"return": ret}).encode() + b"\n")

    def close(self) -> None:
        self.stopping = True
        self.sock.close()
        self.join(5)
