"""Ours: a node root with a ``dir`` storage holding VM 100 and a ``backup-store``.

(``--storage-type backup-dir`` measures the reference provider instead.)

Everything runs through the real command line, as an operator would:
``pvebackup --root R backup --storage store 100`` and ``pvebackup --root R restore``.
The restore goal is measured on the provider's export itself: ``bench.export``
(a child process) calls ``restore_qemu_img_init`` and keeps the export up while
``qemu-img convert`` copies it to a raw file, the same work as the local baseline.
"""

from __future__ import annotations

import compileall
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.measure import Timed, ToolFailed, disk_usage, drop_caches, run_timed

__all__ = ["OURS", "OURS_S3", "PYTHON_NAME", "VMID", "OurNode", "precompile", "unavailable_reason"]

VMID = 100
RESTORE_VMID = 200
STOREID = "store"
PYTHON_NAME = "pvebackup (python)"  # process name in peak RSS reports
OURS = "ours"  # tool name in measurements
OURS_S3 = "ours on S3 (Ceph RGW)"  # the same with the store in a bucket (bench.s3)


def unavailable_reason() -> str | None:
    """Why our side cannot be measured at all, or None when it looks runnable."""
    for module in ("pvebackup.cli.main", "pvebackup.host", "pvebackup.providers.store"):
        try:
            found = importlib.util.find_spec(module)
        except ImportError as exc:
            return f"cannot import {module}: {exc}"
        if found is None:
            return f"{module} does not exist yet"
    return None


def precompile(package_dir: Path | None = None) -> bool:
    """Byte-compile our package (``__pycache__``), as a Debian install does.

    With ``PYTHONDONTWRITEBYTECODE`` set (common in development shells) every
    ``pvebackup`` run would otherwise compile all its modules from source, about
    0.3 s of CPU that no installed system pays. Returns False if it failed.
    """
    if package_dir is None:
        spec = importlib.util.find_spec("pvebackup")
        if spec is None or not spec.submodule_search_locations:
            return False
        package_dir = Path(next(iter(spec.submodule_search_locations)))
    return bool(compileall.compile_dir(str(package_dir), quiet=1))


class OurNode:
    """A node root for one run: ``etc/pve``, the ``local`` dir storage, the store."""

    def __init__(self, root: Path, chunk_size: str | None = None,
                 storage_type: str = "backup-store") -> None:
        self.root = root
        self.chunk_size = chunk_size
        self.storage_type = storage_type
        self.images = root / "var/lib/vz/images"
        self.store = root / "backup/store"
        self.image = self.images / str(VMID) / f"vm-{VMID}-disk-0.qcow2"

    def storage_cfg(self) -> str:
        text = (
            f"dir: local\n\tpath {self.root}/var/lib/vz\n\tcontent images,rootdir\n\n"
            f"{self.storage_type}: {STOREID}\n\tpath {self.store}\n"
        )
        if self.chunk_size and self.storage_type == "backup-store":
            text += f"\tchunk-size {self.chunk_size}\n"
        return text

    def install(self, image: Path, virtual_size: int) -> Path:
        """Create the node and copy ``image`` in as VM 100's only disk; return its path."""
        pve = self.root / "etc/pve"
        for sub in ("qemu-server", "lxc", "firewall"):
            (pve / sub).mkdir(parents=True, exist_ok=True)
        (pve / "storage.cfg").write_text(self.storage_cfg())
        self.image.parent.mkdir(parents=True, exist_ok=True)
        self.store.mkdir(parents=True, exist_ok=True)
        # cp keeps holes (--sparse=auto), so the 64 GiB image stays ~1 GiB on disk.
        subprocess.run(["cp", "--sparse=always", str(image), str(self.image)], check=True)
        (pve / f"qemu-server/{VMID}.conf").write_text(
            f"name: bench\nmemory: 1024\ncores: 2\nostype: l26\n"
            f"scsi0: local:{VMID}/{self.image.name},size={virtual_size // (1 << 20)}M\n"
        )
        return self.image

    def pvebackup(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pvebackup", "--root", str(self.root), *args]

    def backup(self) -> Timed:
        """Time one ``pvebackup backup`` of VM 100 into the store, with peak RSS."""
        return run_timed(self.pvebackup("backup", "--storage", STOREID, str(VMID)),
                         monitor_rss=PYTHON_NAME, label="pvebackup backup")

    def store_usage(self) -> int:
        return disk_usage(self.store)

    def newest_volume(self) -> str:
        """The volume id of the newest backup of VM 100 in the store."""
        out = run_timed(self.pvebackup("list", STOREID, "--output", "json"), cold=False,
                        label="pvebackup list").stdout
        records = [r for r in json.loads(out) if int(r.get("vmid", -1)) == VMID]
        if not records:
            raise ToolFailed(f"pvebackup list {STOREID} shows no backup of {VMID}")
        newest = max(records, key=lambda r: int(r.get("ctime", 0)))
        volid = newest.get("volid") or f"{STOREID}:{newest['volname']}"
        return str(volid)

    def restore_cli(self) -> tuple[Timed, Path]:
        """Time ``pvebackup restore`` of the newest backup to VM 200 on ``local``."""
        volid = self.newest_volume()
        self.forget_restored()
        timed = run_timed(self.pvebackup("restore", volid, str(RESTORE_VMID),
                                         "--storage", "local"), label="pvebackup restore")
        restored = sorted((self.images / str(RESTORE_VMID)).glob("vm-*"))
        if len(restored) != 1:
            raise ToolFailed(f"restore made {len(restored)} disk images, expected 1")
        return timed, restored[0]

    def forget_restored(self) -> None:
        shutil.rmtree(self.images / str(RESTORE_VMID), ignore_errors=True)
        (self.root / f"etc/pve/qemu-server/{RESTORE_VMID}.conf").unlink(missing_ok=True)

    def restore_export(self, target: Path) -> Timed:
        """Time ``qemu-img convert`` from the provider's restore export to raw ``target``.

        The export is started by ``python -m bench.export`` before the clock starts
        and stopped after it ends.
        """
        volid = self.newest_volume()
        volname = volid.split(":", 1)[1]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parent.parent),
                        env.get("PYTHONPATH", "")) if p
        )
        log = self.root / "restore-export.log"
        with log.open("w") as stderr:
            helper = subprocess.Popen(
                [sys.executable, "-m", "bench.export", str(self.root), STOREID, volname],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                text=True, env=env,
            )
        assert helper.stdin is not None and helper.stdout is not None
        try:
            line = helper.stdout.readline()
            if not line:
                tail = " | ".join(log.read_text().strip().splitlines()[-3:])
                raise ToolFailed(f"restore export did not start: {tail}")
            uri = json.loads(line)["uri"]
            target.unlink(missing_ok=True)
            drop_caches()
            return run_timed(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri,
                              str(target)], cold=False)
        finally:
            helper.stdin.close()
            try:
                helper.wait(timeout=60)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
