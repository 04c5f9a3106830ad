"""A sample Proxmox VE node root for the job, restore and CLI tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pvebackup.api.types import GuestType
from pvebackup.host.guests import NodeRoot

MiB = 1024 * 1024

STORAGE_CFG = """\
dir: local
\tpath {root}/var/lib/vz
\tcontent images,rootdir

dir: other
\tpath {root}/var/lib/other
\tcontent images,rootdir

test-recording: rec
\tpath {root}/backup
{extra}
"""


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


class Node:
    """A node root under tmp_path with a dir storage ``local`` and a provider ``rec``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.root = NodeRoot(path)
        self.backup_dir = path / "backup"
        self.images = path / "var/lib/vz/images"
        for sub in ("qemu-server", "lxc", "firewall"):
            (self.root.pve_dir / sub).mkdir(parents=True, exist_ok=True)
        self.set_provider_options()

    def set_provider_options(self, **opts: str) -> None:
        extra = "".join(f"\t{k} {v}\n" for k, v in opts.items())
        self.root.storage_cfg.write_text(STORAGE_CFG.format(root=self.path, extra=extra))

    def image(self, vmid: int, name: str) -> Path:
        return self.images / str(vmid) / name

    def add_vm(
        self, vmid: int, disks: dict[str, int], *, fmt: str = "qcow2", extra: str = ""
    ) -> list[Path]:
        """A VM with one image per disk key (size in bytes), first MiB of each filled."""
        lines = [f"# test VM {vmid}", "name: vm", "memory: 512"]
        paths = []
        for n, (key, size) in enumerate(disks.items()):
            name = f"vm-{vmid}-disk-{n}.{fmt}"
            path = self.image(vmid, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            sh("qemu-img", "create", "-q", "-f", fmt, str(path), str(size))
            sh("qemu-io", "-f", fmt, "-c", f"write -P {0x20 + n} 0 1M", str(path))
            lines.append(f"{key}: local:{vmid}/{name},size={size // MiB}M")
            paths.append(path)
        text = "\n".join(lines) + "\n" + extra
        self.root.config_path(vmid, GuestType.QEMU).write_text(text)
        return paths

    def add_ct(self, vmid: int, *, mp: bool = True, extra: str = "") -> list[Path]:
        """A privileged container with a few files and (optionally) a mount point."""
        rootfs = self.image(vmid, f"subvol-{vmid}-disk-0.subvol")
        (rootfs / "etc").mkdir(parents=True)
        (rootfs / "etc/hostname").write_text("ct\n")
        (rootfs / "var/cache").mkdir(parents=True)
        (rootfs / "var/cache/junk.tmp").write_text("junk\n")
        (rootfs / "srv/data").mkdir(parents=True)
        text = f"hostname: ct{vmid}\nrootfs: local:{vmid}/{rootfs.name},size=0T\n"
        dirs = [rootfs]
        if mp:
            data = self.image(vmid, f"subvol-{vmid}-disk-1.subvol")
            data.mkdir(parents=True)
            (data / "record.txt").write_text("data\n")
            text += f"mp0: local:{vmid}/{data.name},mp=/srv/data,backup=1,size=0T\n"
            dirs.append(data)
        self.root.config_path(vmid, GuestType.LXC).write_text(text + extra)
        return dirs
