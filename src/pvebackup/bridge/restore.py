"""The restore half of the merged API on a seed-API provider (a mixin of
:class:`~pvebackup.bridge.adapter.MergedAdapter`).

qemu-server (``restore_external_archive``) and pve-container
(``LXC/Create.pm``) call these; pve-container passes ``$storeid`` after
``$volname`` to several of them, which the Perl side forwards as ``storeid``.
Every ``*_init`` is remembered per volume until its cleanup, so that an early
end (EOF, ``bye``, a signal) still cleans up what was prepared.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from pvebackup.api.errors import UsageError, VolumeNotFoundError
from pvebackup.api.provider import BackupProvider
from pvebackup.api.types import GuestType, RestoreMechanism
from pvebackup.bridge.params import Params, device_name
from pvebackup.bridge.rawexport import RawExport, needs_export

__all__ = ["OpenRestore", "RestoreSide"]


@dataclass
class OpenRestore:
    """One volume being restored: its mechanism and what is prepared for it."""

    mechanism: RestoreMechanism
    vmtype: GuestType
    devices: set[str] = field(default_factory=set)
    exports: dict[str, RawExport] = field(default_factory=dict)
    container_open: bool = False


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
            return {"tar-path": self.provider.restore_tar_init(volname, self.storeid)}
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
