"""A running VM's QEMU, found as on a Proxmox VE node, and its disks' block nodes.

Proxmox VE starts a VM's QEMU with ``-pidfile /var/run/qemu-server/VMID.pid``, a QMP
monitor on ``VMID.qmp`` and the guest agent's channel on ``VMID.qga`` beside it. Each
disk is ``-drive id=drive-<key>,...`` (or a ``-blockdev`` whose block backend has that
name) used by ``-device ...,drive=drive-<key>,id=<key>``. This module reads those
and resolves each disk to the block node that holds its image, with ``query-block``
and ``query-named-block-nodes``. Any other layout (a throttle or other filter above
the image, an image behind a backing chain we do not know, a device not called as
Proxmox VE calls it) fails that guest with a message saying what was found.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pvebackup.api.errors import ExternalToolError, QmpError
from pvebackup.host.guests import NodeRoot
from pvebackup.kit.qemuimg import BitmapInfo, ImageInfo

from .qmp import QmpClient

__all__ = [
    "MIN_QEMU",
    "LiveDisk",
    "RunningVm",
    "check_features",
    "find_running",
    "resolve_disk",
]

MIN_QEMU = (7, 1)  # snapshot-access came with QEMU 7.1; copy-before-write with 6.2
_IMAGE_DRIVERS = ("qcow2", "raw")


@dataclass(frozen=True)
class RunningVm:
    """Where a running VM's QEMU listens."""

    vmid: int
    pid: int
    qmp_path: Path
    qga_path: Path


def find_running(root: NodeRoot, vmid: int) -> RunningVm | None:
    """The running QEMU of VM ``vmid``, or None when it does not run."""
    pid = root.vm_pid(vmid)
    if pid is None:
        return None
    run = root.qemu_run_dir
    return RunningVm(vmid, pid, run / f"{vmid}.qmp", run / f"{vmid}.qga")


def check_features(qmp: QmpClient) -> None:
    """Fail when this QEMU cannot give a running VM fleecing exports.

    :raises ExternalToolError: naming the version found and what is missing.
    """
    try:
        ver = qmp.execute("query-version")["qemu"]
        found = (int(ver["major"]), int(ver["minor"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ExternalToolError(f"QEMU answered query-version oddly: {exc}") from exc
    if found < MIN_QEMU:
        missing = "snapshot-access" if found >= (6, 2) else "copy-before-write and snapshot-access"
        raise ExternalToolError(
            f"the VM's QEMU {found[0]}.{found[1]} lacks {missing}"
            f" (a live backup needs QEMU {MIN_QEMU[0]}.{MIN_QEMU[1]} or newer);"
            " use --mode stop"
        )


@dataclass(frozen=True)
class LiveDisk:
    """One disk of a running VM: the node holding its image, and its device."""

    devicename: str  # drive-scsi0: the block backend's name
    qom_path: str  # /machine/peripheral/scsi0
    node: str  # the image's node (its driver is qcow2 or raw)
    info: ImageInfo  # size and persistent bitmaps as the running QEMU sees them


def resolve_disk(qmp: QmpClient, devicename: str, path: Path) -> LiveDisk:
    """Find ``devicename`` (``drive-<key>``) in the running VM.

    :param path: the image the config names; the node must have it open.
    :raises ExternalToolError: the layout is not Proxmox VE's (the message says why).
    """
    key = devicename.removeprefix("drive-")
    blocks = {b.get("device"): b for b in _list(qmp.execute("query-block"))}
    block = blocks.get(devicename)
    if block is None:
        raise ExternalToolError(
            f"{devicename}: the running VM has no drive of that name"
            f" (it has {sorted(str(d) for d in blocks if d)})"
        )
    inserted = block.get("inserted")
    if not isinstance(inserted, dict):
        raise ExternalToolError(f"{devicename}: no medium in the running VM's drive")
    node = str(inserted.get("node-name", ""))
    listed = _list(qmp.execute("query-named-block-nodes", flat=True))
    nodes = {n.get("node-name"): n for n in listed}
    top = nodes.get(node)
    if top is None:
        raise ExternalToolError(f"{devicename}: node {node!r} not listed by QEMU")
    drv = str(top.get("drv", ""))
    if drv not in _IMAGE_DRIVERS:
        # A filter (throttle, or a copy-before-write an earlier run left) or an
        # unknown driver: we would insert ours at the wrong place.
        raise ExternalToolError(
            f"{devicename}: unsupported block layout in the running VM: the drive's top"
            f" node {node!r} has driver {drv!r}, expected {' or '.join(_IMAGE_DRIVERS)}"
        )
    if os.path.realpath(str(top.get("file", ""))) != os.path.realpath(path):
        raise ExternalToolError(
            f"{devicename}: the running VM has {top.get('file')!r} open, the config says {path}"
        )
    qom_path = f"/machine/peripheral/{key}"
    try:
        drive = qmp.execute("qom-get", path=qom_path, property="drive")
    except QmpError as exc:
        raise ExternalToolError(
            f"{devicename}: no device {key!r} using it in the running VM: {exc}"
        ) from exc
    if drive not in (devicename, node):
        raise ExternalToolError(
            f"{devicename}: device {key!r} uses {drive!r}, not {devicename!r}"
        )
    bitmaps = tuple(
        BitmapInfo(
            name=str(b["name"]),
            granularity=int(b.get("granularity", 0)),
            # The same flags qemu-img shows: "auto" records, "in-use" is inconsistent.
            flags=frozenset(
                (["auto"] if b.get("recording") else [])
                + (["in-use"] if b.get("inconsistent") else [])
            ),
        )
        for b in _list(top.get("dirty-bitmaps"))
        if b.get("persistent") and "name" in b
    )
    try:
        size = int(top["image"]["virtual-size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ExternalToolError(f"{devicename}: QEMU reports no size: {exc}") from exc
    return LiveDisk(devicename, qom_path, node, ImageInfo(path, drv, size, bitmaps))


def _list(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, dict)]
