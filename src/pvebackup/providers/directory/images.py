"""Stored VM images, checked before qemu reads them: the restore side of :mod:`.vm`.

Threat: whoever can write the backup storage (off-site, shared, a NAS) controls
every byte of a volume: the names in ``index.json`` and the qcow2 headers. qemu
follows what a qcow2 header says: a backing file, an external data file, a
``json:`` pseudo-file name (any driver, any host file, an NBD or HTTP server). A
restore that lets it copies host files (``/etc/shadow``, another guest's disk)
into the restored disk, where the guest's owner reads them.

So, before anything of a volume reaches qemu:

1. Names read from storage are single path components (no ``/``, no ``..``, no
   NUL, no leading dot); files are opened relative to the volume's directory fd
   with ``O_NOFOLLOW`` and must be regular files (no symlink, FIFO or device):
   see :mod:`.stored`.
2. The chain is the provider's own: an image's backing file is the previous
   backup's image of the same device, named in ``index.json`` as a volume of the
   same VM that is strictly older (so the walk ends: no cycle), at most
   :data:`MAX_CHAIN_DEPTH` images deep.
3. Each header is read with ``qemu-img info -f qcow2`` (explicit format, never
   probed; ``info`` opens no backing file): qcow2, the virtual size the index
   records, no external data file, and the backing file name exactly the
   relative name the provider writes, with backing format qcow2 (none at the
   bottom). The incompatible-feature bit of a data file is refused before qemu
   parses the header at all.
4. The source handed to the host is a ``json:`` pseudo-file name that spells out
   the whole chain: ``qcow2`` over ``file`` for every image, the file being
   ``/proc/<pid>/fd/<n>``, the descriptor that was checked, and the backing given
   explicitly (``null`` at the bottom). qemu then opens exactly the checked
   inodes and ignores the backing names in the headers, so a file renamed,
   swapped or re-linked after the check cannot redirect the restore.

5. A header rewritten *in place* between the check and qemu's open (which could
   still add a data file) changes the inode's ctime, which no one can set back:
   ``restore_qemu_img_cleanup`` compares every image's inode, size, mtime and
   ctime with what was checked and fails the restore if any changed, so the
   host throws the restored disk away. (A hostile NFS *server* can lie about
   ctime, and attribute caching may hide a change: there only 1-4 hold.)
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from pvebackup.api.errors import (
    ExternalToolError,
    IntegrityError,
    UnsafeArchiveError,
    UnsafeImageError,
    VolumeNotFoundError,
)
from pvebackup.api.types import GuestType
from pvebackup.kit import qemuimg
from pvebackup.providers.directory.stored import VolumeDir, check_stored_name
from pvebackup.providers.directory.volumes import INDEX_NAME, VolumeLayout, VolumeName

__all__ = ["MAX_CHAIN_DEPTH", "CheckedImage", "ImageChain", "image_name", "open_chain"]

MAX_CHAIN_DEPTH = 256
"""Most images in one disk's chain. Bounds the walk and what qemu opens at once; a
backup whose base chain is this long starts a new chain with a full backup."""
INFO_TIMEOUT = 60.0
"""Seconds ``qemu-img info`` may take on one image."""

_QCOW2_MAGIC = b"QFI\xfb"
_QCOW2_HEADER = struct.Struct(">4sI")  # magic, version
_INCOMPAT_OFFSET = 72  # u64 incompatible_features, qcow2 version 3 and later
_INCOMPAT_DATA_FILE = 1 << 2


def image_name(devicename: str) -> str:
    """The file name the provider stores a disk's image under."""
    return f"{devicename}.qcow2"


@dataclass(frozen=True, slots=True)
class CheckedImage:
    """One image of a chain, checked, open read-only."""

    volname: str
    name: str
    """File name inside the volume directory."""
    fd: int
    size: int
    """Virtual size (equal to the index's)."""
    stamp: tuple[int, int, int, int]
    """Inode, size, mtime and ctime (ns) when it was opened, before the checks."""
    pid: int = field(default_factory=os.getpid)

    @property
    def proc_path(self) -> str:
        """A path that reopens exactly this inode, for child processes of ours."""
        return f"/proc/{self.pid}/fd/{self.fd}"


