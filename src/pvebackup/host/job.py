"""Backup jobs: vzdump's role. Calls the provider exactly in the seed's order.

::

    job_start(start_time)                       once; failure -> job_abort, job fails
    per guest:
        backup_start(vmid, vmtype)
        backup_get_mechanism(vmid, vmtype)      must be nbd (qemu) / directory (lxc)
        backup_get_target(vmid, vmtype)         reported as STOREID:VOLNAME
        backup_guest_config(vmid, copy of the config's main section)
        backup_firewall_config(vmid, copy)      only when <vmid>.fw exists
        backup_nbd per disk | backup_directory
        backup_end(vmid)   (then the dirty bitmaps are committed)
        or backup_abort(vmid, error) on any failure of the guest before backup_end
        returned; the job goes on. After backup_end returned the backup is the
        provider's committed one: a later signal or teardown failure is logged
        and never calls backup_abort.
        backup_get_mechanism returning None (the seed's undef) fails the guest.
        backup_handle_log_file(vmid, task log)
        backup_get_task_size(vmid)              successful guests only, for the report
    job_end()                                   after all guests, even if some failed
    job_abort(error)                            instead, on SIGINT/SIGTERM or job failure

Before ``job_start`` the lock of every guest is taken
(:class:`~pvebackup.host.runstate.GuestRun`; a locked guest fails the job at once
with ``LockedError``, exit 7) and what a killed earlier run of a guest left is
removed. Cleanup (export teardown, unmounts, temporary copies) lives in context
managers and ``finally`` blocks, so it runs on every path, including signals: the
handlers of :mod:`pvebackup.host.signals` turn SIGINT/SIGTERM into
:class:`AbortedError` raised in the main thread.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from pvebackup.api.errors import (
    AbortedError,
    ExternalToolError,
    GuestConfigError,
    GuestNotFoundError,
    PluginError,
    PveBackupError,
    QmpError,
    UnsupportedError,
    UsageError,
)
from pvebackup.api.provider import BackupProvider
from pvebackup.api.types import BackupMechanism, GuestType
from pvebackup.host.guests import CtConfig, GuestConfig, NodeRoot, VmConfig
from pvebackup.host.lxc.directory import backup_sources, prepare_backup_directory
from pvebackup.host.progress import ProgressDisplay, wants_bar
from pvebackup.host.qemu.export import BackupExport, DiskSpec
from pvebackup.host.qemu.fleecing import FleecingVolumes, fleecing_format
from pvebackup.host.qemu.live import LiveBackupExport
from pvebackup.host.qemu.liverestore import start_command as vm_start_command
from pvebackup.host.qemu.qmp import QmpClient
from pvebackup.host.qemu.running import RunningVm, find_running
from pvebackup.host.runstate import GuestRun
from pvebackup.host.signals import abort_on_signals
from pvebackup.host.tasklog import LogRouter, TaskLog
from pvebackup.kit import proc
from pvebackup.kit.crashpoint import crash_point
from pvebackup.kit.proc import private_dir
from pvebackup.kit.units import format_bytes
from pvebackup.storage import (
    GuestVolume,
    GuestVolumeStorage,
    StorageConfig,
    guest_volume,
    guest_volume_storage,
    new_backup_provider,
    parse_volume_id,
    read_storage_config,
    storage_config,
)

__all__ = ["MODES", "GuestResult", "JobResult", "run_backup_job"]

MODES = ("snapshot", "suspend", "stop")

_EXPECTED = {GuestType.QEMU: BackupMechanism.NBD, GuestType.LXC: BackupMechanism.DIRECTORY}


@dataclass
class GuestResult:
    """Outcome of one guest's backup."""

    vmid: int
    vmtype: GuestType | None
    ok: bool = False
    error: str | None = None
    target: str | None = None
    size: int | None = None
    seconds: float = 0.0
    log_path: Path | None = None


