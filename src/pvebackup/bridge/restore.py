"""The restore half of the merged API on a seed-API provider (a mixin of
:class:`~pvebackup.bridge.adapter.MergedAdapter`).

qemu-server (``restore_external_archive``) and pve-container
(``LXC/Create.pm``) call these; pve-container passes ``$storeid`` after
``$volname`` to several of them, which the Perl side forwards as ``storeid``.
Every ``*_init`` is remembered per volume until its cleanup, so that an early
end (EOF, ``bye``, a signal) still cleans up what was prepared.

``tar-path`` must be a regular file: pve-container's ``restore_external_archive``
dies on anything else (``-f $tar_path``) and, for the untrusted archives of
unprivileged containers, reads it twice (``check_tar_archive`` lists it, then
``restore_tar_archive`` extracts it). A seed-API provider may hand out a FIFO
(backup-store streams the archive through one), so :func:`spool_tar` copies
a FIFO into a private regular file (0600 in a 0700 directory under ``$TMPDIR``,
default ``/var/tmp``), removed at cleanup: the node needs free space there for the
uncompressed archive. The provider's ``restore_tar_cleanup`` runs as soon as the
FIFO is drained, so a feeding error fails ``restore_container_init`` itself.
A helper killed with SIGKILL cannot remove its spool; the directory name carries
the helper's pid, and the next spool removes those of dead helpers.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pvebackup.api.errors import UsageError, VolumeNotFoundError
from pvebackup.api.provider import BackupProvider
from pvebackup.api.types import GuestType, RestoreMechanism
from pvebackup.bridge.params import Params, device_name
from pvebackup.bridge.rawexport import RawExport, needs_export
from pvebackup.kit import safefs
from pvebackup.kit.oserrors import os_error

__all__ = ["OpenRestore", "RestoreSide", "spool_tar", "sweep_stale_spools"]

_SPOOL_BLOCK = 1 << 20
_SPOOL_PREFIX = "pvebackup-ct-restore-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_spools(base: str) -> None:
    """Remove the spool directories of helpers that died without cleaning up.

    Threat: ``base`` may be world-writable (``/var/tmp``): only our own 0700
    directories (owned by us, not links) whose pid is dead are removed, through
    ``safefs.rmtree_at``, which never follows a link or crosses a mount.
    """
    try:
        dir_fd = safefs.open_root(base)
    except OSError:
        return
    with safefs.owned_fd(dir_fd):
        for entry in safefs.listdir_at(dir_fd):
            rest = entry.name.removeprefix(_SPOOL_PREFIX)
            pid_text = rest.split("-", 1)[0]
            if rest == entry.name or not pid_text.isdigit():
                continue
            st = safefs.stat_at(dir_fd, entry.name)
            if (
                st is None
                or not stat.S_ISDIR(st.st_mode)
                or st.st_uid != os.geteuid()
                or st.st_mode & 0o077
                or _pid_alive(int(pid_text))
            ):
                continue
            try:
                safefs.rmtree_at(dir_fd, entry.name, missing_ok=True)
            except OSError:
                continue  # the next spool tries again


def spool_tar(source: str) -> Path:
    """``source`` (a FIFO, or any non-regular file the provider gave) copied into a
    new private regular file; the caller removes its parent directory."""
    base = os.environ.get("TMPDIR") or "/var/tmp"
    sweep_stale_spools(base)
    directory = Path(
        tempfile.mkdtemp(prefix=f"{_SPOOL_PREFIX}{os.getpid()}-", dir=base)
    )
    target = directory / "archive.tar"
    try:
        # O_NOFOLLOW|O_EXCL: a fresh file in our 0700 directory, never someone's link.
        out_fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(out_fd, "wb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out, _SPOOL_BLOCK)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        shutil.rmtree(directory, ignore_errors=True)
        raise os_error(exc, f"cannot copy the container archive {source} to {target}") from exc
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return target


@dataclass
class OpenRestore:
    """One volume being restored: its mechanism and what is prepared for it."""

    mechanism: RestoreMechanism
    vmtype: GuestType
    devices: set[str] = field(default_factory=set)
    exports: dict[str, RawExport] = field(default_factory=dict)
    container_open: bool = False
    spool: Path | None = None
    """The private directory of a spooled ``tar-path`` (see :func:`spool_tar`)."""


class RestoreSide:
    """Restore methods; the adapter supplies ``provider`` and ``storeid``."""

    provider: BackupProvider
    storeid: str
    restores: dict[str, OpenRestore]

    def _check_storeid(self, params: Params) -> None:
        # pve-container passes $storeid as an extra argument to several restore
        # methods; the Perl side forwards it. It must be ours.
        given = params.opt_text("storeid")
        if given is not None and given != self.storeid:
            raise UsageError(
                f"{params.method}: storage {given!r} is not this helper's {self.storeid!r}"
            )

    def _restore(self, params: Params) -> tuple[str, OpenRestore]:
        self._check_storeid(params)
        volname = params.text("volname")
        found = self.restores.get(volname)
        if found is None:
            mechanism, vmtype = self._mechanism(volname)
            found = OpenRestore(mechanism, vmtype)
            self.restores[volname] = found
        return volname, found

    def _mechanism(self, volname: str) -> tuple[RestoreMechanism, GuestType]:
        answer = self.provider.restore_get_mechanism(volname, self.storeid)
        if answer is None:
            raise VolumeNotFoundError(f"no backup {self.storeid}:{volname}")
        mechanism, vmtype = answer
        return RestoreMechanism(mechanism), GuestType(vmtype)

    def m_restore_get_mechanism(self, params: Params) -> list[str]:
        self._check_storeid(params)
        mechanism, vmtype = self._mechanism(params.text("volname"))
        return [str(mechanism), str(vmtype)]

    def m_archive_get_guest_config(self, params: Params) -> str:
        self._check_storeid(params)
        return self.provider.extract_guest_config(params.text("volname"), self.storeid)

    def m_archive_get_firewall_config(self, params: Params) -> str | None:
        self._check_storeid(params)
        return self.provider.extract_firewall_config(params.text("volname"), self.storeid)

    def m_restore_vm_init(self, params: Params) -> dict[str, dict[str, int]]:
        volname, restore = self._restore(params)
        if restore.mechanism != RestoreMechanism.QEMU_IMG:
            raise UsageError(f"restore_vm_init: {volname} is restored with {restore.mechanism}")
        info = self.provider.restore_qemu_get_device_info(volname, self.storeid)
        return {dev: {"size": int(entry["size"])} for dev, entry in info.items()}

    def m_restore_vm_volume_init(self, params: Params) -> dict[str, str]:
        volname, restore = self._restore(params)
        dev = device_name(params.method, params.text("device_name"))
        restore.devices.add(dev)
        path = self.provider.restore_qemu_img_init(volname, self.storeid, dev)
        if needs_export(path):
            # Proxmox VE reads qemu-img-path as raw only (see bridge.rawexport).
            restore.exports[dev] = RawExport(path, dev)
            path = restore.exports[dev].uri
        return {"qemu-img-path": path}

    def m_restore_vm_volume_cleanup(self, params: Params) -> None:
        volname, restore = self._restore(params)
        dev = device_name(params.method, params.text("device_name"))
        restore.devices.discard(dev)
        export = restore.exports.pop(dev, None)
        if export is not None:
            export.stop()  # before the provider removes what it serves
        self.provider.restore_qemu_img_cleanup(volname, self.storeid, dev)

    def m_restore_vm_cleanup(self, params: Params) -> None:
        self._check_storeid(params)
        self._restore_cleanup_all(params.text("volname"))

    def m_restore_container_init(self, params: Params) -> dict[str, str]:
        volname, restore = self._restore(params)
        restore.container_open = True
        if restore.mechanism == RestoreMechanism.TAR:
            path = self.provider.restore_tar_init(volname, self.storeid)
            try:
                mode = os.stat(path).st_mode
            except OSError as exc:
                raise os_error(exc, f"restore_container_init: tar-path {path}") from exc
            if stat.S_ISREG(mode):
                return {"tar-path": path}
            if not stat.S_ISFIFO(mode):  # a device would be read forever
                raise UsageError(f"restore_container_init: tar-path {path} is no file or FIFO")
            if restore.spool is not None:
                shutil.rmtree(restore.spool, ignore_errors=True)
                restore.spool = None
            spooled = spool_tar(path)
            restore.spool = spooled.parent
            # The FIFO is read to its end: the provider's cleanup now reports what
            # went wrong while feeding it (a corrupt chunk: hostile or damaged storage),
            # so a truncated archive fails here, before pve-container's tar reads it.
            restore.container_open = False
            try:
                self.provider.restore_tar_cleanup(volname, self.storeid)
            except BaseException:
                shutil.rmtree(restore.spool, ignore_errors=True)
                restore.spool = None
                raise
            return {"tar-path": str(spooled)}
        if restore.mechanism == RestoreMechanism.DIRECTORY:
            path = self.provider.restore_directory_init(volname, self.storeid)
            return {"archive-directory": path}
        raise UsageError(f"restore_container_init: {volname} is restored with qemu-img")

    def m_restore_container_cleanup(self, params: Params) -> None:
        self._check_storeid(params)
        self._restore_cleanup_all(params.text("volname"))

    def _restore_cleanup_all(self, volname: str) -> None:
        """Every cleanup still due for ``volname``; the first failure is raised
        after all were tried (a cleanup must not leave the others undone)."""
        restore = self.restores.pop(volname, None)
        if restore is None:
            return
        first: Exception | None = None
        for export in restore.exports.values():
            export.stop()
        if restore.spool is not None:
            shutil.rmtree(restore.spool, ignore_errors=True)
            restore.spool = None
        calls: list[Callable[[], None]] = [
            functools.partial(self.provider.restore_qemu_img_cleanup, volname, self.storeid, dev)
            for dev in sorted(restore.devices)
        ]
        if restore.container_open:
            if restore.mechanism == RestoreMechanism.TAR:
                calls.append(lambda: self.provider.restore_tar_cleanup(volname, self.storeid))
            else:
                calls.append(
                    lambda: self.provider.restore_directory_cleanup(volname, self.storeid)
                )
        for call in calls:
            try:
                call()
            except Exception as exc:  # noqa: BLE001
                first = first or exc
        if first is not None:
            raise first
