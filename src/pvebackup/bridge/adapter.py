"""The merged backup provider API (Proxmox VE 8.4+) on top of a seed-API provider.

Each public ``m_<method>`` takes the request's :class:`Params` and returns the
JSON result of the merged method of that name; docs/bridge-protocol.md has the
table of what each one calls on the seed provider and why. Briefly:

- the seed's per-guest order is kept exactly: ``backup_init`` calls
  ``backup_start``, ``backup_get_mechanism`` and ``backup_get_target`` (so a
  provider that decides its volume name from its mechanism answer still can);
- the merged API passes configurations as text, the seed as files: they are
  written to a private directory of this helper and handed over by path;
- bitmaps: the merged API lets Proxmox VE name the bitmap and only asks
  ``new``/``use`` per disk, the seed lets the provider name it (a new id means
  a new bitmap, i.e. a full backup). The adapter keeps, per guest, the seed id
  whose bitmap the last *successful* backup left in qemu (host state, beside the
  providers' own) and answers ``use`` only while the provider still names that
  id: never is a bitmap reused that the provider does not vouch for;
- ``backup_cleanup`` is ``backup_end`` (+ ``backup_get_task_size``) or
  ``backup_abort``; a failing ``backup_end`` is followed by ``backup_abort``, as
  the seed's host does.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pvebackup.api.errors import (
    PveBackupError,
    StateError,
    UnsupportedError,
    UsageError,
)
from pvebackup.api.provider import BackupProvider, no_backup_started
from pvebackup.api.types import (
    BackupMechanism,
    BitmapMode,
    GuestType,
    LogFunction,
)
from pvebackup.bridge.ctconfig import container_id_map, root_host_uid
from pvebackup.bridge.params import Params, bandwidth, device_name
from pvebackup.bridge.restore import OpenRestore, RestoreSide
from pvebackup.kit.fdsource import FdSource
from pvebackup.kit.hoststate import HostState

__all__ = ["MergedAdapter", "VM_MECHANISMS"]

VM_MECHANISMS = ("nbd", "file-handle")
_FILE_HANDLE_BITMAP = "file-handle"
"""Bitmap name given to ``backup_nbd`` for a file handle: the source ignores it."""


@dataclass
class _Guest:
    vmid: int
    vmtype: GuestType
    mechanism: BackupMechanism | None
    bitmap_id: str | None
    archive_name: str = ""
    bitmap_used: bool = False
    configs_done: bool = False
    container: dict[str, Any] | None = None
    refusal: PveBackupError | None = None
    closed: bool = False


class MergedAdapter(RestoreSide):
    """One job's (or one restore's) merged-API view of ``provider``."""

    def __init__(
        self,
        provider: BackupProvider,
        storeid: str,
        log: LogFunction,
        *,
        state: HostState,
        vm_mechanism: str = "nbd",
    ) -> None:
        if vm_mechanism not in VM_MECHANISMS:
            raise UsageError(f"vm-mechanism must be one of {', '.join(VM_MECHANISMS)}")
        self.provider = provider
        self.storeid = storeid
        self.log = log
        self.state = state
        self.vm_mechanism = vm_mechanism
        self.job_open = False
        self.job_error: str | None = None
        self.guests: dict[int, _Guest] = {}
        self.restores: dict[str, OpenRestore] = {}
        self._tmp: Path | None = None

    # -- plumbing --------------------------------------------------------------------

    def methods(self) -> dict[str, Callable[[Params], Any]]:
        """Every merged-API method this adapter serves, by name."""
        return {
            name[2:]: getattr(self, name) for name in dir(self) if name.startswith("m_")
        }

    def tmpdir(self) -> Path:
        """A private directory (0700) for the configuration copies of this helper."""
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="pvebackup-bridge-"))
        return self._tmp

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _write_copy(self, vmid: int, name: str, text: str) -> str:
        directory = self.tmpdir() / str(vmid)
        directory.mkdir(mode=0o700, exist_ok=True)
        path = directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
        return str(path)

    def _guest(self, params: Params) -> _Guest:
        vmid = params.num("vmid")
        guest = self.guests.get(vmid)
        if guest is None or guest.closed:
            raise UsageError(no_backup_started(vmid))
        return guest


    def _bitmap_record(self, vmid: int) -> str | None:
        loaded = self.state.read(f"bitmap-{vmid}")
        if loaded.problem:
            self.log("warn", f"{loaded.problem}; the next backup of {vmid} uses a new bitmap")
        if loaded.doc is None:
            return None
        value = loaded.doc.get("bitmap-id")
        return value if isinstance(value, str) else None

    # -- general and job -------------------------------------------------------------

    def m_provider_name(self, params: Params) -> str:
        return self.provider.provider_name()

    def m_job_init(self, params: Params) -> None:
        start_time = params.num("start_time")
        try:
            self.provider.job_start(start_time)
        except PveBackupError as exc:
            # vzdump calls job_cleanup after a failed job_init: that one aborts.
            self.job_open, self.job_error = True, f"job_init failed: {exc}"
            raise
        self.job_open, self.job_error = True, None

    def m_job_cleanup(self, params: Params) -> None:
        if not self.job_open:
            return  # vzdump may call it twice (after a failing hook script)
        self.job_open = False
        self._close_guests("the job ended before the guest's backup_cleanup")
        if self.job_error is not None:
            self.provider.job_abort(self.job_error)
        else:
            self.provider.job_end()

    # -- one guest -------------------------------------------------------------------

    def m_backup_init(self, params: Params) -> dict[str, str]:
        vmid, vmtype = params.num("vmid"), params.vmtype()
        params.num("start_time", default=0)
        old = self.guests.get(vmid)
        if old is not None and not old.closed:
            self._abort_guest(old, "a new backup_init came before backup_cleanup")
        self.provider.backup_start(vmid, vmtype)
        guest = _Guest(vmid, vmtype, None, None)
        self.guests[vmid] = guest
        try:
            try:
                answer = self.provider.backup_get_mechanism(vmid, vmtype)
            except PveBackupError as exc:
                # The merged API asks in backup_get_mechanism, after backup_init:
                # the refusal is given there (vzdump then fails this guest).
                guest.refusal, answer = exc, None
            if answer is None:
                # No backup_get_target: the seed host never asks after a refusal.
                # vzdump only logs this name before backup_get_mechanism fails.
                guest.archive_name = f"unsupported/{vmtype}-{vmid}"
                return {"archive-name": guest.archive_name}
            mechanism, guest.bitmap_id = answer
            guest.mechanism = BackupMechanism(mechanism)
            guest.archive_name = self.provider.backup_get_target(vmid, vmtype)
        except Exception as exc:
            self._abort_guest(guest, str(exc))
            raise
        return {"archive-name": guest.archive_name}

    def m_backup_get_mechanism(self, params: Params) -> str | None:
        guest = self._guest(params)
        vmtype = params.vmtype()
        if vmtype != guest.vmtype:
            raise UsageError(f"backup_get_mechanism: guest {guest.vmid} is {guest.vmtype}")
        if guest.refusal is not None:
            raise guest.refusal
        if guest.mechanism is None:
            return None  # the seed's undef: "does not support this guest type"
        if guest.mechanism == BackupMechanism.DIRECTORY:
            return "directory"
        if self.vm_mechanism == "file-handle":
            if not hasattr(self.provider, "source_factory"):
                raise UnsupportedError(
                    "the file-handle mechanism needs a provider that reads through"
                    " pvebackup.kit.nbdsource (a source_factory attribute)"
                )
            return "file-handle"
        return "nbd"

    def m_backup_vm_query_incremental(self, params: Params) -> dict[str, str]:
        guest = self._guest(params)
        volumes = params.obj("volumes")
        if guest.bitmap_id is None:
            return {}  # no bitmap: qemu discards an existing one, the backup is full
        use = self._bitmap_record(guest.vmid) == guest.bitmap_id
        return {device_name(params.method, dev): "use" if use else "new" for dev in volumes}

    def m_backup_vm(self, params: Params) -> None:
        guest = self._guest(params)
        if guest.vmtype != GuestType.QEMU or guest.mechanism != BackupMechanism.NBD:
            raise UsageError(f"backup_vm: guest {guest.vmid} is not backed up as a VM")
        volumes = params.obj("volumes")
        info = params.sub("info", params.raw.get("info"))
        limit = bandwidth(info)
        self._configs(guest, params.text("guest_config"), info, "qemu-server")
        for dev in sorted(volumes):
            vol = params.sub("volumes", volumes[dev])
            self._backup_volume(guest, device_name(params.method, dev), vol, limit)

    def _configs(self, guest: _Guest, config: str, info: Params, stem: str) -> None:
        if guest.configs_done:
            return
        self.provider.backup_guest_config(
            guest.vmid, self._write_copy(guest.vmid, f"{stem}.conf", config)
        )
        firewall = info.opt_text("firewall-config")
        if firewall is not None:
            path = self._write_copy(guest.vmid, f"{stem}.fw", firewall)
            self.provider.backup_firewall_config(guest.vmid, path)
        guest.configs_done = True

    def _backup_volume(self, guest: _Guest, dev: str, vol: Params, limit: int | None) -> None:
        mode_text = vol.text("bitmap-mode", optional=True) or "none"
        try:
            mode = BitmapMode(mode_text)
        except ValueError:
            raise UsageError(f"backup_vm: {dev}: invalid bitmap-mode {mode_text!r:.40}") from None
        if mode != BitmapMode.NONE:
            guest.bitmap_used = True
        if vol.has("nbd-path"):
            bitmap = vol.opt_text("bitmap-name")
            if mode != BitmapMode.NONE and bitmap is None:
                raise UsageError(f"backup_vm: {dev}: bitmap-mode {mode} without bitmap-name")
            self.provider.backup_nbd(guest.vmid, dev, vol.text("nbd-path"), mode, bitmap, limit)
            return
        if not vol.has("file-handle-path"):
            raise UsageError(f"backup_vm: {dev}: neither nbd-path nor file-handle-path given")
        self._backup_file_handle(guest, dev, vol, mode, limit)

    def _backup_file_handle(
        self, guest: _Guest, dev: str, vol: Params, mode: BitmapMode, limit: int | None
    ) -> None:
        size = vol.num("size")
        regions = _regions(vol, size, dev) if mode != BitmapMode.NONE else None
        if not hasattr(self.provider, "source_factory"):
            raise UnsupportedError(f"{dev}: this provider cannot read from a file handle")
        path = vol.text("file-handle-path")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
            except OSError as exc:
                raise UsageError(
                    f"backup_vm: {dev}: cannot open {path}: {exc.strerror}"
                ) from exc
        mode_bits = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode_bits) or stat.S_ISBLK(mode_bits)):
            # A fifo or socket would hang or lie about its size: only a disk will do.
            os.close(fd)
            raise UsageError(f"backup_vm: {dev}: {path} is not a file or block device")
        source = FdSource(fd, size, regions)
        previous = getattr(self.provider, "source_factory")  # noqa: B009
        setattr(self.provider, "source_factory", lambda p, n, b: source)  # noqa: B010
        try:
            self.provider.backup_nbd(
                guest.vmid, dev, path, mode,
                _FILE_HANDLE_BITMAP if mode != BitmapMode.NONE else None, limit,
            )
        finally:
            setattr(self.provider, "source_factory", previous)  # noqa: B010
            source.close()
            os.close(fd)

    def m_backup_container_prepare(self, params: Params) -> dict[str, Any] | None:
        guest = self._guest(params)
        if guest.vmtype != GuestType.LXC or guest.mechanism != BackupMechanism.DIRECTORY:
            raise UsageError(f"backup_container_prepare: guest {guest.vmid} is no container")
        guest.container = params.obj("info")
        return None  # the server adds the attach token

    def m_backup_container(self, params: Params) -> None:
        guest = self._guest(params)
        if guest.vmtype != GuestType.LXC or guest.mechanism != BackupMechanism.DIRECTORY:
            raise UsageError(f"backup_container: guest {guest.vmid} is no container")
        config = params.text("guest_config")
        excludes = params.texts("exclude_patterns")
        info = params.sub("info", params.raw.get("info") or guest.container)
        id_map = container_id_map(config, guest.vmid)
        user = info.num("backup-user-id", default=root_host_uid(id_map))
        if user != root_host_uid(id_map):
            raise UsageError(
                f"backup_container: backup-user-id {user} is not the container's root"
                f" ({root_host_uid(id_map)} by its configuration)"
            )
        sources = info.texts("sources") or ["."]
        self._configs(guest, config, info, "pct")
        self.provider.backup_directory(
            guest.vmid,
            info.text("directory"),
            [e.as_list() for e in id_map],
            excludes,
            sources,
            bandwidth(info),
        )

    def m_backup_cleanup(self, params: Params) -> dict[str, Any]:
        vmid = params.num("vmid")
        success = params.flag("success")
        info = params.sub("info", params.raw.get("info"))
        guest = self.guests.get(vmid)
        if guest is None or guest.closed:
            if success:
                raise UsageError(no_backup_started(vmid))
            return {}  # as the seed's backup_abort: nothing started, nothing to undo
        if not success:
            self._abort_guest(guest, info.text("error", optional=True) or "backup failed")
            return {}
        try:
            self.provider.backup_end(vmid)
        except Exception as exc:
            self._abort_guest(guest, f"backup_end failed: {exc}")
            raise
        guest.closed = True
        self._drop_copies(vmid)
        self._remember_bitmap(guest)
        return {"stats": {"archive-size": self.provider.backup_get_task_size(vmid)}}

    def _drop_copies(self, vmid: int) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp / str(vmid), ignore_errors=True)

    def _remember_bitmap(self, guest: _Guest) -> None:
        name = f"bitmap-{guest.vmid}"
        try:
            if guest.bitmap_used and guest.bitmap_id is not None:
                self.state.write(name, {"bitmap-id": guest.bitmap_id})
            else:
                self.state.remove(name)
        except StateError as exc:
            # The backup is committed; only the next one must not trust the bitmap.
            self.log("warn", f"{exc}; the next backup of {guest.vmid} uses a new bitmap")
            try:
                self.state.remove(name)
            except StateError:
                pass

    def _abort_guest(self, guest: _Guest, error: str) -> None:
        guest.closed = True
        self._drop_copies(guest.vmid)
        if guest.bitmap_used:
            # The bitmap qemu keeps after a failure is not one the provider vouches for.
            try:
                self.state.remove(f"bitmap-{guest.vmid}")
            except StateError as exc:
                self.log("warn", str(exc))
        self.provider.backup_abort(guest.vmid, error)

    def _close_guests(self, error: str) -> None:
        for guest in list(self.guests.values()):
            if not guest.closed:
                try:
                    self._abort_guest(guest, error)
                except Exception as exc:  # noqa: BLE001 - keep aborting the others
                    self.log("err", f"backup_abort of {guest.vmid} failed: {exc}")

    def m_backup_handle_log_file(self, params: Params) -> None:
        vmid = params.num("vmid")
        self.provider.backup_handle_log_file(vmid, params.text("filename"))

    def abort_all(self, reason: str) -> bool:
        """Undo whatever is open (EOF on the pipe, ``bye`` too early); True if any was."""
        was_open = self.job_open or any(not g.closed for g in self.guests.values())
        self._close_guests(reason)
        if self.job_open:
            self.job_open = False
            try:
                self.provider.job_abort(reason)
            except Exception as exc:  # noqa: BLE001
                self.log("err", f"job_abort failed: {exc}")
        for volname in list(self.restores):
            was_open = True
            try:
                self._restore_cleanup_all(volname)
            except Exception as exc:  # noqa: BLE001
                self.log("err", f"restore cleanup of {volname} failed: {exc}")
        return was_open

def _regions(vol: Params, size: int, dev: str) -> list[tuple[int, int]]:
    """``dirty-regions`` (what Perl drained from ``next-dirty-region``), checked."""
    raw = vol.raw.get("dirty-regions")
    if raw is None:
        return [(0, size)]
    if not isinstance(raw, list):
        raise UsageError(f"backup_vm: {dev}: dirty-regions must be a list of [offset, length]")
    out: list[tuple[int, int]] = []
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)
        ):
            raise UsageError(f"backup_vm: {dev}: bad dirty region {item!r:.60}")
        offset, length = item
        if offset < 0 or length <= 0 or offset + length > size:
            raise UsageError(f"backup_vm: {dev}: dirty region {item} outside the {size} byte disk")
        out.append((offset, length))
    return out