@dataclass
class JobResult:
    """Outcome of a job that ran to ``job_end`` (job-level failures raise instead)."""

    storeid: str
    provider_name: str
    start_time: int
    guests: list[GuestResult] = field(default_factory=list)

    @property
    def failed(self) -> list[GuestResult]:
        return [g for g in self.guests if not g.ok]


def _provider_name(provider: BackupProvider) -> str:
    try:
        return str(provider.provider_name())
    except Exception:  # a provider without a name still gets its job run
        return type(provider).__name__


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PveBackupError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def run_backup_job(
    root: NodeRoot,
    storeid: str,
    vmids: Sequence[int] | None,
    *,
    bwlimit_kib: int | None = None,
    exclude_paths: Sequence[str] = (),
    terminal: TextIO | None = sys.stderr,
    clock: Callable[[], float] = time.time,
    mode: str = "snapshot",
    stop_wait: float = 10.0,
    start_command: Sequence[str] | None = None,
    fleecing_storage: str | None = None,
    progress_bar: bool | None = None,
) -> JobResult:
    """Back up guests ``vmids`` (``None``: every guest) to storage ``storeid``.

    :param bwlimit_kib: KiB/s as vzdump's ``--bwlimit``; the provider gets bytes/s.
    :param exclude_paths: rsync-style patterns handed to ``backup_directory``.
    :param terminal: where log lines go besides the task logs (``None``: nowhere).
    :param mode: for running VMs, as vzdump's ``--mode``: ``snapshot`` (fleecing in
        the VM's QEMU while it runs), ``suspend`` (paused during the set-up) or
        ``stop`` (shut down, backed up offline, started again). Stopped VMs are
        always backed up offline.
    :param stop_wait: minutes mode ``stop`` waits for the guest to shut down.
    :param start_command: argv starting a VM again after mode ``stop`` when the VMID
        is appended; default :func:`~pvebackup.host.qemu.liverestore.start_command`
        (``$PVEBACKUP_START_COMMAND``, else ``qm start``), the same as live restore's.
    :param fleecing_storage: a storage for the fleecing images of running VMs (any
        type that allocates images; qcow2 where it can, else raw).
    :param progress_bar: draw live progress bars on ``terminal`` (default: when it
        is a terminal; :func:`~pvebackup.host.progress.wants_bar`).
    :returns: the per-guest results; check :attr:`JobResult.failed`.
    :raises StorageConfigError, StorageNotFoundError, PluginError: before the job starts.
    :raises GuestNotFoundError: a requested vmid has no config (before the job starts).
    :raises LockedError: another backup or restore of a guest runs (before the job starts).
    :raises UnsupportedError: the storage has no backup provider.
    :raises AbortedError: SIGINT/SIGTERM; ``job_abort`` was called, cleanup done.
    :raises PveBackupError: ``job_start`` failed; ``job_abort`` was called.
    """
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if bwlimit_kib is not None and bwlimit_kib <= 0:
        raise UnsupportedError(f"bandwidth limit must be positive, not {bwlimit_kib}")
    cfg = read_storage_config(root.storage_cfg)
    scfg = storage_config(cfg, storeid)
    guests = _select_guests(root, vmids)
    log = LogRouter(terminal)
    if progress_bar if progress_bar is not None else wants_bar(terminal):
        assert terminal is not None
        log.display = ProgressDisplay(terminal)
    provider = new_backup_provider(cfg, storeid, log)
    if provider is None:
        raise UnsupportedError(
            f"storage '{storeid}' (type {scfg.get('type')}) has no backup provider"
        )
    name = _provider_name(provider)
    start_time = int(clock())
    result = JobResult(storeid, name, start_time)
    bwlimit = bwlimit_kib * 1024 if bwlimit_kib is not None else None
    job = _Job(root, cfg, storeid, provider, log, bwlimit, list(exclude_paths))
    argv = tuple(start_command) if start_command is not None else tuple(vm_start_command())
    job.live = _LiveOptions(mode, stop_wait, argv, None)
    if fleecing_storage is not None:
        # Any storage that allocates images (PVE allows any): checked before the job.
        fscfg, fplugin = guest_volume_storage(cfg, fleecing_storage)
        fleecing_format(fplugin, fleecing_storage)
        job.live.fleecing = (fleecing_storage, fscfg, fplugin)
    with ExitStack() as locks:
        # Every guest's lock before the provider hears of a job: a second backup of
        # a guest fails at once (exit 7), and what a killed run left is cleaned up.
        runs = {
            vmid: locks.enter_context(GuestRun(root, vmid, action="backup", log=log, cfg=cfg))
            for vmid, _ in guests
        }
        job.runs = runs
        if log.display is not None:
            log.display.start()
            locks.callback(_stop_display, log)
        with abort_on_signals():
            try:
                log.info(f"starting new backup job: storage {storeid}, provider {name}")
                provider.job_start(start_time)
                for vmid, vmtype in guests:
                    with runs[vmid].recording():
                        result.guests.append(job.backup_guest(vmid, vmtype))
            except BaseException as exc:
                error = _describe(exc)
                log.err(f"backup job failed: {error}")
                try:
                    provider.job_abort(error)
                except Exception as abort_exc:
                    log.err(f"job_abort failed: {_describe(abort_exc)}")
                if isinstance(exc, PveBackupError):
                    raise
                raise PluginError(f"backup job failed: {error}") from exc
            try:
                provider.job_end()
            except Exception as exc:
                raise PluginError(f"job_end failed: {_describe(exc)}") from exc
    failed = len(result.failed)
    # The same figures as the job's table: the sum of its SIZE column (the
    # providers' task sizes) and the time from job_start to job_end.
    total = sum(g.size or 0 for g in result.guests if g.ok)
    took = _hms(clock() - start_time)
    if failed:
        log.err(
            f"backup job finished with errors: {failed} of {len(guests)} guests failed"
            f" ({format_bytes(total)} backed up, {took})"
        )
    else:
        log.info(
            f"backup job finished successfully ({len(guests)} guests,"
            f" {format_bytes(total)}, {took})"
        )
    return result


