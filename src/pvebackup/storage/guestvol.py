"""Guest volumes: the one interface the host uses to reach and allocate them.

Every storage type that holds guest disks or container directories implements
:class:`GuestVolumeStorage` (``dir`` and the dir-like ``nfs``/``cifs``, ``btrfs``,
``lvm``, ``lvmthin``, ``zfspool``, ``rbd``; one small module each). The host never
asks which type it has: it resolves a volume id to a :class:`GuestVolume` (what
QEMU opens, as ``pvesm path`` prints it), activates it, and on restore picks a
format the storage can allocate, asks for the next free name, allocates with the
storage's own tool and frees on failure.

Proxmox VE's names and paths are kept exactly (``PVE::Storage::*Plugin``
``parse_volname``/``path``/``alloc_image``), so that a volume id in a real guest
config resolves as PVE resolves it. Device and mount paths are the host's
(``/dev/VG/LV``, ``/dev/zvol/POOL/NAME``), like ``dir``'s configured ``path``:
the tools that create them (``lvcreate``, ``zfs``, ``rbd``) act on the real
system, so ``--root`` does not relocate them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pvebackup.api.errors import ExternalToolError, UnsupportedError, UsageError
from pvebackup.kit import proc
from pvebackup.storage.plugin import StoragePlugin

__all__ = [
    "GuestVolume",
    "GuestVolumeStorage",
    "SUBVOL",
    "check_vm_name",
    "next_disk_name",
    "run_tool",
]

SUBVOL = "subvol"
"""The format name of a container directory volume (as in Proxmox VE)."""


@dataclass(frozen=True, slots=True)
class GuestVolume:
    """A resolved guest volume.

    :ivar path: what ``pvesm path`` prints: a file, a block device, a directory
        (``subvol``), or an ``rbd:`` name for QEMU's rbd driver.
    :ivar format: ``raw``, ``qcow2`` or ``subvol``.
    :ivar protocol: the QEMU protocol driver that opens ``path``: ``file``,
        ``host_device`` or ``rbd``; ``dir`` for a subvol (no QEMU involved).
    :ivar qemu_options: the protocol node's blockdev options beyond ``driver``
        (``rbd``: pool, image, ...); empty means ``filename: path``.
    """

    path: str
    format: str
    protocol: str = "file"
    qemu_options: Mapping[str, Any] = field(default_factory=dict)

    def file_node(self) -> dict[str, Any]:
        """The blockdev options of the protocol node (``blockdev-add``'s ``file``)."""
        if self.protocol == "dir":
            raise UnsupportedError(f"{self.path} is a directory, not a disk image")
        if self.qemu_options:
            return {"driver": self.protocol, **self.qemu_options}
        return {"driver": self.protocol, "filename": self.path}

    def qemu_name(self) -> str:
        """A name ``qemu-img`` opens the image by (``-f`` gives the format).

        A plain path for files and block devices; otherwise a ``json:`` name
        pinning the protocol driver, so qemu-img never guesses it from the name.
        """
        if self.protocol in ("file", "host_device") and not self.qemu_options:
            return self.path
        return "json:" + json.dumps({"file": self.file_node()}, sort_keys=True)


class GuestVolumeStorage(StoragePlugin):
    """A storage type holding guest volumes the host reads and allocates.

    :cvar image_formats: the disk formats :meth:`allocate` creates; the first is
        what a restore allocates. Empty: no disk images.
    :cvar subvols: :meth:`allocate` creates container directories (``subvol``).
    :cvar zeroed_images: a new image reads as zeroes (files, thin volumes,
        zvols, rbd images; not a thick LV, which holds what the disk held before),
        so a restore may skip writing zero areas.
    """

    image_formats: ClassVar[tuple[str, ...]] = ()
    subvols: ClassVar[bool] = False
    zeroed_images: ClassVar[bool] = True

    def guest_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> GuestVolume:
        """Resolve ``volname`` as Proxmox VE's ``path`` does.

        :raises UsageError: ``volname`` is not a volume name of this type.
        """
        raise NotImplementedError

    def image_path(self, scfg: Mapping[str, str], volname: str) -> Path:
        """The path of :meth:`guest_volume` (``pvesm path``)."""
        return Path(self.guest_volume(scfg, str(scfg.get("type", self.type)), volname).path)

    def activate_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> bool:
        """Make the volume openable (an inactive LV, an unmapped krbd image).

        The default does nothing: files and zvols are always there.

        :returns: True when this call activated it (it was not active before), so
            that the caller may :meth:`deactivate_volume` it when done.
        :raises ExternalToolError: the storage's tool failed.
        """
        return False

    def deactivate_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> None:
        """Undo :meth:`activate_volume` (PVE's ``deactivate_volume``: ``lvchange
        -aln``, ``rbd unmap``). Only for a volume the caller activated itself and
        no running guest uses. The default does nothing.

        :raises ExternalToolError: the storage's tool failed.
        """

    def volume_exists(self, scfg: Mapping[str, str], storeid: str, volname: str) -> bool:
        """Whether the volume exists (for freeing what a killed restore allocated)."""
        raise NotImplementedError

    def next_volname(self, scfg: Mapping[str, str], storeid: str, vmid: int, fmt: str) -> str:
        """The volname :meth:`allocate` would create now for ``fmt``, so that a
        caller can record it before allocating.

        :raises UnsupportedError: this storage cannot allocate ``fmt``.
        """
        raise NotImplementedError

    def allocate(
        self,
        scfg: Mapping[str, str],
        storeid: str,
        vmid: int,
        fmt: str,
        size: int,
        volname: str,
    ) -> str:
        """Create volume ``volname`` (from :meth:`next_volname`) of ``size`` bytes.

        ``fmt`` is one of :attr:`image_formats`, or ``subvol`` (``size`` 0: no
        quota). Returns the volname. Nothing is left behind on failure.

        :raises UnsupportedError: this storage cannot allocate ``fmt``.
        :raises StateError: the volume exists already.
        :raises ExternalToolError: the storage's tool failed.
        """
        raise NotImplementedError

    def free(self, scfg: Mapping[str, str], storeid: str, volname: str) -> None:
        """Remove the volume (an image, a subvol directory with its content).

        :raises VolumeNotFoundError: it does not exist (where the type can tell).
        :raises ExternalToolError: the storage's tool failed.
        """
        raise NotImplementedError

    # helpers for subclasses --------------------------------------------------

    def check_format(self, storeid: str, fmt: str) -> None:
        """:raises UnsupportedError: ``fmt`` cannot be allocated here, saying what can."""
        if fmt == SUBVOL and self.subvols:
            return
        if fmt != SUBVOL and fmt in self.image_formats:
            return
        what = "container directories" if fmt == SUBVOL else f"{fmt} images"
        can = [*self.image_formats, *((SUBVOL,) if self.subvols else ())]
        raise UnsupportedError(
            f"storage '{storeid}' (type {self.type}) cannot hold {what}"
            f" (it allocates: {', '.join(can) or 'nothing'})"
        )


# vm-, base- and subvol- names share one number space per vmid, as in PVE's
# get_next_vm_diskname.
_DISK_NAME = re.compile(r"^(?:vm|base|subvol|basevol)-(\d+)-disk-(\d+)(?:\.|$)")
_MAX_DISKS = 1000


def next_disk_name(existing: Iterable[str], vmid: int, prefix: str = "vm", suffix: str = "") -> str:
    """``<prefix>-<vmid>-disk-<n><suffix>`` with the lowest ``n`` no existing name uses.

    :raises UsageError: bad vmid.
    :raises UnsupportedError: no free number (PVE gives up the same way).
    """
    if vmid <= 0:
        raise UsageError(f"invalid vmid {vmid}")
    used = set()
    for name in existing:
        m = _DISK_NAME.match(name)
        if m and int(m.group(1)) == vmid:
            used.add(int(m.group(2)))
    for n in range(_MAX_DISKS):
        if n not in used:
            return f"{prefix}-{vmid}-disk-{n}{suffix}"
    raise UnsupportedError(f"no free disk name for guest {vmid}")


def run_tool(argv: Sequence[str], what: str, *, timeout: float | None = 600.0) -> str:
    """Run a storage tool through :mod:`pvebackup.kit.proc`; its stdout.

    :raises ExternalToolError: it could not start, timed out or failed (with its
        stderr in the message).
    """
    res = proc.run(argv, timeout=timeout)
    if res.returncode != 0:
        raise ExternalToolError(
            f"{what} failed ({' '.join(argv)}): {res.err or f'exit {res.returncode}'}",
            returncode=res.returncode,
            stderr=res.err,
        )
    return res.out


def check_vm_name(storeid: str, volname: str, vmid: int, prefixes: Sequence[str]) -> None:
    """PVE's ``illegal name 'X' - should be 'vm-VMID-*'``.

    :raises UsageError: ``volname`` does not belong to ``vmid``.
    """
    if not any(volname.startswith(f"{p}-{vmid}-") for p in prefixes):
        raise UsageError(
            f"illegal volume name {volname!r} on '{storeid}': should be "
            + " or ".join(f"'{p}-{vmid}-*'" for p in prefixes)
        )
