"""A real backup provider for the host tests: records every call, stores what it reads.

Storage type ``test-recording`` (storage.cfg: ``test-recording: ID`` with
``path DIR``). Every call is appended as a JSON line to ``DIR/calls.jsonl``, so a
test sees the sequence also when the job ran in another process.

- VM disks: a full read (modes ``none``/``new``) copies every block through the
  kit's NBD source (:mod:`pvebackup.kit.nbdsource`) into ``<device>.raw``; ``reuse``
  copies the previous backup's image and applies only the extents the dirty bitmap
  lists. The extents read are kept in the call log. Everything read is discarded
  (trimmed) on the export, as the seed asks; ``bandwidth_limit`` paces the reads.
- Containers: ``rsync -aHAX`` of the directory with the excludes, then every
  owner mapped from host ids to container ids. Restores hand that tree back as a
  directory or a tar archive (``restore-mechanism tar|directory``).

Knobs (storage.cfg properties): ``bitmap-id`` (default ``bm1``; ``none`` for no
bitmap), ``mechanism-qemu``/``mechanism-lxc`` (what backup_get_mechanism returns),
``fail-vmid`` (backup_nbd/backup_directory of that guest raise), ``fail-job-start``,
``restore-mechanism``, ``fail-restore`` (restore_qemu_img_init / *_init raise),
``hold-directory`` (backup_directory creates ``DIR/holding-<vmid>`` and waits for
``DIR/release-<vmid>`` before it reads, so a test can act in the middle).
"""

from __future__ import annotations

import builtins
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pvebackup.api import BackupProvider
from pvebackup.api.errors import (
    ExternalToolError,
    IntegrityError,
    PluginError,
    VolumeNotFoundError,
)
from pvebackup.api.idmap import IdMapper
from pvebackup.api.types import DeviceInfo, GuestType
from pvebackup.kit.nbdsource import BufferPool, NbdSource, Trimmer, read_in_order
from pvebackup.kit.pacing import TokenBucket
from pvebackup.storage import COMMON_PROPERTIES, PropertySpec, StoragePlugin, VolumeInfo

TYPE = "test-recording"
CHUNK = 1 << 20
VOLNAME = re.compile(r"(qemu|lxc)-[0-9]{1,9}-[0-9]{3,9}")


def read_calls(base: Path) -> list[list[Any]]:
    path = base / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def call_names(base: Path) -> list[str]:
    return [c[0] for c in read_calls(base)]


