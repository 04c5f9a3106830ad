"""A running VM's QEMU, found as on a Proxmox VE node, and its disks' block nodes.

Proxmox VE starts a VM's QEMU with ``-pidfile /var/run/qemu-server/VMID.pid``, a QMP
monitor on ``VMID.qmp`` and the guest agent's channel on ``VMID.qga`` beside it. Each
disk is ``-drive id=drive-<key>,...`` (or a ``-blockdev`` whose block backend has that
name) used by ``-device ...,drive=drive-<key>,id=<key>``. This module reads those
and resolves each disk to the block node that holds its image, with ``query-block``
and ``query-named-block-nodes``. Any other layout (a throttle or other filter above
the image, an image behind a backing chain we do not know, a device not called as
Proxmox VE calls it) fails that guest with a message saying what was found.

A disk is found as qemu-server finds it (``PVE::QemuServer::Blockdev::get_block_info``):
by its drive, the ``query-block`` entry whose ``device`` is ``drive-<key>`` (``-drive``)
or whose ``qdev`` is the device ``<key>`` (``-blockdev``, where ``device`` is empty),
never by a file name. That the node holds the configured volume is then checked
by what the volume *is*, not how it is spelt: a file or device by its inode or
device number (``/dev/VG/LV`` is a symlink to ``/dev/dm-N``, a zvol's path to
``/dev/zdN``; QEMU may have opened either), an rbd image by pool, namespace and
image (QEMU names it ``json:{...}`` or ``rbd:pool/image:conf=...``).
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pvebackup.api.errors import ExternalToolError, QmpError
from pvebackup.host.guests import NodeRoot
from pvebackup.kit.qemuimg import BitmapInfo, ImageInfo
from pvebackup.storage.guestvol import GuestVolume

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
    node: str  # the image's node (its driver is qcow2 or raw): bitmaps live here
    info: ImageInfo  # size and persistent bitmaps as the running QEMU sees them
    top: str = ""  # the device's node: the image's, or a throttle filter above it

    def __post_init__(self) -> None:
        if not self.top:
            object.__setattr__(self, "top", self.node)


def resolve_disk(
    qmp: QmpClient, devicename: str, path: Path, volume: GuestVolume | None = None
) -> LiveDisk:
    """Find ``devicename`` (``drive-<key>``) in the running VM.

    :param path: the image the config names; the node must have it open.
    :param volume: the storage's answer for it (protocol and, for rbd, pool and
        image); None for a plain path (a file or a passthrough device).
    :raises ExternalToolError: the layout is not Proxmox VE's (the message says why).
    """
    key = devicename.removeprefix("drive-")
    listed_blocks = _list(qmp.execute("query-block"))
    block = _find_block(listed_blocks, devicename, key)
    if block is None:
        names = {str(b.get("device") or _qdev_key(str(b.get("qdev", "")))) for b in listed_blocks}
        raise ExternalToolError(
            f"{devicename}: the running VM has no drive of that name"
            f" (it has {sorted(n for n in names if n)})"
        )
    inserted = block.get("inserted")
    if not isinstance(inserted, dict):
        raise ExternalToolError(f"{devicename}: no medium in the running VM's drive")
    top_name = node = str(inserted.get("node-name", ""))
    listed = _list(qmp.execute("query-named-block-nodes", flat=True))
    nodes = {n.get("node-name"): n for n in listed}
    top = nodes.get(node)
    if top is None:
        raise ExternalToolError(f"{devicename}: node {node!r} not listed by QEMU")
    drv = str(top.get("drv", ""))
    if drv == "throttle":
        # qemu-server 9: the device's node is a throttle filter named drive-<key>
        # (its disk limits) above the image's format node.
        node = _filtered_child(qmp, devicename, node)
        top = nodes.get(node)
        if top is None:
            raise ExternalToolError(f"{devicename}: node {node!r} not listed by QEMU")
        drv = str(top.get("drv", ""))
    if drv not in _IMAGE_DRIVERS:
        # A filter (or a copy-before-write an earlier run left) or an unknown
        # driver: we would insert ours at the wrong place.
        raise ExternalToolError(
            f"{devicename}: unsupported block layout in the running VM: the drive's"
            f" node {node!r} has driver {drv!r}, expected {' or '.join(_IMAGE_DRIVERS)}"
            " (optionally below a throttle filter)"
        )
    opened = str(top.get("file", ""))
    if not _same_volume(opened, path, volume):
        raise ExternalToolError(
            f"{devicename}: the running VM has {opened[:200]!r} open, the config says"
            f" {volume.path if volume is not None else path}"
        )
    qom_path = f"/machine/peripheral/{key}"
    try:
        drive = qmp.execute("qom-get", path=qom_path, property="drive")
    except QmpError as exc:
        raise ExternalToolError(
            f"{devicename}: no device {key!r} using it in the running VM: {exc}"
        ) from exc
    if drive not in (devicename, top_name):
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
    return LiveDisk(devicename, qom_path, node, ImageInfo(path, drv, size, bitmaps), top_name)


def _filtered_child(qmp: QmpClient, devicename: str, node: str) -> str:
    """The ``file`` child of filter ``node``. QMP names a node's children only in
    ``x-debug-query-block-graph`` (in QEMU since 4.0, unchanged since)."""
    try:
        graph = qmp.execute("x-debug-query-block-graph")
        ids = {n["id"]: str(n["name"]) for n in graph["nodes"] if n.get("type") == "block-driver"}
        parent = next(i for i, name in ids.items() if name == node)
        children = [
            ids[e["child"]]
            for e in graph["edges"]
            if e.get("parent") == parent and e.get("name") == "file" and e.get("child") in ids
        ]
    except (QmpError, KeyError, TypeError, AttributeError, StopIteration) as exc:
        raise ExternalToolError(
            f"{devicename}: cannot find what the throttle filter {node!r} filters: {exc!r}"
        ) from exc
    if len(children) != 1:
        raise ExternalToolError(
            f"{devicename}: the throttle filter {node!r} has {len(children)} file children"
        )
    return children[0]


def _qdev_key(qdev: str) -> str:
    """The config key of a ``query-block`` ``qdev`` (qemu-server's ``qdev_id_to_drive_id``)."""
    m = re.match(r"^/machine/peripheral/(virtio\d+)/virtio-backend$", qdev)
    if m is not None:
        return m.group(1)
    return qdev.removeprefix("/machine/peripheral/")


def _find_block(blocks: list[dict[str, Any]], devicename: str, key: str) -> dict[str, Any] | None:
    for b in blocks:
        if b.get("device") == devicename:
            return b  # -drive id=drive-<key>: the block backend's name
    for b in blocks:
        if not b.get("device") and _qdev_key(str(b.get("qdev", ""))) == key:
            return b  # -blockdev: an anonymous backend, found by its device
    return None


def _same_volume(opened: str, path: Path, volume: GuestVolume | None) -> bool:
    """Whether the name QEMU reports for a node is the configured volume."""
    if volume is not None and volume.protocol == "rbd":
        want = _rbd_identity(volume.qemu_options)
        return want is not None and want == _rbd_opened(opened)
    if opened.startswith("json:"):
        # QEMU writes json: when options (e.g. an explicit protocol driver) have
        # no plain file name: take the innermost file name it holds.
        found = _json_filename(opened)
        if found is None:
            return False
        opened = found
    return _same_file(opened, str(path))


def _same_file(a: str, b: str) -> bool:
    # /dev/VG/LV and /dev/dm-N, /dev/zvol/P/N and /dev/zdN: one device, two names.
    if not (a.startswith("/") and b.startswith("/")):
        return False
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
    if stat.S_ISBLK(sa.st_mode) and stat.S_ISBLK(sb.st_mode):
        return sa.st_rdev == sb.st_rdev
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _json_filename(name: str) -> str | None:
    try:
        tree = json.loads(name.removeprefix("json:"))
    except ValueError:
        return None
    while isinstance(tree, dict):
        if isinstance(tree.get("filename"), str):
            return str(tree["filename"])
        tree = tree.get("file")
    return None


def _rbd_identity(opts: Any) -> tuple[str, str, str] | None:
    if not isinstance(opts, Mapping):
        return None
    pool, image = opts.get("pool"), opts.get("image")
    if not isinstance(pool, str) or not isinstance(image, str):
        return None
    ns = opts.get("namespace")
    return pool, ns if isinstance(ns, str) else "", image


def _rbd_opened(name: str) -> tuple[str, str, str] | None:
    """(pool, namespace, image) of an rbd node's name as QEMU reports it, else None.

    ``json:{"driver": "raw", "file": {"driver": "rbd", "pool": ..., "image": ...}}``
    (``-blockdev``, or any rbd node QEMU opened from options), or the legacy
    ``rbd:pool[/namespace]/image[@snap][:key=value...]`` (``-drive file=rbd:...``).
    A snapshot is never the running disk.
    """
    if name.startswith("json:"):
        try:
            tree = json.loads(name.removeprefix("json:"))
        except ValueError:
            return None
        while isinstance(tree, dict):
            if tree.get("driver") == "rbd":
                if tree.get("snapshot"):
                    return None
                return _rbd_identity(tree)
            tree = tree.get("file")
        return None
    if not name.startswith("rbd:"):
        return None
    # Up to the first unescaped ':' (options follow); '\:' escapes a colon.
    spec = re.split(r"(?<!\\):", name.removeprefix("rbd:"), maxsplit=1)[0]
    if "@" in spec:
        return None
    parts = spec.split("/")
    if len(parts) == 2:
        return parts[0], "", parts[1]
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return None


def _list(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, dict)]
