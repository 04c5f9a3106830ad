"""The provider: every method of the seed's API, in the order the host calls them."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from pvebackup.api import (
    BackupMechanism,
    BackupProvider,
    BitmapMode,
    DeviceInfo,
    ExcludeMatcher,
    GuestType,
    IdMapper,
    LogFunction,
    RestoreMechanism,
)
from pvebackup.api.errors import ExternalToolError, IntegrityError, UnsupportedError
from pvebackup.kit.pacing import PacedReader, ProgressLog, TokenBucket
from pvebackup_plainfiles.settings import Settings
from pvebackup_plainfiles.volumes import DEVICE, Meta, Store, vmtype_prefix


@dataclass
class _Guest:
    """What one guest's backup has written so far."""

    vmtype: GuestType
    volname: str
    tmp: Path
    devices: dict[str, int] = field(default_factory=dict)
    done: Path | None = None
    stored: int = 0  # bytes of the volume's data and configs


class PlainFilesProvider(BackupProvider):
    """Full backups as plain files: raw disk images, tar archives, config copies."""

    def __init__(
        self, plugin: object, scfg: Mapping[str, str], storeid: str, log_function: LogFunction
    ) -> None:
        super().__init__(plugin, scfg, storeid, log_function)
        settings = Settings.of(scfg, storeid)  # StorageConfigError for a bad scfg
        self.store = Store(settings.path)
        self.store_logs = settings.store_logs
        self.guests: dict[int, _Guest] = {}

    def provider_name(self) -> str:
        return "plain-files"

    # -- the job ---------------------------------------------------------------------

    def job_start(self, start_time: int) -> None:
        self.store.path.mkdir(parents=True, exist_ok=True)

    def job_end(self) -> None:
        self._drop_unfinished()

    def job_abort(self, error: str) -> None:
        self._drop_unfinished()

    def _drop_unfinished(self) -> None:
        for guest in self.guests.values():
            shutil.rmtree(guest.tmp, ignore_errors=True)

    # -- one guest -------------------------------------------------------------------

    def backup_start(self, vmid: int, vmtype: GuestType) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        base = f"{vmtype_prefix(vmtype)}-{vmid}-{stamp}"
        volname, n = base, 1
        while (self.store.path / volname).exists() or self._taken(volname):
            n += 1  # two backups of a guest in one second
            volname = f"{base}-{n}"
        tmp = self.store.path / f".tmp-{volname}"
        tmp.mkdir()
        self.guests[vmid] = _Guest(vmtype, volname, tmp)

    def _taken(self, volname: str) -> bool:
        return (self.store.path / f".tmp-{volname}").exists()

    # [snippet:mechanism]
    def backup_get_mechanism(
        self, vmid: int, vmtype: GuestType
    ) -> tuple[BackupMechanism, str | None]:
        # Full backups only: no bitmap id, so the host exports the whole disk
        # (bitmap mode "none") and never asks us to build on an older backup.
        if vmtype == GuestType.QEMU:
            return BackupMechanism.NBD, None
        return BackupMechanism.DIRECTORY, None
    # [end]

    def backup_get_target(self, vmid: int, vmtype: GuestType) -> str:
        return self.guests[vmid].volname

    def backup_guest_config(self, vmid: int, filename: str) -> None:
        shutil.copyfile(filename, self.guests[vmid].tmp / "guest.conf")

    def backup_firewall_config(self, vmid: int, filename: str) -> None:
        shutil.copyfile(filename, self.guests[vmid].tmp / "firewall.fw")

    # [snippet:backup_nbd]
    def backup_nbd(
        self,
        vmid: int,
        devicename: str,
        nbd_path: str,
        bitmap_mode: BitmapMode,
        bitmap_name: str | None,
        bandwidth_limit: int | None,
    ) -> None:
        if bitmap_mode == BitmapMode.REUSE:  # we never asked for a bitmap
            raise IntegrityError(f"plain-files: {devicename}: cannot store only the changes")
        if not DEVICE.fullmatch(devicename):  # it becomes a file name
            raise UnsupportedError(f"plain-files: unusable device name {devicename!r}")
        image = self.guests[vmid].tmp / f"{devicename}.raw"
        source = f"nbd+unix:///{devicename}?socket={nbd_path}"
        cmd = ["qemu-img", "convert", "-q", "-f", "raw", "-O", "raw"]
        if bandwidth_limit is not None:
            cmd += ["-r", str(bandwidth_limit)]  # bytes per second, as we get it
        self.log("info", f"plain-files: {devicename}: copying the disk")
        _run([*cmd, source, str(image)])
        size = image.stat().st_size
        self.guests[vmid].devices[devicename] = size
        self.log("info", f"plain-files: {devicename}: {size} bytes done")
    # [end]

    # [snippet:backup_directory]
    def backup_directory(
        self,
        vmid: int,
        directory: str,
        id_map: Sequence[Sequence[str]],
        exclude_paths: Sequence[str],
        sources: Sequence[str],
        bandwidth_limit: int | None,
    ) -> None:
        mapper = IdMapper(id_map)  # files carry host ids; we store container ids
        excludes = ExcludeMatcher(exclude_paths)  # paths relative to the container root
        pace = TokenBucket(bandwidth_limit)  # the toolkit's pacing, as our providers use
        progress = ProgressLog(self.log_function, f"plain-files: CT {vmid}", None)
        seen: set[str] = set()
        archive = self.guests[vmid].tmp / "root.tar"
        with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
            for source in sources:  # "." first, then mount points like "./srv/data"
                root = os.path.normpath(os.path.join(directory, source))
                for relpath in _walk(root, directory, excludes):
                    if relpath in seen:  # a mount point met inside the root walk
                        continue
                    seen.add(relpath)
                    path = os.path.join(directory, relpath)
                    _add(tar, path, relpath, mapper, lambda fh: PacedReader(fh, pace, progress))
        progress.finish()
        self.log("info", f"plain-files: {len(seen)} entries archived")
    # [end]

    def backup_end(self, vmid: int) -> None:
        guest = self.guests[vmid]
        stored = sum(p.stat().st_blocks * 512 for p in guest.tmp.iterdir())
        meta = Meta(vmid, guest.vmtype, int(time.time()), stored, guest.devices)
        (guest.tmp / "meta.json").write_text(meta.to_json())
        done = self.store.path / guest.volname
        guest.tmp.rename(done)  # the volume appears complete, or not at all
        guest.done, guest.stored = done, stored

    def backup_abort(self, vmid: int, error: str) -> None:
        guest = self.guests.get(vmid)
        if guest is not None:
            shutil.rmtree(guest.tmp, ignore_errors=True)

    def backup_handle_log_file(self, vmid: int, filename: str) -> None:
        done = self.guests[vmid].done
        if done is not None and self.store_logs:  # an aborted guest keeps nothing
            shutil.copyfile(filename, done / "task.log")

    def backup_get_task_size(self, vmid: int) -> int:
        return self.guests[vmid].stored  # what list_volumes reports as the size

    # -- restore ---------------------------------------------------------------------

    def restore_get_mechanism(
        self, volname: str, storeid: str
    ) -> tuple[RestoreMechanism, GuestType]:
        meta = self.store.read_meta(volname)
        if meta.vmtype == GuestType.QEMU:
            return RestoreMechanism.QEMU_IMG, GuestType.QEMU
        return RestoreMechanism.TAR, GuestType.LXC

    def extract_guest_config(self, volname: str, storeid: str) -> str:
        return self.store.read_text(volname, "guest.conf")

    def extract_firewall_config(self, volname: str, storeid: str) -> str | None:
        if not (self.store.volume(volname) / "firewall.fw").exists():
            return None
        return self.store.read_text(volname, "firewall.fw")

    def restore_qemu_get_device_info(self, volname: str, storeid: str) -> DeviceInfo:
        return {dev: {"size": size} for dev, size in self.store.read_meta(volname).devices.items()}

    # [snippet:restore_qemu_img_init]
    def restore_qemu_img_init(self, volname: str, storeid: str, devicename: str) -> str:
        if devicename not in self.store.read_meta(volname).devices:
            raise IntegrityError(f"plain-files: {volname} has no disk {devicename}")
        # A regular file, never a symlink: the host reads it as raw disk data.
        return str(self.store.file(volname, f"{devicename}.raw"))

    def restore_qemu_img_cleanup(self, volname: str, storeid: str, devicename: str) -> None:
        pass  # nothing was staged
    # [end]

    def restore_tar_init(self, volname: str, storeid: str) -> str:
        return str(self.store.file(volname, "root.tar"))

    def restore_tar_cleanup(self, volname: str, storeid: str) -> None:
        pass


