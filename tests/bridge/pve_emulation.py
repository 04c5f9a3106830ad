"""What qemu-server does around a merged-API VM backup, with real exports.

Follows qemu-server ``src/PVE/VZDump/QemuServer.pm`` ``archive_external``
(``backup_get_mechanism``, ``backup_vm_query_incremental`` with ``{dev: {size}}``,
``backup-access-setup``, NBD exports named by device with the bitmap attached,
``backup_vm``) and ``virtual_file_backup_prepare`` for ``file-handle`` (nbdfuse
of the export, ``nbdinfo --map=qemu:dirty-bitmap:NAME`` for the dirty regions,
the virtual file opened ``O_RDWR|O_DIRECT``). The snapshot access is our host
layer's :class:`BackupExport` (qemu-storage-daemon, copy-before-write, the
dirty bitmap), with the bitmap *named by Proxmox VE*, not by the provider: one
fixed name per storage, recreated when the provider answers ``new``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bridge_client import Helper

from pvebackup.host.qemu.bitmaps import bitmap_name
from pvebackup.host.qemu.export import BackupExport, DiskSpec

PVE_BITMAP = "pve-snapshot-access"
MiB = 1 << 20


def make_disk(path: Path, size: int, pattern: int) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    write(path, 0, size // 2, pattern)
    return path


def write(path: Path, offset: int, length: int, pattern: int) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} {length}", str(path)],
        check=True, capture_output=True,
    )  # fmt: skip


def _drop_bitmap(path: Path, storeid: str) -> None:
    """``bitmap-mode new``: Proxmox VE recreates the bitmap (forgets the old one)."""
    name = bitmap_name(storeid, PVE_BITMAP)
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", "-U", str(path)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    if f'"{name}"' in info:
        subprocess.run(["qemu-img", "bitmap", "--remove", str(path), name], check=True)


def vm_backup(
    helper: Helper,
    vmid: int,
    disks: dict[str, Path],
    storeid: str,
    workdir: Path,
    *,
    guest_config: str,
    firewall: str | None = None,
    file_handle: bool = False,
) -> dict[str, Any]:
    """One guest of a job, in vzdump's order; returns what the test checks."""
    start = int(time.time())
    init = helper.call("backup_init", vmid=vmid, vmtype="qemu", start_time=start)
    mechanism = helper.call("backup_get_mechanism", vmid=vmid, vmtype="qemu")
    assert mechanism == ("file-handle" if file_handle else "nbd")
    sizes = {dev: {"size": _virtual_size(p)} for dev, p in disks.items()}
    answer = helper.call("backup_vm_query_incremental", vmid=vmid, volumes=sizes)
    bitmap_id = None
    if answer:
        bitmap_id = PVE_BITMAP
        for dev, mode in answer.items():
            assert mode in ("new", "use")
            if mode == "new":
                _drop_bitmap(disks[dev], storeid)
    specs = [DiskSpec(dev, path, "qcow2") for dev, path in sorted(disks.items())]
    logs: list[str] = []
    with BackupExport(
        specs, storeid=storeid, bitmap_id=bitmap_id,
        log=lambda level, msg: logs.append(msg), workdir=workdir,
    ) as export:  # fmt: skip
        volumes: dict[str, Any] = {}
        with _file_handles(export, file_handle, workdir) as handles:
            for d in export.disks:
                vol: dict[str, Any] = {"size": d.size, "bitmap-mode": str(d.bitmap_mode)}
                if file_handle:
                    vol.update(handles[d.devicename])
                else:
                    vol["nbd-path"] = export.socket_path
                    vol["bitmap-name"] = d.bitmap_name
                volumes[d.devicename] = vol
            info: dict[str, Any] = {"bandwidth-limit": 0}
            if firewall is not None:
                info["firewall-config"] = firewall
            try:
                helper.call(
                    "backup_vm", vmid=vmid, guest_config=guest_config, volumes=volumes,
                    info=info,
                )  # fmt: skip
            except Exception as exc:
                helper.call("backup_cleanup", vmid=vmid, vmtype="qemu", success=0,
                            info={"error": str(exc)})  # fmt: skip
                raise
        export.commit()  # backup-access-teardown success=1
    cleanup = helper.call("backup_cleanup", vmid=vmid, vmtype="qemu", success=1, info={})
    return {
        "archive-name": init["archive-name"],
        "answer": answer,
        "modes": {dev: v["bitmap-mode"] for dev, v in volumes.items()},
        "size": cleanup["stats"]["archive-size"],
    }