def _stop_display(log: LogRouter) -> None:
    display, log.display = log.display, None
    if display is not None:
        display.stop()


def _select_guests(root: NodeRoot, vmids: Sequence[int] | None) -> list[tuple[int, GuestType]]:
    if vmids is None:
        return root.list_guests()
    selected: list[tuple[int, GuestType]] = []
    for vmid in dict.fromkeys(vmids):
        vmtype = root.guest_type(vmid)
        if vmtype is None:
            raise GuestNotFoundError(f"no guest with vmid {vmid}")
        selected.append((vmid, vmtype))
    return selected


@dataclass
class _LiveOptions:
    mode: str
    stop_wait: float  # minutes
    start_command: tuple[str, ...]
    fleecing: tuple[str, dict[str, str], GuestVolumeStorage] | None


class _Job:
    """State shared by the guest backups of one job."""

    live = _LiveOptions("snapshot", 10.0, ("qm", "start"), None)
    runs: dict[int, GuestRun] = {}  # noqa: RUF012 - replaced per job

    def __init__(
        self,
        root: NodeRoot,
        cfg: StorageConfig,
        storeid: str,
        provider: BackupProvider,
        log: LogRouter,
        bwlimit: int | None,
        exclude_paths: list[str],
    ) -> None:
        self.root = root
        self.cfg = cfg
        self.storeid = storeid
        self.provider = provider
        self.log = log
        self.bwlimit = bwlimit
        self.exclude_paths = exclude_paths
        self.ended = False  # the current guest's backup_end returned
        # (volid, plugin, scfg) of what the current guest's backup activated
        self.activated: list[tuple[str, GuestVolumeStorage, dict[str, str]]] = []

    def backup_guest(self, vmid: int, vmtype: GuestType) -> GuestResult:
        """One guest, start to finish. Re-raises only AbortedError (after backup_abort)."""
        res = GuestResult(vmid, vmtype)
        res.log_path = self.root.log_dir / f"{vmtype}-{vmid}.log"
        started = time.monotonic()
        tasklog = TaskLog(res.log_path)
        self.log.current = tasklog
        aborted: AbortedError | None = None
        self.ended = False
        try:
            self.log.info(f"Starting Backup of VM {vmid} ({vmtype})")
            try:
                self._backup(vmid, vmtype, res)
                res.ok = True
            except Exception as exc:
                if isinstance(exc, AbortedError):
                    aborted = exc
                if self.ended:
                    # backup_end returned: the provider committed this backup, so
                    # backup_abort (throw it away) would be a lie. What failed is
                    # our own teardown; the bitmaps then fall back safely (reuse
                    # keeps its changes, new is dropped: the next backup is full).
                    res.ok = True
                    self.log.warn(
                        f"VM {vmid}: backup committed, then interrupted: {_describe(exc)}"
                    )
                else:
                    res.error = _describe(exc)
                    self.log.err(f"Backup of VM {vmid} failed - {res.error}")
                    try:
                        self.provider.backup_abort(vmid, res.error)
                    except Exception as abort_exc:
                        self.log.err(f"backup_abort failed: {_describe(abort_exc)}")
            res.seconds = time.monotonic() - started
            if res.ok:
                self.log.info(f"Finished Backup of VM {vmid} ({_hms(res.seconds)})")
        finally:
            self.log.current = None
            tasklog.close()
            if self.log.display is not None:
                self.log.display.clear()
        try:
            self.provider.backup_handle_log_file(vmid, str(res.log_path))
        except Exception as exc:
            self.log.warn(f"VM {vmid}: handling the task log failed: {_describe(exc)}")
        if aborted is not None:
            raise aborted
        if res.ok:
            try:
                res.size = int(self.provider.backup_get_task_size(vmid))
            except Exception as exc:
                self.log.warn(f"VM {vmid}: backup_get_task_size failed: {_describe(exc)}")
        return res

    def _backup(self, vmid: int, vmtype: GuestType, res: GuestResult) -> None:
        provider = self.provider
        provider.backup_start(vmid, vmtype)
        config = self.root.load_guest(vmid, vmtype)
        mechanism, bitmap_id = _mechanism(provider.backup_get_mechanism(vmid, vmtype), vmtype)
        if mechanism != _EXPECTED[vmtype]:
            raise UnsupportedError(
                f"provider chose mechanism '{mechanism}' for a {vmtype} guest; "
                f"only '{_EXPECTED[vmtype]}' is possible"
            )
        volname = provider.backup_get_target(vmid, vmtype)
        res.target = f"{self.storeid}:{volname}"
        self.log.info(f"Backup target: {res.target}")
        with ExitStack() as stack:
            # Observed: a killed run's workdir is in the guest's run state.
            workdir = private_dir(f"pvebackup-{vmid}-")
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
            conf_copy = workdir / ("qemu-server.conf" if vmtype == GuestType.QEMU else "pct.conf")
            conf_copy.write_text(config.render(), encoding="utf-8")
            provider.backup_guest_config(vmid, str(conf_copy))
            fw = self.root.firewall_path(vmid)
            if fw.exists():
                fw_copy = workdir / "fw.conf"
                shutil.copyfile(fw, fw_copy)
                provider.backup_firewall_config(vmid, str(fw_copy))
            if isinstance(config, VmConfig):
                self._backup_vm(vmid, config, workdir, bitmap_id)
            elif isinstance(config, CtConfig):
                self._backup_ct(vmid, config, workdir)
            else:  # pragma: no cover - parse_guest_config returns one of the two
                raise GuestConfigError(f"unexpected config {config!r}")

    def _end(self, vmid: int) -> None:
        self.provider.backup_end(vmid)
        # From here on the backup is the provider's committed one: a signal or a
        # teardown failure must not call backup_abort (see backup_guest).
        self.ended = True

    def _volume(self, config: GuestConfig, volid: str, *, activate: bool = True) -> GuestVolume:
        try:
            if not activate:
                return guest_volume(self.cfg, volid)
            storeid, volname = parse_volume_id(volid)
            scfg, plugin = guest_volume_storage(self.cfg, storeid)
            if plugin.activate_volume(scfg, storeid, volname):
                self.activated.append((volid, plugin, scfg))
            return plugin.guest_volume(scfg, storeid, volname)
        except PveBackupError as exc:
            raise GuestConfigError(f"volume {volid}: {exc}", path=config.where) from exc

    def _deactivate(self, vmid: int) -> None:
        """Deactivate what this guest's backup activated (PVE deactivates a stopped
        guest's volumes when its backup ends), unless a running guest uses it now.
        Volumes that were active before are never in the list."""
        activated, self.activated = self.activated, []
        if not activated:
            return
        if self.root.vm_pid(vmid) is not None:
            self.log.info(f"VM {vmid} runs now: its volumes stay active")
            return
        try:
            in_use = self._volumes_of_running_guests()
        except PveBackupError as exc:
            # Cannot prove that no running guest uses them: leave them active.
            self.log.warn(f"volumes left active: cannot read a running guest's config: {exc}")
            return
        for volid, plugin, scfg in activated:
            if volid in in_use:
                self.log.info(f"volume {volid} stays active: a running guest uses it")
                continue
            storeid, volname = parse_volume_id(volid)
            try:
                plugin.deactivate_volume(scfg, storeid, volname)
            except (PveBackupError, OSError) as exc:
                self.log.warn(f"cannot deactivate volume {volid}: {_describe(exc)}")
                continue
            self.log.info(f"deactivated volume {volid} (activated for this backup)")

    def _volumes_of_running_guests(self) -> set[str]:
        used: set[str] = set()
        for vmid, vmtype in self.root.list_guests():
            if not self.root.is_running(vmid):
                continue
            config = self.root.load_guest(vmid, vmtype)
            if isinstance(config, VmConfig | CtConfig):
                used.update(config.volume_ids())
        return used

    def _ct_volume_path(self, config: GuestConfig, volid: str) -> Path:
        volume = self._volume(config, volid, activate=False)  # directories need none
        if volume.format != "subvol":
            # A container volume on a block storage (lvm, lvmthin, rbd, a zvol) is a
            # raw device with a file system inside: it would have to be mounted in
            # the host kernel, which pvebackup does not do for containers (yet).
            raise UnsupportedError(
                f"container volume {volid} is a {volume.format} block device ({volume.path});"
                " pvebackup backs up container volumes that are directories only (dir, nfs,"
                " cifs, btrfs, zfspool subvols): not mounting its file system"
            )
        return Path(volume.path)

    def _backup_vm(
        self, vmid: int, config: VmConfig, workdir: Path, bitmap_id: str | None
    ) -> None:
        self.activated = []
        try:
            self._backup_vm_disks(vmid, config, workdir, bitmap_id)
        finally:
            self._deactivate(vmid)

    def _backup_vm_disks(
        self, vmid: int, config: VmConfig, workdir: Path, bitmap_id: str | None
    ) -> None:
        specs: list[DiskSpec] = []
        for disk in config.disks:
            if not disk.included:
                self.log.info(f"exclude disk '{disk.key}' '{disk.spec.volume}' ({disk.reason})")
                continue
            volid = disk.spec.volid
            if volid is None:
                # A passthrough device or an image path: PVE backs it up as is.
                path, fmt = _plain_disk(disk.spec.volume, disk.spec.option("format"), config)
                volid = disk.spec.volume
            else:
                volume = self._volume(config, volid)
                if volume.format not in ("qcow2", "raw"):
                    raise GuestConfigError(
                        f"volume {volid}: unsupported image format (qcow2 or raw)",
                        path=config.where,
                    )
                self.log.info(f"include disk '{disk.key}' '{volid}' ({volume.format})")
                specs.append(
                    DiskSpec(disk.devicename, Path(volume.path), volume.format, volume)
                )
                continue
            self.log.info(f"include disk '{disk.key}' '{volid}' ({fmt})")
            specs.append(DiskSpec(disk.devicename, path, fmt))
        if not specs:
            self.log.warn("VM has no disks to back up; backing up its configuration only")
            self._end(vmid)
            return
        vm = find_running(self.root, vmid)
        if vm is None:
            self.log.info("VM is not running: backing up its disk images offline")
            self._export_and_send(vmid, BackupExport(
                specs, storeid=self.storeid, bitmap_id=bitmap_id, log=self.log, workdir=workdir,
            ))  # fmt: skip
            return
        mode = self.live.mode
        self.log.info(f"VM is running (PID {vm.pid}): backup mode {mode}")
        if mode == "stop":
            self._stop_vm(vm)
            try:
                self._export_and_send(vmid, BackupExport(
                    specs, storeid=self.storeid, bitmap_id=bitmap_id, log=self.log,
                    workdir=workdir,
                ))  # fmt: skip
            finally:
                self._start_vm(vmid)
            return
        agent = vm.qga_path if _agent_enabled(config) else None
        run = self.runs.get(vmid)
        fleecing = None
        if self.live.fleecing is not None:
            fstoreid, fscfg, fplugin = self.live.fleecing
            fleecing = FleecingVolumes(
                fstoreid, fscfg, fplugin, vmid, self.log,
                record=run.add_volume if run is not None else None,
            )  # fmt: skip
        self._export_and_send(vmid, LiveBackupExport(
            specs, vm, storeid=self.storeid, bitmap_id=bitmap_id, log=self.log,
            workdir=workdir, fleecing=fleecing, mode=mode, agent=agent,
            record=run.set_live if run is not None else None,
        ))  # fmt: skip

    def _stop_vm(self, vm: RunningVm) -> None:
        """Ask the guest to shut down (ACPI), wait ``stop_wait`` minutes for its QEMU."""
        self.log.info(f"stopping VM {vm.vmid} (system_powerdown)")
        try:
            with QmpClient(str(vm.qmp_path), timeout=30.0) as qmp:
                qmp.execute("system_powerdown")
        except (OSError, QmpError) as exc:
            raise ExternalToolError(f"cannot ask VM {vm.vmid} to shut down: {exc}") from exc
        deadline = time.monotonic() + self.live.stop_wait * 60
        while self.root.vm_pid(vm.vmid) == vm.pid:
            if time.monotonic() > deadline:
                raise ExternalToolError(
                    f"VM {vm.vmid} did not shut down within {self.live.stop_wait:g} min"
                    " (--stop-wait); not backed up, left running"
                )
            time.sleep(0.1)
        self.log.info(f"VM {vm.vmid} stopped")

    def _start_vm(self, vmid: int) -> None:
        argv = [*self.live.start_command, str(vmid)]
        self.log.info(f"starting VM {vmid} again: {' '.join(argv)}")
        try:
            res = proc.run(argv)
        except ExternalToolError as exc:
            raise ExternalToolError(f"cannot start VM {vmid} again: {exc}") from exc
        if res.returncode != 0:
            raise ExternalToolError(
                f"cannot start VM {vmid} again: {argv[0]} exited {res.returncode}: {res.err}"
            )

    def _export_and_send(self, vmid: int, export_cm: BackupExport) -> None:
        crash_point("backup-before-export")
        with export_cm as export:
            crash_point("backup-export-ready")
            for exported in export.disks:
                self.log.info(
                    f"{exported.devicename}: backup via NBD, bitmap mode {exported.bitmap_mode}"
                )
                self.provider.backup_nbd(
                    vmid,
                    exported.devicename,
                    str(export.socket_path),
                    exported.bitmap_mode,
                    exported.bitmap_name,
                    self.bwlimit,
                )
            crash_point("backup-before-end")
            self._end(vmid)
            crash_point("backup-after-end")
            export.commit()

    def _backup_ct(self, vmid: int, config: CtConfig, workdir: Path) -> None:
        rootfs_volid = config.rootfs.spec.volid
        assert rootfs_volid is not None
        rootfs = self._ct_volume_path(config, rootfs_volid)
        mounts: list[tuple[str, Path]] = []
        for mp in config.mountpoints[1:]:
            if not mp.included:
                self.log.info(f"excluding {mp.key} ({mp.ct_path}) from backup ({mp.reason})")
                continue
            volid = mp.spec.volid
            assert volid is not None
            mounts.append((mp.ct_path, self._ct_volume_path(config, volid)))
            self.log.info(f"including {mp.key} ({mp.ct_path}) in backup")
        id_map = config.id_map()
        running = self.root.is_running(vmid)
        view = workdir / "view"  # prepare_backup_directory wants an empty private dir
        view.mkdir(mode=0o700)
        crash_point("backup-before-view")
        with prepare_backup_directory(rootfs, mounts, running=running, workdir=view) as directory:
            crash_point("backup-view-ready")
            self.provider.backup_directory(
                vmid,
                str(directory),
                # The seed's shape: ["u", "0", "100000", "65536"] per entry.
                [e.as_list() for e in id_map],
                list(self.exclude_paths),
                backup_sources(mounts),
                self.bwlimit,
            )
            crash_point("backup-before-end")
            self._end(vmid)
            crash_point("backup-after-end")


