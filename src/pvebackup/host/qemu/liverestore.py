"""Live restore: the restored VM runs at once, reading through from the backup.

::

    per disk:  target qcow2 allocated by the restore; its backing file set (header
               only, ``qemu-img rebase -u``) to the provider's NBD URI, format raw
    the node's start command starts the VM (``qm start VMID`` on Proxmox VE)
    per disk:  QMP block-stream on the drive (``drive-scsi0``): copy-on-read from
               the backing NBD node into the target, in the background
    wait:      query-jobs / query-status until every job concluded
    success:   the stream dropped the backing node; the VM keeps running
    failure:   the VM is paused (``stop``) at once, then quit; the caller frees the
               volumes and calls restore_qemu_img_cleanup

Why ``block-stream`` and not ``blockdev-mirror``: the device sits on its final
node (the target image) from the first instruction; the guest's writes land there
and stream never overwrites them (it copies only what the target does not hold
yet); when the job ends QEMU itself removes the backing node and clears the
image's backing file. A mirror would need the VM started on the NBD node (or an
overlay), a second target node, its own copy of every guest write, and a pivot
(``block-job-complete``) at the end: more graph changes, and a window where the
device sits on the backup export itself.

Why the backing file is in the image header: the start command is the node's
(``qm start`` knows nothing of us); any QEMU opening the image follows the chain
with the format we wrote (``raw``, never probed), so no special start arguments
are needed.

QMP is connected per poll, not held: on a Proxmox VE node ``qm`` and pvestatd
talk to the same socket, which serves one client at a time.

A failure of the export is seen by QEMU as EIO: the stream job fails with it and
a guest read of a block not yet copied fails with it too (never with other data:
the NBD client never substitutes data). We then pause the VM and stop it, so the
guest does not continue on a half-restored disk.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pvebackup.api.errors import (
    ExternalToolError,
    PveBackupError,
    UnsupportedError,
)
from pvebackup.host.guests import NodeRoot
from pvebackup.host.qemu.qmp import QmpClient
from pvebackup.kit import proc, qemuimg

__all__ = [
    "DEFAULT_START_COMMAND",
    "START_COMMAND_ENV",
    "LiveDisk",
    "live_restore",
    "qmp_socket",
    "running_vm_pid",
    "set_backing",
    "start_command",
]

DEFAULT_START_COMMAND = "qm start"
"""Proxmox VE's own: starts the VM from its config (the VMID is appended)."""
START_COMMAND_ENV = "PVEBACKUP_START_COMMAND"

_POLL = 0.2
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 10.0
_MAX_PIDFILE = 64
_JOB_PREFIX = "pvebackup-liverestore-"
# What a backing file may be: a NBD URI QEMU parses itself, Unix socket or TCP.
_NBD_URI = re.compile(r"^nbd(\+unix|\+tcp)?://[^\s,]*$")


def _run_dir(root: NodeRoot) -> Path:
    return root.root / "var" / "run" / "qemu-server"


def qmp_socket(root: NodeRoot, vmid: int) -> Path:
    """The VM's QMP socket, where Proxmox VE puts it."""
    return _run_dir(root) / f"{vmid}.qmp"


def running_vm_pid(root: NodeRoot, vmid: int) -> int | None:
    """The PID of VM ``vmid`` if its pid file names a live process, else None.

    Deliberately wider than :meth:`NodeRoot.vm_pid` (which also wants a QEMU): a
    restore refuses to replace the disks of anything the node says runs as that
    VM, and a live restore waits for the start command's process.
    """
    return root.pidfile_pid(vmid)


def start_command(configured: str | None = None) -> list[str]:
    """The node's VM start command as argv, without the VMID.

    ``configured`` (``--start-command``), else ``$PVEBACKUP_START_COMMAND``, else
    ``qm start``. It is split like a shell would (no shell runs it).
    """
    text = configured or os.environ.get(START_COMMAND_ENV) or DEFAULT_START_COMMAND
    argv = shlex.split(text)
    if not argv:
        raise UnsupportedError("the VM start command is empty")
    return argv


def set_backing(target: Path, source: str) -> None:
    """Make ``target`` (a new, empty qcow2) read through from ``source``.

    Only a NBD URI is accepted: it names a server, so QEMU reads exactly what the
    provider serves as raw bytes. A file name would be opened by whatever QEMU
    makes of it (``json:``, a protocol prefix) each time the VM starts.

    :raises UnsupportedError: ``source`` is not a NBD URI (the provider's restore
        export is a file): live restore is not possible from it.
    """
    if not _NBD_URI.match(source):
        raise UnsupportedError(
            f"live restore needs a NBD export, but the provider's restore source is"
            f" {source[:80]!r}; restore without --live"
        )
    # -u: header only (nothing is read); -F raw: the backup is never probed.
    qemuimg.run(
        ["rebase", "-u", "-f", "qcow2", "-b", source, "-F", "raw", str(target)],
        what=f"setting the live restore source of {target}",
    )


@dataclass(frozen=True, slots=True)
class LiveDisk:
    """One disk of a live restore: its drive id and target image."""

    devicename: str  # drive-scsi0: the -drive id Proxmox VE gives it
    path: Path

    @property
    def job_id(self) -> str:
        return _JOB_PREFIX + self.devicename


@dataclass
class _Vm:
    pid: int
    start_time: int
    program: str