class RecordingProvider(BackupProvider):
    def __init__(self, plugin: object, scfg: Mapping[str, str], storeid: str, log: Any) -> None:
        super().__init__(plugin, scfg, storeid, log)
        self.base = Path(scfg["path"])
        self.base.mkdir(parents=True, exist_ok=True)
        self.staging: dict[int, Path] = {}
        self.targets: dict[int, str] = {}
        self.restore_tmp: Path | None = None

    # -- bookkeeping ---------------------------------------------------------------
    def _record(self, *call: Any) -> None:
        with builtins.open(self.base / "calls.jsonl", "a") as fh:
            fh.write(json.dumps([str(c) if isinstance(c, Path) else c for c in call]) + "\n")

    def provider_name(self) -> str:
        return "recording"

    def _latest(self, vmid: int) -> Path | None:
        done = sorted(p for p in self.base.glob(f"*-{vmid}-*") if (p / "meta.json").exists())
        return done[-1] if done else None

    # -- job -----------------------------------------------------------------------
    def job_start(self, start_time: int) -> None:
        self._record("job_start", start_time)
        if self.scfg.get("fail-job-start") == "1":
            raise PluginError("job_start refused by test")

    def job_end(self) -> None:
        self._record("job_end")

    def job_abort(self, error: str) -> None:
        self._record("job_abort", error)

    def backup_start(self, vmid: int, vmtype: GuestType) -> None:
        self._record("backup_start", vmid, str(vmtype))

    def backup_get_mechanism(self, vmid: int, vmtype: GuestType) -> tuple[Any, str | None]:
        self._record("backup_get_mechanism", vmid, str(vmtype))
        default = "nbd" if vmtype == "qemu" else "directory"
        mech = self.scfg.get(f"mechanism-{vmtype}", default)
        bitmap = self.scfg.get("bitmap-id", "bm1")
        return mech, (None if bitmap == "none" or vmtype == "lxc" else bitmap)

    def backup_get_target(self, vmid: int, vmtype: GuestType) -> str:
        n = len(list(self.base.glob(f"{vmtype}-{vmid}-*")))
        volname = f"{vmtype}-{vmid}-{n:03d}"
        self.targets[vmid] = volname
        self.staging[vmid] = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.base))
        (self.staging[vmid] / "vmtype").write_text(str(vmtype))
        self._record("backup_get_target", vmid, str(vmtype), volname)
        return volname

    def backup_guest_config(self, vmid: int, filename: str) -> None:
        self._record("backup_guest_config", vmid, filename)
        shutil.copyfile(filename, self.staging[vmid] / "guest.conf")

    def backup_firewall_config(self, vmid: int, filename: str) -> None:
        self._record("backup_firewall_config", vmid, filename)
        shutil.copyfile(filename, self.staging[vmid] / "fw.conf")

    def backup_nbd(
        self,
        vmid: int,
        devicename: str,
        nbd_path: str,
        bitmap_mode: Any,
        bitmap_name: str | None,
        bandwidth_limit: int | None,
    ) -> None:
        self._record("backup_nbd", vmid, devicename, str(bitmap_mode), bitmap_name, bandwidth_limit)
        target = self.staging[vmid] / f"{devicename}.raw"
        reuse = bitmap_mode == "reuse"
        with NbdSource(nbd_path, devicename, bitmap_name if reuse else None) as source:
            size = source.size
            if reuse:
                prev = self._latest(vmid)
                if prev is None or not (prev / f"{devicename}.raw").exists():
                    raise IntegrityError(f"{devicename}: no base for an incremental backup")
                shutil.copyfile(prev / f"{devicename}.raw", target)
                extents = source.dirty_extents()
            else:
                with builtins.open(target, "wb") as fh:
                    fh.truncate(size)
                extents = [(0, size)]
            self._record("read_extents", vmid, devicename, extents)
            self.log("info", f"{devicename}: reading {sum(n for _, n in extents)} bytes")
            step = 64 * 1024 if bandwidth_limit else CHUNK
            reads = [
                _Piece(o, min(step, off + n - o))
                for off, n in extents
                for o in range(off, off + n, step)
            ]
            pool = BufferPool()
            trimmer = Trimmer(source)
            limiter = TokenBucket(bandwidth_limit)
            with builtins.open(target, "r+b") as fh:
                for piece, buf, data in read_in_order(source, reads, pool, pace=limiter.consume):
                    if any(data):
                        fh.seek(piece.offset)
                        fh.write(data)
                    pool.give(buf)
                    trimmer.add(piece.reads)
            trimmer.flush()
        if self.scfg.get("fail-vmid") == str(vmid):
            raise ExternalToolError(f"injected failure for {vmid}")

    def backup_directory(
        self,
        vmid: int,
        directory: str,
        id_map: Sequence[Sequence[str]],
        exclude_paths: Sequence[str],
        sources: Sequence[str],
        bandwidth_limit: int | None,
    ) -> None:
        self._record(
            "backup_directory",
            vmid,
            directory,
            [list(e) for e in id_map],
            list(exclude_paths),
            list(sources),
            bandwidth_limit,
        )
        if self.scfg.get("hold-directory"):
            (self.base / f"holding-{vmid}").write_text(directory)
            deadline = time.monotonic() + 60
            while not (self.base / f"release-{vmid}").exists():
                if time.monotonic() > deadline:
                    raise ExternalToolError("hold-directory: never released")
                time.sleep(0.02)
        tree = self.staging[vmid] / "tree"
        cmd = ["rsync", "-aHAX", "--numeric-ids", "--modify-window=-1"]
        cmd += [f"--exclude={p}" for p in exclude_paths]
        subprocess.run([*cmd, f"{directory}/", f"{tree}/"], check=True, capture_output=True)
        mapper = IdMapper(id_map)
        done: set[tuple[int, int]] = set()  # hard links: map each inode once
        for dirpath, dirnames, filenames in os.walk(tree):
            names = [*dirnames, *filenames] + (["."] if dirpath == str(tree) else [])
            for name in names:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                if (st.st_dev, st.st_ino) in done:
                    continue
                done.add((st.st_dev, st.st_ino))
                os.lchown(p, mapper.host_to_ct_uid(st.st_uid), mapper.host_to_ct_gid(st.st_gid))
                if not os.path.islink(p) and st.st_mode & 0o6000:
                    os.chmod(p, st.st_mode & 0o7777)  # chown cleared setuid/setgid
        if self.scfg.get("fail-vmid") == str(vmid):
            raise ExternalToolError(f"injected failure for {vmid}")

    def backup_end(self, vmid: int) -> None:
        self._record("backup_end", vmid)
        staging = self.staging.pop(vmid)
        (staging / "meta.json").write_text(json.dumps({"vmid": vmid, "ctime": int(time.time())}))
        staging.rename(self.base / self.targets[vmid])

    def backup_abort(self, vmid: int, error: str) -> None:
        self._record("backup_abort", vmid, error)
        staging = self.staging.pop(vmid, None)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)

    def backup_handle_log_file(self, vmid: int, filename: str) -> None:
        self._record("backup_handle_log_file", vmid, filename)
        done = self.base / self.targets.get(vmid, "-")
        if (done / "meta.json").exists():
            shutil.copyfile(filename, done / "task.log")

    def backup_get_task_size(self, vmid: int) -> int:
        self._record("backup_get_task_size", vmid)
        done = self.base / self.targets[vmid]
        return sum(p.stat().st_blocks * 512 for p in done.rglob("*") if p.is_file())

    # -- restore -------------------------------------------------------------------
    def _volume(self, volname: str) -> Path:
        # Threat: a volname naming something outside the storage, or no file at all.
        if not VOLNAME.fullmatch(volname):
            raise VolumeNotFoundError(f"no backup {volname!r}")
        path = self.base / volname
        if not (path / "meta.json").exists():
            raise VolumeNotFoundError(f"no backup {volname}")
        return path

    def restore_get_mechanism(self, volname: str, storeid: str) -> tuple[Any, Any]:
        self._record("restore_get_mechanism", volname, storeid)
        vmtype = (self._volume(volname) / "vmtype").read_text()
        if vmtype == "qemu":
            return "qemu-img", "qemu"
        return self.scfg.get("restore-mechanism", "tar"), "lxc"

    def extract_guest_config(self, volname: str, storeid: str) -> str:
        self._record("extract_guest_config", volname, storeid)
        return (self._volume(volname) / "guest.conf").read_text()

    def extract_firewall_config(self, volname: str, storeid: str) -> str | None:
        self._record("extract_firewall_config", volname, storeid)
        fw = self._volume(volname) / "fw.conf"
        return fw.read_text() if fw.exists() else None

    def restore_qemu_get_device_info(self, volname: str, storeid: str) -> DeviceInfo:
        self._record("restore_qemu_get_device_info", volname, storeid)
        return {
            p.stem: {"size": p.stat().st_size} for p in sorted(self._volume(volname).glob("*.raw"))
        }

    def restore_qemu_img_init(self, volname: str, storeid: str, devicename: str) -> str:
        self._record("restore_qemu_img_init", volname, storeid, devicename)
        if self.scfg.get("fail-restore") == devicename:
            raise ExternalToolError(f"injected restore failure for {devicename}")
        return str(self._volume(volname) / f"{devicename}.raw")

    def restore_qemu_img_cleanup(self, volname: str, storeid: str, devicename: str) -> None:
        self._record("restore_qemu_img_cleanup", volname, storeid, devicename)

    def restore_tar_init(self, volname: str, storeid: str) -> str:
        self._record("restore_tar_init", volname, storeid)
        if self.scfg.get("fail-restore") == "tar":
            raise ExternalToolError("injected restore failure for tar")
        self.restore_tmp = Path(tempfile.mkdtemp(prefix=".restore-", dir=self.base))
        archive = self.restore_tmp / "archive.tar"
        subprocess.run(
            [
                "tar",
                "--format=posix",
                "--numeric-owner",
                "--xattrs",
                "--acls",
                "-cf",
                str(archive),
                "-C",
                str(self._volume(volname) / "tree"),
                ".",
            ],
            check=True,
            capture_output=True,
        )
        return str(archive)

    def restore_tar_cleanup(self, volname: str, storeid: str) -> None:
        self._record("restore_tar_cleanup", volname, storeid)
        if self.restore_tmp is not None:
            shutil.rmtree(self.restore_tmp, ignore_errors=True)

    def restore_directory_init(self, volname: str, storeid: str) -> str:
        self._record("restore_directory_init", volname, storeid)
        return str(self._volume(volname) / "tree")

    def restore_directory_cleanup(self, volname: str, storeid: str) -> None:
        self._record("restore_directory_cleanup", volname, storeid)