def _mechanism(answer: object, vmtype: GuestType) -> tuple[str, str | None]:
    """Check ``backup_get_mechanism``'s answer before unpacking it.

    The seed lets a provider "die or return undef" for a guest type it does not
    support; plain ``None`` (or ``(None, ...)``) is that undef. Anything but a
    2-tuple of strings fails the guest with a message, never a ``TypeError``.
    """
    if answer is None:
        raise UnsupportedError(
            f"provider does not support backing up {vmtype} guests"
            " (backup_get_mechanism returned None)"
        )
    if not isinstance(answer, tuple | list) or len(answer) != 2:
        raise PluginError(
            f"backup_get_mechanism returned {answer!r:.80}, not (mechanism, bitmap_id)"
        )
    mechanism, bitmap_id = answer
    if mechanism is None:
        raise UnsupportedError(f"provider does not support backing up {vmtype} guests")
    if not isinstance(mechanism, str) or not (bitmap_id is None or isinstance(bitmap_id, str)):
        raise PluginError(
            f"backup_get_mechanism returned {answer!r:.80}: mechanism and bitmap id"
            " must be strings (bitmap id may be None)"
        )
    return mechanism, bitmap_id


def _agent_enabled(config: GuestConfig) -> bool:
    # "agent: 1" or "agent: enabled=1,fstrim_cloned_disks=1"
    value = config.get("agent") or "0"
    first = value.split(",")[0]
    return first.removeprefix("enabled=") in ("1", "yes", "on", "true")


def _plain_disk(volume: str, given: str | None, config: GuestConfig) -> tuple[Path, str]:
    # The config is the node's own (/etc/pve, root-written), so its paths are
    # trusted as PVE trusts them; only the format is checked, as QEMU would
    # (PVE's qemu_img_format: the format= option, else the file's extension, else raw).
    if not volume.startswith("/"):
        raise GuestConfigError(
            f"disk {volume!r} is neither a storage volume nor an absolute path",
            path=config.where,
        )
    fmt = given
    if fmt is None:
        suffix = volume.rpartition("/")[2].rpartition(".")[2]
        fmt = suffix if suffix in ("qcow2", "raw") else "raw"
    if fmt not in ("qcow2", "raw"):
        raise GuestConfigError(
            f"disk {volume}: unsupported image format {fmt!r} (qcow2 or raw)", path=config.where
        )
    return Path(volume), fmt


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"