def live_restore(
    root: NodeRoot,
    vmid: int,
    disks: Sequence[LiveDisk],
    command: Sequence[str],
    *,
    speed: int = 0,
    log: Callable[[str, str], None],
    interval: float = 5.0,
    observer: proc.ChildObserver | None = None,
) -> None:
    """Start VM ``vmid`` with ``command`` and stream every disk's backup into its target.

    Returns when every disk holds all its data and no longer reads from the
    backup; the VM keeps running. On any failure (the export, QEMU, a signal)
    the VM is paused and stopped before this raises.

    :param speed: bytes/s per disk for the copy (0: unlimited).
    :param observer: told of the VM as a child while it depends on the backup
        (:class:`~pvebackup.host.runstate.GuestRun`: if we are killed, the next
        run kills it), and that it ended when the copy is complete.
    :raises ExternalToolError: the start command failed, or a copy job failed.
    :raises QmpError: QEMU refused a command.
    """
    vm = _start(root, vmid, command)
    info = proc.ChildInfo(vm.pid, vm.start_time, vm.program, None)
    if observer is not None:
        observer.child_started(info)
    try:
        sock = str(qmp_socket(root, vmid))
        with QmpClient(sock) as qmp:
            for disk in disks:
                args: dict[str, Any] = {
                    "job-id": disk.job_id,
                    "device": disk.devicename,
                    "auto-dismiss": False,
                    "on-error": "report",
                }
                if speed:
                    args["speed"] = speed
                qmp.execute("block-stream", **args)
        log("info", f"VM {vmid} runs; copying {len(disks)} disk(s) from the backup")
        _wait(sock, vmid, disks, log, interval)
    except BaseException as exc:
        log("err", f"live restore of VM {vmid} failed, stopping the VM: {exc}")
        _stop(root, vmid, vm, log)
        raise
    finally:
        if observer is not None:
            observer.child_ended(info)


def _start(root: NodeRoot, vmid: int, command: Sequence[str]) -> _Vm:
    argv = [*command, str(vmid)]
    res = proc.run(argv, timeout=_START_TIMEOUT)
    if res.returncode != 0:
        raise ExternalToolError(
            f"starting VM {vmid} ({shlex.join(argv)}) failed: {res.err or res.returncode}"
        )
    deadline = time.monotonic() + _START_TIMEOUT
    while (pid := running_vm_pid(root, vmid)) is None or not qmp_socket(root, vmid).exists():
        if time.monotonic() > deadline:
            raise ExternalToolError(f"VM {vmid} did not come up after {shlex.join(argv)}")
        time.sleep(0.05)
    start_time = proc.process_start_time(pid)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            program = os.path.basename(f.read().split(b"\0", 1)[0].decode(errors="replace"))
    except OSError as exc:
        raise ExternalToolError(f"VM {vmid} (PID {pid}) is gone right after its start") from exc
    if start_time is None:
        raise ExternalToolError(f"VM {vmid} (PID {pid}) is gone right after its start")
    return _Vm(pid, start_time, program)


def _wait(
    sock: str,
    vmid: int,
    disks: Sequence[LiveDisk],
    log: Callable[[str, str], None],
    interval: float,
) -> None:
    pending = {d.job_id: d for d in disks}
    next_report = time.monotonic() + interval
    while pending:
        with QmpClient(sock) as qmp:
            status = qmp.execute("query-status")
            jobs = {j.get("id"): j for j in qmp.execute("query-jobs") or []}
            for job_id, disk in list(pending.items()):
                job = jobs.get(job_id)
                if job is None:
                    raise ExternalToolError(f"{disk.devicename}: the copy job vanished")
                if job.get("status") != "concluded":
                    continue
                qmp.execute("job-dismiss", id=job_id)
                if "error" in job:
                    raise ExternalToolError(
                        f"{disk.devicename}: copying from the backup failed: {job['error']}"
                    )
                del pending[job_id]
                log("info", f"{disk.devicename}: restored; it no longer reads from the backup")
        if pending and status.get("status") not in ("running", "paused", "prelaunch"):
            # io-error (a guest read failed), internal-error, shutdown...: the guest
            # must not go on with a half-restored disk.
            raise ExternalToolError(f"VM {vmid} is {status.get('status')} during the restore")
        if pending and time.monotonic() >= next_report:
            next_report = time.monotonic() + interval
            for job_id, disk in pending.items():
                job = jobs[job_id]
                total = job.get("total-progress") or 0
                done = job.get("current-progress") or 0
                percent = 100.0 * done / total if total else 0.0
                log("info", f"{disk.devicename}: {percent:.0f}% copied")
        if pending:
            time.sleep(_POLL)


def _stop(root: NodeRoot, vmid: int, vm: _Vm, log: Callable[[str, str], None]) -> None:
    """Pause the VM at once (the guest must not run on), then end it; never raises."""
    try:
        with QmpClient(str(qmp_socket(root, vmid)), timeout=_STOP_TIMEOUT) as qmp:
            qmp.execute("stop")
            qmp.execute("quit")
    except (PveBackupError, OSError) as exc:  # QEMU may be gone already
        log("warn", f"VM {vmid}: could not quit it through QMP: {exc}")
    deadline = time.monotonic() + _STOP_TIMEOUT
    while proc.process_start_time(vm.pid) == vm.start_time and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.kill_verified(vm.pid, vm.start_time, vm.program):
        log("warn", f"VM {vmid} (PID {vm.pid}) did not quit; killed")
    else:
        log("info", f"VM {vmid} stopped")
