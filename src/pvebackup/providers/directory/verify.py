"""Verify a ``backup-dir`` storage: every (or one) volume's images, checked.

For each VM disk: the chain is opened and its headers checked exactly as a
restore would (:func:`.images.open_chain`: provider names only, no symlinks, no
foreign backing or data files), the volume's own image is hashed and compared
with the size and SHA-256 recorded in ``index.json`` at backup time, and
``qemu-img check`` (read only) runs on it through the checked descriptor, with no
backing, so each image is checked once however many volumes build on it.

Threat: the storage may have been written by anyone who can reach it; the image
is read through a descriptor opened without following symlinks, and qemu only
ever sees that descriptor (``/proc/<pid>/fd/<n>``), never a name from storage.

Container archives carry no checksum recorded at backup time (yet): their
volumes are reported ``skipped`` rather than claimed ``ok``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pvebackup.api.errors import (
    ExternalToolError,
    IntegrityError,
    UnsafeArchiveError,
    VolumeNotFoundError,
)
from pvebackup.api.types import GuestType
from pvebackup.kit import qemuimg
from pvebackup.providers.directory import images
from pvebackup.providers.directory.volumes import VolumeLayout

__all__ = ["VolumeResult", "verify_volumes"]

_READ = 1 << 20
_DAMAGE = (IntegrityError, UnsafeArchiveError, ExternalToolError)
"""What a damaged or hostile volume raises (``UnsafeArchiveError`` covers the
unsafe image and storage errors); reported per volume, never fatal to the run."""


@dataclass
class VolumeResult:
    """The verdict on one volume: ``ok``, ``failed`` or ``skipped``, with reasons."""

    volname: str
    state: str = "ok"
    errors: list[str] = field(default_factory=list)


def _hash_fd(fd: int) -> tuple[int, str]:
    digest = hashlib.sha256()
    offset = 0
    while data := os.pread(fd, _READ, offset):
        digest.update(data)
        offset += len(data)
    return offset, digest.hexdigest()


def _check_device(layout: VolumeLayout, volname: str, devicename: str) -> list[str]:
    index = layout.read_index(volname)
    device = index.devices[devicename]
    errors: list[str] = []
    with images.open_chain(layout, volname, devicename) as chain:
        top = chain.images[0]
        size, sha = _hash_fd(top.fd)
        if device.image_sha256 is None or device.image_size is None:
            errors.append(f"{top.name}: no checksum recorded at backup time")
        elif (size, sha) != (device.image_size, device.image_sha256):
            errors.append(f"{top.name}: content differs from the checksum recorded at backup time")
        # Only the top image, no backing: each image is checked with its own volume.
        source = "json:" + json.dumps(
            {
                "driver": "qcow2",
                "file": {"driver": "file", "filename": top.proc_path},
                "backing": None,
            }
        )
        result = qemuimg.check(source, fmt="qcow2")
        if result.corruptions:
            errors.append(f"{top.name}: qemu-img check found {result.corruptions} corruptions")
    return errors


def verify_volumes(
    layout: VolumeLayout,
    volnames: Iterable[str] | None = None,
    *,
    now: Callable[[], float] = time.time,
) -> tuple[list[VolumeResult], float, float]:
    """Check ``volnames`` (default: every committed volume); results, start, end."""
    started = now()
    results: list[VolumeResult] = []
    for volname in layout.volnames() if volnames is None else volnames:
        result = VolumeResult(volname)
        try:
            index = layout.read_index(volname)
        except VolumeNotFoundError:
            if volnames is not None:
                raise  # the one asked for does not exist
            continue  # removed while we ran: nothing to verify
        except _DAMAGE as exc:
            index = None
            result.errors.append(str(exc))
        results.append(result)
        if index is not None and index.vmtype != GuestType.QEMU:
            result.state = "skipped"
            result.errors.append("container archives carry no recorded checksum")
            continue
        for devicename in () if index is None else index.devices:
            try:
                result.errors.extend(_check_device(layout, volname, devicename))
            except (VolumeNotFoundError, *_DAMAGE) as exc:  # a base gone, a bad header
                result.errors.append(f"{devicename}: {exc}")
        if result.errors:
            result.state = "failed"
    return results, started, now()
