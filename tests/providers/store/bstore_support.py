"""Helpers of the backup-store provider tests: images, qemu-nbd exports, a fake host."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pvebackup.api.types import BitmapMode, GuestType
from pvebackup.providers.store.plugin import BackupStorePlugin
from pvebackup.providers.store.provider import TASK_LOG_FILE, BackupStoreProvider
from pvebackup.store.snapshot import SnapshotId

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB
DEVICE = "drive-scsi0"
BITMAP = "store-test"


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


@dataclass
class LogRecorder:
    lines: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, level: str, message: str) -> None:
        self.lines.append((str(level), message))

    def text(self) -> str:
        return "\n".join(f"{lv}: {m}" for lv, m in self.lines)


def mixed_image(path: Path, size: int = 4 * MiB, seed: int = 1) -> Path:
    """A qcow2 with random, text and zero regions (zeros left unallocated)."""
    rng = random.Random(seed)
    raw = path.with_suffix(".raw")
    quarter = size // 4
    text = (b"the quick brown fox jumps over the lazy dog %d\n" * (quarter // 40 + 1))[:quarter]
    with open(raw, "wb") as f:
        f.write(rng.randbytes(quarter))
        f.write(bytes(quarter))
        f.write(text)
        f.write(rng.randbytes(size - 3 * quarter))
    run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    raw.unlink()
    return path


def qemu_write(path: Path, offset: int, length: int, pattern: int) -> None:
    run("qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} {length}", str(path))


def compare(a: Path, b: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "compare", str(a), str(b)], capture_output=True, text=True)


@contextmanager
def nbd_export(image: Path, bitmap: str | None = None) -> Iterator[str]:
    """``qemu-nbd`` serving ``image`` as ``DEVICE`` (writable, discard=unmap)."""
    sock = Path(tempfile.mkdtemp(prefix="nbd-")) / "s"
    # --persistent: the readiness probe below is a client too; without it qemu-nbd
    # may exit when that probe disconnects. It is stopped by PID at the end anyway.
    cmd = ["qemu-nbd", "-f", "qcow2", "-k", str(sock), "-x", DEVICE, "-e", "2", "-t",
           "--discard=unmap", str(image)]  # fmt: skip
    if bitmap:
        cmd[1:1] = ["-B", bitmap]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    try:
        # Ready means accepting connections: the socket file exists a little before
        # qemu-nbd listens on it. Generous, as a loaded CI machine is slow to start it.
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"qemu-nbd failed: {proc.stderr.read() if proc.stderr else ''}")
            if sock.exists():
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(str(sock))
                    break
                except OSError:
                    pass
                finally:
                    probe.close()
            if time.monotonic() > deadline:
                raise RuntimeError("qemu-nbd did not start")
            time.sleep(0.01)
        yield str(sock)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.stderr:
            proc.stderr.close()
        shutil.rmtree(sock.parent, ignore_errors=True)


class FakeHost:
    """Plays the host's part: one job per call, the seed's call order."""

    def __init__(self, root: Path, scfg: dict[str, str], storeid: str = "store1") -> None:
        self.root = root
        self.scfg = scfg
        self.storeid = storeid
        Path(scfg["path"]).mkdir(parents=True, exist_ok=True)  # the operator made it
        self.plugin = BackupStorePlugin()
        self.log = LogRecorder()
        self.conf = root / "100.conf"
        self.conf.write_text("memory: 512\nscsi0: local:100/vm-100-disk-0.qcow2\n")
        self.fw = root / "100.fw"
        self.fw.write_text("[OPTIONS]\nenable: 1\n")

    def provider(self) -> BackupStoreProvider:
        p = self.plugin.new_backup_provider(self.scfg, self.storeid, self.log)
        assert isinstance(p, BackupStoreProvider)
        p.progress_interval = 0.0
        return p

    def mechanism(self, vmid: int = 100) -> str | None:
        p = self.provider()
        p.job_start(int(time.time()))
        p.backup_start(vmid, GuestType.QEMU)
        _, bitmap = p.backup_get_mechanism(vmid, GuestType.QEMU)
        p.backup_abort(vmid, "only asked")
        p.job_end()
        return bitmap

    def backup(
        self,
        image: Path,
        mode: BitmapMode = BitmapMode.NONE,
        *,
        vmid: int = 100,
        bandwidth: int | None = None,
        provider: BackupStoreProvider | None = None,
        expect_bitmap: bool | None = None,
    ) -> tuple[str, int]:
        """Back up ``image`` (exported from a copy, so that discards spare it)."""
        p = provider or self.provider()
        p.job_start(int(time.time()))
        p.backup_start(vmid, GuestType.QEMU)
        try:
            _, bitmap = p.backup_get_mechanism(vmid, GuestType.QEMU)
            if expect_bitmap is not None:
                assert (bitmap is not None) == expect_bitmap, self.log.text()
            volname = p.backup_get_target(vmid, GuestType.QEMU)
            p.backup_guest_config(vmid, str(self.conf))
            p.backup_firewall_config(vmid, str(self.fw))
            export = image.with_name(image.stem + f"-export-{vmid}.qcow2")
            run("cp", "--sparse=always", str(image), str(export))
            use_bitmap = BITMAP if mode is not BitmapMode.NONE else None
            with nbd_export(export, use_bitmap if mode is BitmapMode.REUSE else None) as sock:
                p.backup_nbd(vmid, DEVICE, sock, mode, use_bitmap, bandwidth)
            p.backup_end(vmid)
        except Exception as exc:
            p.backup_abort(vmid, str(exc))
            p.job_end()
            raise
        logfile = self.root / "task.log"
        logfile.write_text("task log line\n")
        p.backup_handle_log_file(vmid, str(logfile))
        size = p.backup_get_task_size(vmid)
        p.job_end()
        return volname, size

    def restore(self, volname: str, out: Path, provider: BackupStoreProvider | None = None) -> None:
        p = provider or self.provider()
        info = p.restore_qemu_get_device_info(volname, self.storeid)
        assert DEVICE in info
        uri = p.restore_qemu_img_init(volname, self.storeid, DEVICE)
        try:
            run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, str(out))
        finally:
            p.restore_qemu_img_cleanup(volname, self.storeid, DEVICE)


def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in (path / "chunks").rglob("*") if f.is_file())


def stored_task_log(provider: BackupStoreProvider, volname: str) -> str:
    """The task log the provider stored with ``volname`` (what an operator would read)."""
    store = provider.store()
    snap = store.open_snapshot(SnapshotId.from_volname(volname))
    data = store.backend.get(snap.id.prefix + TASK_LOG_FILE)
    return store.codec.decode(data, name=TASK_LOG_FILE).decode("utf-8")