def _run(cmd: list[str]) -> None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise ExternalToolError(f"plain-files: cannot run {cmd[0]}: {exc}") from exc
    if out.returncode != 0:
        raise ExternalToolError(f"plain-files: {cmd[0]} failed: {out.stderr.strip()}")


def _walk(root: str, directory: str, excludes: ExcludeMatcher) -> list[str]:
    """Paths below ``directory`` to archive from ``root``: parents first, sorted,
    excluded directories not entered, other file systems not crossed."""
    found: list[str] = []
    device = os.lstat(root).st_dev

    def visit(path: str) -> None:
        rel = os.path.relpath(path, directory)
        st = os.lstat(path)
        is_dir = stat.S_ISDIR(st.st_mode)
        if rel != "." and excludes.excluded(rel, is_dir):
            return
        found.append(rel)
        if is_dir and st.st_dev == device:  # another file system: only as its own source
            for name in sorted(os.listdir(path)):
                visit(os.path.join(path, name))

    visit(root)
    return found


def _add(
    tar: tarfile.TarFile,
    path: str,
    relpath: str,
    mapper: IdMapper,
    paced: Callable[[BinaryIO], PacedReader],
) -> None:
    info = tar.gettarinfo(path, arcname="./" if relpath == "." else f"./{relpath}")
    if info is None:  # sockets cannot be archived
        return
    st = os.lstat(path)
    info.uid, info.gid = mapper.host_to_ct_uid(st.st_uid), mapper.host_to_ct_gid(st.st_gid)
    info.uname = info.gname = ""  # numeric ids only: names differ between systems
    # Nanosecond mtimes as PAX text; tarfile alone would round through a float.
    info.mtime = st.st_mtime_ns // 1_000_000_000
    mtime = f"{info.mtime}.{st.st_mtime_ns % 1_000_000_000:09d}"
    info.pax_headers = {**info.pax_headers, "mtime": mtime}
    if info.isreg():
        with open(path, "rb") as fh:
            tar.addfile(info, paced(fh))
    else:
        tar.addfile(info)
