"""A throw-away Proxmox VE node root for the contract suite: guests, storages, images.

Everything lives below one directory (pytest's ``tmp_path``): ``etc/pve`` with the
guest configs and ``storage.cfg``, a ``dir`` storage ``local`` holding the guests'
images and subvolumes, and the storage section under test (id ``contract``). The
host (:mod:`pvebackup.host`) runs real backups and restores on it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

from pvebackup.api.types import GuestType
from pvebackup.host.guests import NodeRoot

__all__ = ["MiB", "STOREID", "ContractNode"]

MiB = 1024 * 1024
STOREID = "contract"
"""Storage id of the section under test in the node's storage.cfg."""

_UNPRIVILEGED_ROOT = 100000  # the default lxc.idmap of an unprivileged container


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


class ContractNode:
    """A node root at ``path`` whose storage ``contract`` is ``storage_type``."""

    def __init__(self, path: Path, storage_type: str, properties: Mapping[str, str]) -> None:
        self.path = path
        self.root = NodeRoot(path)
        self.images = path / "var/lib/vz/images"
        self.state_dir = path / "state"  # PVEBACKUP_STATE_DIR while the host runs
        self.storage_base = path  # the directory given to storage_properties()
        self.fake_bitmap: str | None = None  # the bitmap the "host" of a fake export has
        for sub in ("qemu-server", "lxc", "firewall"):
            (self.root.pve_dir / sub).mkdir(parents=True, exist_ok=True)
        self.storage_type = storage_type
        self.properties = dict(properties)
        self.write_storage_cfg()

    def write_storage_cfg(self, **extra: str) -> None:
        """(Re)write storage.cfg: ``local`` plus the section under test and ``extra``."""
        props = {**self.properties, **extra}
        lines = [
            "dir: local",
            f"\tpath {self.path}/var/lib/vz",
            "\tcontent images,rootdir",
            "",
            f"{self.storage_type}: {STOREID}",
            *(f"\t{key} {value}" for key, value in props.items()),
            "",
        ]
        self.root.storage_cfg.write_text("\n".join(lines))

    def image(self, vmid: int, name: str) -> Path:
        return self.images / str(vmid) / name

    def add_vm(self, vmid: int, disks: Mapping[str, int]) -> list[Path]:
        """A VM with one qcow2 image per disk key (bytes); each gets a distinct pattern."""
        lines = [f"# contract VM {vmid}", "name: contract-vm", "memory: 512"]
        paths = []
        for n, (key, size) in enumerate(disks.items()):
            name = f"vm-{vmid}-disk-{n}.qcow2"
            path = self.image(vmid, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            _run("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size))
            self.write_disk(path, 0, 1 * MiB, 0x20 + n)
            lines.append(f"{key}: local:{vmid}/{name},size={size // MiB}M")
            paths.append(path)
        self.root.config_path(vmid, GuestType.QEMU).write_text("\n".join(lines) + "\n")
        return paths

    @staticmethod
    def write_random(path: Path, offset: int, length: int) -> None:
        """Write ``length`` random (incompressible) bytes at ``offset`` into a qcow2 image."""
        data = path.with_name(path.name + ".random")
        data.write_bytes(os.urandom(length))
        try:
            _run("qemu-io", "-f", "qcow2", "-c", f"write -s {data} {offset} {length}", str(path))
        finally:
            data.unlink()

    @staticmethod
    def write_disk(path: Path, offset: int, length: int, pattern: int) -> None:
        """Write ``length`` bytes of ``pattern`` at ``offset`` into a qcow2 image."""
        _run("qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} {length}", str(path))

    def add_ct(self, vmid: int) -> tuple[Path, Path]:
        """An unprivileged container (default id map) with a mount point ``/srv/data``.

        Files are owned by host ids (container root = 100000); one file by container
        uid 33, one in ``/var/cache`` for the exclude test. Returns (rootfs, data).
        """
        rootfs = self.image(vmid, f"subvol-{vmid}-disk-0.subvol")
        data = self.image(vmid, f"subvol-{vmid}-disk-1.subvol")
        (rootfs / "etc").mkdir(parents=True)
        (rootfs / "etc/hostname").write_text(f"ct{vmid}\n")
        (rootfs / "var/cache").mkdir(parents=True)
        (rootfs / "var/cache/junk.tmp").write_text("excluded\n")
        (rootfs / "srv/data").mkdir(parents=True)
        os.symlink("../etc/hostname", rootfs / "srv/link")
        data.mkdir(parents=True)
        (data / "record.txt").write_text("data\n")
        for tree in (rootfs, data):
            for dirpath, dirnames, filenames in os.walk(tree):
                for name in [".", *dirnames, *filenames]:
                    uid = _UNPRIVILEGED_ROOT
                    os.lchown(os.path.join(dirpath, name), uid, uid)
        os.lchown(data / "record.txt", _UNPRIVILEGED_ROOT + 33, _UNPRIVILEGED_ROOT + 33)
        text = (
            f"hostname: ct{vmid}\nunprivileged: 1\n"
            f"rootfs: local:{vmid}/{rootfs.name},size=0T\n"
            f"mp0: local:{vmid}/{data.name},mp=/srv/data,backup=1,size=0T\n"
        )
        self.root.config_path(vmid, GuestType.LXC).write_text(text)
        return rootfs, data