class ImageChain:
    """The checked images of one disk, top first; keeps them open until closed."""

    def __init__(self, devicename: str, images: list[CheckedImage]) -> None:
        self.devicename = devicename
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def source(self) -> str:
        """A ``json:`` file name for ``qemu-img convert -f qcow2`` that pins the chain.

        Every node names its driver and its file (the checked descriptor); the
        ``backing`` of each node is given, ``null`` at the bottom, so qemu never
        looks at a backing file name in a header.
        """
        node: dict[str, Any] | None = None
        for image in reversed(self.images):
            node = {
                "driver": "qcow2",
                "file": {"driver": "file", "filename": image.proc_path},
                "backing": node,
            }
        return "json:" + json.dumps(node, separators=(",", ":"))

    def check_unchanged(self) -> None:
        """Raise :class:`UnsafeImageError` if an image was written since it was checked."""
        for image in self.images:
            if _stamp(image.fd) != image.stamp:
                raise UnsafeImageError(
                    f"backup volume {image.volname!r}: {image.name} was written, replaced "
                    "or removed while it was being restored; the restored disk cannot "
                    "be trusted"
                )

    def close(self) -> None:
        """Close every image; idempotent."""
        images, self.images = self.images, []
        for image in images:
            os.close(image.fd)

    def __enter__(self) -> ImageChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_chain(layout: VolumeLayout, volname: str, devicename: str) -> ImageChain:
    """Check and open the image chain of disk ``devicename`` of backup ``volname``.

    :raises VolumeNotFoundError: the volume, or a volume the chain needs, is gone.
    :raises UnsafeArchiveError: a stored name leaves the volume, or a file is a
        symlink, FIFO, device or directory.
    :raises UnsafeImageError: a header names a backing file other than the
        provider's own chain, or a data file; the chain is not strictly older
        backups of the same VM, or is longer than :data:`MAX_CHAIN_DEPTH`.
    :raises IntegrityError: an image is missing, is not qcow2, or its virtual size
        is not the index's.
    """
    images: list[CheckedImage] = []
    current: str | None = volname
    try:
        while current is not None:
            if len(images) == MAX_CHAIN_DEPTH:
                raise UnsafeImageError(
                    f"backup volume {volname!r}: the image chain of {devicename} is longer "
                    f"than {MAX_CHAIN_DEPTH} images"
                )
            try:
                image, current = _open_level(layout, current, devicename)
            except VolumeNotFoundError as exc:
                if current == volname:
                    raise
                raise VolumeNotFoundError(
                    f"backup volume {volname!r} is incomplete: it depends on "
                    f"{current!r}, which does not exist"
                ) from exc
            images.append(image)
    except BaseException:
        ImageChain(devicename, images).close()
        raise
    return ImageChain(devicename, images)


def _open_level(
    layout: VolumeLayout, volname: str, devicename: str
) -> tuple[CheckedImage, str | None]:
    """One image of the chain and the volume name of its base (None at the bottom)."""
    with VolumeDir(layout, volname) as volume:
        index = volume.read_index()
        device = index.devices.get(devicename)
        if device is None:
            raise IntegrityError(
                f"backup volume {volname!r} has no disk {devicename!r} "
                f"(it has: {', '.join(sorted(index.devices)) or 'none'})"
            )
        filename = check_stored_name(device.file, f"image of {devicename}", volname)
        if filename != image_name(devicename):
            raise UnsafeArchiveError(
                f"backup volume {volname!r}: image {filename!r} of {devicename} is not "
                f"the provider's name {image_name(devicename)!r}"
            )
        base = _base_of(volname, VolumeName.parse(volname), devicename, device.backing)
        fd = volume.open_regular(filename, "image")
    if fd is None:
        raise IntegrityError(f"backup volume {volname!r} lacks its image {filename}")
    try:
        image = CheckedImage(volname, filename, fd, device.size, _stamp(fd))
        expected = None
        if base is not None:
            # The relative name vm.create_image writes: the base's image, one level up.
            expected = f"../{VolumeName.parse(base).dirname}/{image_name(devicename)}"
        _check_header(image, expected)
    except BaseException:
        os.close(fd)
        raise
    return image, base