@dataclass(frozen=True)
class _Piece:
    offset: int
    length: int

    @property
    def reads(self) -> tuple[tuple[int, int], ...]:
        return ((self.offset, self.length),)


class RecordingPlugin(StoragePlugin):
    type: ClassVar[str] = TYPE
    properties: ClassVar[Mapping[str, PropertySpec]] = {
        **COMMON_PROPERTIES,
        "path": PropertySpec(required=True),
        "bitmap-id": PropertySpec(),
        "mechanism-qemu": PropertySpec(),
        "mechanism-lxc": PropertySpec(),
        "fail-vmid": PropertySpec(),
        "fail-job-start": PropertySpec(),
        "restore-mechanism": PropertySpec(),
        "fail-restore": PropertySpec(),
        "hold-directory": PropertySpec(flag=True),
    }

    def new_backup_provider(
        self, scfg: Mapping[str, str], storeid: str, log_function: Any
    ) -> BackupProvider | None:
        return RecordingProvider(self, scfg, storeid, log_function)

    def list_volumes(self, scfg: Mapping[str, str], storeid: str) -> list[VolumeInfo]:
        out = []
        for p in sorted(Path(scfg["path"]).glob("*-*-*")):
            if not (p / "meta.json").exists():
                continue
            meta = json.loads((p / "meta.json").read_text())
            size = sum(f.stat().st_blocks * 512 for f in p.rglob("*") if f.is_file())
            vmtype = GuestType((p / "vmtype").read_text())
            out.append(
                VolumeInfo(
                    f"{storeid}:{p.name}",
                    meta["vmid"],
                    vmtype,
                    meta["ctime"],
                    size,
                    "test-recording",
                )
            )
        return out

    def free_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> None:
        if not VOLNAME.fullmatch(volname):  # Threat: a name reaching outside the storage
            raise VolumeNotFoundError(f"no backup {volname!r}")
        path = Path(scfg["path"]) / volname
        if not (path / "meta.json").exists():
            raise VolumeNotFoundError(f"no backup {volname}")
        shutil.rmtree(path)