def _virtual_size(path: Path) -> int:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", "-U", str(path)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    match = re.search(r'"virtual-size":\s*(\d+)', out)
    assert match
    return int(match.group(1))


@contextmanager
def _file_handles(
    export: BackupExport, enabled: bool, workdir: Path
) -> Iterator[dict[str, dict[str, Any]]]:
    """nbdfuse per disk, as ``virtual_file_backup_prepare``: the file handle
    (as /proc/<our pid>/fd/<n>, what the Perl side passes) and the dirty regions."""
    handles: dict[str, dict[str, Any]] = {}
    procs: list[tuple[subprocess.Popen[bytes], Path, int]] = []
    try:
        for d in export.disks if enabled else []:
            uri = f"nbd+unix:///{d.devicename}?socket={export.socket_path}"
            regions: list[list[int]] = [[0, d.size]]
            if d.bitmap_name:
                out = subprocess.run(
                    ["nbdinfo", uri, f"--map=qemu:dirty-bitmap:{d.bitmap_name}"],
                    check=True, capture_output=True, text=True,
                ).stdout  # fmt: skip
                regions = []
                for line in out.splitlines():
                    m = re.match(r"\s*(\d+)\s+(\d+)\s+(\d+)", line)
                    assert m, line
                    if int(m.group(3)) & 1:
                        regions.append([int(m.group(1)), int(m.group(2))])
            mount = Path(tempfile.mkdtemp(prefix="fuse-", dir=workdir))
            pidfile = mount.with_suffix(".pid")
            pidfile.write_text("")
            virtual = mount / d.devicename
            proc = subprocess.Popen(["nbdfuse", "--pidfile", str(pidfile), str(virtual), uri])
            deadline = time.monotonic() + 10
            while not pidfile.read_text().strip():
                assert proc.poll() is None, "nbdfuse failed"
                assert time.monotonic() < deadline, "nbdfuse did not come up"
                time.sleep(0.05)
            fd = os.open(virtual, os.O_RDWR | os.O_DIRECT)
            procs.append((proc, mount, fd))
            handles[d.devicename] = {
                "file-handle-path": f"/proc/{os.getpid()}/fd/{fd}",
                "dirty-regions": regions,
            }
        yield handles
    finally:
        for proc, mount, fd in procs:
            os.close(fd)
            unmount = ["fusermount3", "-u"] if shutil.which("fusermount3") else ["umount"]
            subprocess.run([*unmount, str(mount)], check=False, capture_output=True)
            proc.terminate()
            proc.wait(10)
            mount.rmdir()


def restore_vm(helper: Helper, volname: str, out_dir: Path) -> dict[str, Path]:
    """qmrestore's order (qemu-server ``restore_external_archive``): each disk
    through ``qemu-img convert`` from the path the provider gives."""
    mechanism, vmtype = helper.call("restore_get_mechanism", volname=volname)
    assert (mechanism, vmtype) == ("qemu-img", "qemu")
    devices = helper.call("restore_vm_init", volname=volname)
    restored: dict[str, Path] = {}
    try:
        for dev, info in sorted(devices.items()):
            path = helper.call("restore_vm_volume_init", volname=volname, device_name=dev,
                               info={})["qemu-img-path"]  # fmt: skip
            target = out_dir / f"{dev}.raw"
            try:
                subprocess.run(
                    ["qemu-img", "convert", "-f", "raw", "-O", "raw", path, str(target)],
                    check=True, capture_output=True,
                )  # fmt: skip
            finally:
                helper.call("restore_vm_volume_cleanup", volname=volname, device_name=dev,
                            info={})  # fmt: skip
            assert target.stat().st_size == info["size"]
            restored[dev] = target
    finally:
        helper.call("restore_vm_cleanup", volname=volname)
    return restored


def same_image(qcow2: Path, raw: Path) -> bool:
    result = subprocess.run(
        ["qemu-img", "compare", "-q", "-U", "-f", "qcow2", "-F", "raw", str(qcow2), str(raw)],
        check=False,
    )  # fmt: skip
    return result.returncode == 0
