"""Where a restore's new volumes go: target storages, allocation, and freeing.

``--map KEY=STORE`` wins, then ``--storage``, then the storage the volume had
(if pvebackup can allocate that content there), else the first storage that can.
Every volume is recorded in the guest's run state *before* it exists, so a
killed restore's volumes are freed by the next run; a failed one frees them here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from pvebackup.api.errors import (
    StorageNotFoundError,
    StorageUnavailableError,
    UnsupportedError,
    UsageError,
)
from pvebackup.host.restoresource import describe
from pvebackup.host.runstate import GuestRun
from pvebackup.host.tasklog import LogRouter
from pvebackup.kit.crashpoint import crash_point
from pvebackup.storage import (
    GuestVolume,
    GuestVolumeStorage,
    StorageConfig,
    guest_volume_storage,
    parse_volume_id,
)

__all__ = ["RestoreTargets", "owned_by"]


class RestoreTargets:
    """The target storages of one restore of ``vmid`` and the volumes it allocated."""

    def __init__(
        self,
        cfg: StorageConfig,
        vmid: int,
        log: LogRouter,
        guest_run: GuestRun,
        target_storage: str | None = None,
        storage_map: dict[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.vmid = vmid
        self.log = log
        self.guest_run = guest_run
        self.target_storage = target_storage
        self.storage_map = dict(storage_map or {})
        self.created: list[str] = []
        if target_storage is not None:
            guest_volume_storage(cfg, target_storage)  # fail early on a bad --storage

    def storage(self, storeid: str) -> tuple[dict[str, str], GuestVolumeStorage]:
        return guest_volume_storage(self.cfg, storeid)

    def check_map(self, keys: Sequence[str]) -> None:
        """Every ``--map`` key names a disk of the backup, and its storage is usable:
        checked before any data moves."""
        unknown = sorted(set(self.storage_map) - set(keys))
        if unknown:
            raise UsageError(
                f"--map {', '.join(unknown)}: not a disk of this backup"
                f" (it has {', '.join(keys) or 'none'})"
            )

    def check_storages(self) -> None:
        for name in self.storage_map:
            self.storage(self.storage_map[name])

    @staticmethod
    def _holds(plugin: GuestVolumeStorage, content: str) -> bool:
        return plugin.subvols if content == "rootdir" else bool(plugin.image_formats)

    def target_for(self, original: str | None, content: str, key: str | None = None) -> str:
        if key is not None and key in self.storage_map:
            return self.storage_map[key]
        if self.target_storage is not None:
            return self.target_storage
        if original is not None:
            try:
                _, plugin = self.storage(original)
            except (StorageNotFoundError, StorageUnavailableError, UnsupportedError):
                pass  # gone, disabled or unreachable since the backup: another one below
            else:
                if self._holds(plugin, content):
                    return original
                self.log.warn(
                    f"storage '{original}' (type {plugin.type}) cannot hold {content}"
                    " volumes for pvebackup; restoring onto another storage"
                )
        candidates: list[str] = []
        for sid in self.cfg:
            if self.cfg.disabled(sid):
                continue
            try:
                scfg, plugin = self.storage(sid)
            except UnsupportedError:
                continue
            if not self._holds(plugin, content):
                continue
            contents = scfg.get("content")
            if contents is None or content in contents.split(","):
                candidates.append(sid)
        if not candidates:
            raise UnsupportedError(
                f"no storage that pvebackup can allocate {content} volumes on;"
                " give one with --storage"
            )
        return candidates[0]

    def alloc(self, target: str, fmt: str, size: int) -> tuple[str, GuestVolume]:
        """Allocate with the storage's own tool; recorded first, freed on failure."""
        scfg, plugin = self.storage(target)
        volname = plugin.next_volname(scfg, target, self.vmid, fmt)
        # Recorded before it exists: if we are killed now, the next run frees it.
        self.guest_run.add_volume(f"{target}:{volname}")
        volname = plugin.allocate(scfg, target, self.vmid, fmt, size, volname)
        volid = f"{target}:{volname}"
        self.created.append(volid)
        crash_point("restore-after-alloc")
        plugin.activate_volume(scfg, target, volname)
        return volid, plugin.guest_volume(scfg, target, volname)

    def alloc_image(
        self, original: str | None, size: int, key: str | None = None, *, live: bool = False
    ) -> tuple[str, GuestVolume, bool]:
        """A new disk image: qcow2 where the storage has files, else its raw volume.

        The flag tells whether the new image reads as zeroes (a thick LV does not).
        """
        target = self.target_for(original, "images", key)
        _, plugin = self.storage(target)
        if live:
            # The read-through target is a qcow2 whose backing file is the backup.
            fmt = "qcow2"
            if fmt not in plugin.image_formats:
                raise UnsupportedError(
                    f"live restore needs a qcow2 image; storage '{target}' (type"
                    f" {plugin.type}) allocates {', '.join(plugin.image_formats)} only:"
                    " restore without --live or onto a dir-like storage"
                )
        else:
            if not plugin.image_formats:
                plugin.check_format(target, "raw")  # raises, saying what it holds
            fmt = plugin.image_formats[0]
        volid, volume = self.alloc(target, fmt, size)
        return volid, volume, plugin.zeroed_images

    def alloc_subvol(self, original: str | None, key: str | None = None) -> tuple[str, Path]:
        target = self.target_for(original, "rootdir", key)
        _, plugin = self.storage(target)
        plugin.check_format(target, "subvol")
        volid, volume = self.alloc(target, "subvol", 0)
        return volid, Path(volume.path)

    def free(self, volid: str) -> None:
        storeid, volname = parse_volume_id(volid)
        scfg, plugin = self.storage(storeid)
        plugin.free(scfg, storeid, volname)

    def free_created(self) -> None:
        for volid in reversed(self.created):
            try:
                self.free(volid)
                self.log.info(f"removed {volid}")
            except Exception as exc:
                self.log.err(f"could not remove {volid}: {describe(exc)}")
        self.created.clear()

    def free_replaced(self, volids: Sequence[str], keep: Sequence[str]) -> list[str]:
        """Free the replaced guest's own volumes (not those in ``keep``); the freed ones."""
        removed: list[str] = []
        for volid in volids:
            if volid in keep:
                continue
            _, volname = volid.split(":", 1)
            if not owned_by(volname, self.vmid):
                continue  # not the guest's own (an ISO, another guest's base image)
            try:
                self.free(volid)
                removed.append(volid)
                self.log.info(f"removed volume {volid} of the replaced guest")
            except Exception as exc:
                self.log.warn(f"could not remove old volume {volid}: {describe(exc)}")
        return removed


def owned_by(volname: str, vmid: int) -> bool:
    """A volume of the guest itself: ``<vmid>/...`` (dir-like) or ``vm-<vmid>-...``
    (an LV, zvol or rbd image); not an ISO or another guest's base image."""
    return volname.startswith(f"{vmid}/") or re.match(
        rf"^(?:vm|subvol)-{vmid}-", volname
    ) is not None