def _stamp(fd: int) -> tuple[int, int, int, int]:
    st = os.fstat(fd)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _base_of(volname: str, name: VolumeName, devicename: str, backing: object) -> str | None:
    """The base volume the index names, if it can be the provider's own base."""
    if backing is None:
        return None
    try:
        if not isinstance(backing, str):
            raise VolumeNotFoundError("not a string")
        base = VolumeName.parse(backing)
    except VolumeNotFoundError as exc:
        raise UnsafeImageError(
            f"backup volume {volname!r}: {devicename} names {backing!r} as its base, "
            "which is not a backup-dir volume name"
        ) from exc
    # Strictly older: every step goes back in time, so the walk ends (no cycle).
    if base.vmtype is not GuestType.QEMU or base.vmid != name.vmid or base.ctime >= name.ctime:
        raise UnsafeImageError(
            f"backup volume {volname!r}: {devicename} names {backing!r} as its base, "
            f"which is not an older backup of VM {name.vmid}"
        )
    return str(base)


def _check_header(image: CheckedImage, expected_backing: str | None) -> None:
    """Refuse an image whose header makes qemu read anything but the given chain."""
    where = f"backup volume {image.volname!r}: {image.name}"
    head = os.pread(image.fd, _INCOMPAT_OFFSET + 8, 0)
    if len(head) < _QCOW2_HEADER.size or _QCOW2_HEADER.unpack_from(head)[0] != _QCOW2_MAGIC:
        raise IntegrityError(f"{where} is not a qcow2 image")
    version = _QCOW2_HEADER.unpack_from(head)[1]
    if version >= 3 and len(head) == _INCOMPAT_OFFSET + 8:
        (incompat,) = struct.unpack_from(">Q", head, _INCOMPAT_OFFSET)
        if incompat & _INCOMPAT_DATA_FILE:
            # Refused before qemu parses it: older qemu-img opened the data file
            # even for `info` (CVE-2024-4467).
            raise UnsafeImageError(f"{where} has an external data file")
    info = _qemu_img_info(image.proc_path, where)
    specific = info.get("format-specific")
    specific = specific.get("data") if isinstance(specific, dict) else None
    if info.get("format") != "qcow2" or not isinstance(specific, dict):
        raise IntegrityError(f"{where} is not a qcow2 image")
    if "data-file" in specific or specific.get("data-file-raw"):
        raise UnsafeImageError(
            f"{where} has an external data file {specific.get('data-file')!r}"
        )
    if specific.get("corrupt"):
        raise IntegrityError(f"{where} is marked corrupt")
    if info.get("virtual-size") != image.size:
        raise IntegrityError(
            f"{where} has a virtual size of {info.get('virtual-size')} bytes, "
            f"its {INDEX_NAME} says {image.size}"
        )
    backing = info.get("backing-filename")
    backing_format = info.get("backing-filename-format")
    if expected_backing is None and backing is not None:
        raise UnsafeImageError(
            f"{where} names a backing file {backing!r}, but its {INDEX_NAME} names no base"
        )
    if expected_backing is not None and (
        backing != expected_backing or backing_format != "qcow2"
    ):
        raise UnsafeImageError(
            f"{where} names backing file {backing!r} (format {backing_format!r}); only "
            f"the provider's own {expected_backing!r} (qcow2) is allowed"
        )


def _qemu_img_info(path: str, where: str) -> dict[str, Any]:
    """``qemu-img info`` of a qcow2 image, format given, nothing probed."""
    try:
        return qemuimg.info_json(path, fmt="qcow2", timeout=INFO_TIMEOUT)
    except ExternalToolError as exc:
        if exc.returncode is None:
            raise ExternalToolError(f"qemu-img info of {where} failed: {exc}") from exc
        # qemu-img ran; the header it read is what it refused.
        message = exc.stderr.replace(path, "image")
        raise IntegrityError(f"{where} is not a usable qcow2 image: {message}") from exc

