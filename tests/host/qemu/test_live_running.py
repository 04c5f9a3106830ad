"""Finding a running VM's disks: layouts that are not Proxmox VE's fail clearly.

A stub QMP client answers with canned (and hostile) query results; the real QEMU
cases are in tests/host/test_job_live.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from pvebackup.api.errors import ExternalToolError, QmpError
from pvebackup.host.qemu.running import check_features, resolve_disk
from pvebackup.storage.guestvol import GuestVolume


class Stub:
    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers

    def execute(self, cmd: str, /, **args: Any) -> Any:
        value = self.answers[cmd]
        if isinstance(value, Exception):
            raise value
        return value


def answers(img: Path, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "query-block": [{"device": "drive-scsi0", "inserted": {"node-name": "n1"}}],
        "query-named-block-nodes": [
            {"node-name": "n1", "drv": "qcow2", "file": str(img),
             "image": {"virtual-size": 1048576},
             "dirty-bitmaps": [
                 {"name": "pvebackup-st-inc", "persistent": True, "recording": True},
                 {"name": "bad", "persistent": True, "recording": False, "inconsistent": True},
                 {"name": "transient", "persistent": False, "recording": True},
             ]},
        ],  # fmt: skip
        "qom-get": "drive-scsi0",
    }
    base.update(over)
    return base


def test_pve_layout_resolves_with_bitmaps_as_qemu_img_shows_them(tmp_path: Path) -> None:
    img = tmp_path / "vm-100-disk-0.qcow2"
    disk = resolve_disk(Stub(answers(img)), "drive-scsi0", img)  # type: ignore[arg-type]
    assert (disk.node, disk.qom_path, disk.info.virtual_size) == (
        "n1", "/machine/peripheral/scsi0", 1048576,
    )  # fmt: skip
    flags = {b.name: b.flags for b in disk.info.bitmaps}
    assert flags == {"pvebackup-st-inc": {"auto"}, "bad": {"in-use"}}  # transient: not ours


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"query-block": []}, "no drive of that name"),
        ({"query-block": [{"device": "drive-scsi0"}]}, "no medium"),
        ({"query-named-block-nodes": [
            {"node-name": "n1", "drv": "blkdebug", "file": "x"}]}, "driver 'blkdebug'"),
        ({"query-named-block-nodes": [
            {"node-name": "n1", "drv": "copy-before-write", "file": "x"}]}, "unsupported block"),
        ({"query-named-block-nodes": [
            {"node-name": "n1", "drv": "qcow2", "file": "/other.qcow2"}]}, "the config says"),
        ({"qom-get": QmpError("no such device")}, "no device 'scsi0'"),
        ({"qom-get": "drive-scsi1"}, "uses 'drive-scsi1'"),
        ({"query-block": "garbage", "query-named-block-nodes": 7}, "no drive of that name"),
    ],
    ids=["missing", "no-medium", "blkdebug", "leftover-filter", "other-file", "no-device",
         "other-drive", "garbage"],
)  # fmt: skip
def test_other_layouts_fail_that_guest_clearly(
    tmp_path: Path, over: dict[str, Any], message: str
) -> None:
    img = tmp_path / "vm-100-disk-0.qcow2"
    with pytest.raises(ExternalToolError, match="drive-scsi0") as err:
        resolve_disk(Stub(answers(img, **over)), "drive-scsi0", img)  # type: ignore[arg-type]
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("version", "missing"),
    [((6, 0), "copy-before-write and snapshot-access"), ((7, 0), "lacks snapshot-access")],
)
def test_old_qemu_is_refused_naming_what_is_missing(
    version: tuple[int, int], missing: str
) -> None:
    stub = Stub({"query-version": {"qemu": {"major": version[0], "minor": version[1]}}})
    with pytest.raises(ExternalToolError, match=missing):
        check_features(stub)  # type: ignore[arg-type]
    check_features(Stub({"query-version": {"qemu": {"major": 7, "minor": 2}}}))  # type: ignore[arg-type]
    with pytest.raises(ExternalToolError, match="oddly"):
        check_features(Stub({"query-version": {"qemu": "x"}}))  # type: ignore[arg-type]


# -- matching by drive and by what the volume is, not by its spelling ----------------

RBD_VOLUME = GuestVolume(
    "rbd:tank/vm-100-disk-0:conf=/etc/pve/ceph.conf",
    "raw",
    "rbd",
    {"pool": "tank", "image": "vm-100-disk-0", "user": "admin", "conf": "/etc/pve/ceph.conf"},
)


def rbd_answers(opened: str, *, blockdev: bool = False) -> dict[str, Any]:
    """query-block / query-named-block-nodes as QEMU 7.2 and 9.x answer for a raw
    disk on its rbd driver (the format node reports its child's name)."""
    block: dict[str, Any] = {"device": "drive-scsi0", "qdev": "scsi0",
                             "inserted": {"node-name": "n1"}}  # fmt: skip
    if blockdev:  # -blockdev: anonymous block backend, found by its device
        block = {"device": "", "qdev": "scsi0", "inserted": {"node-name": "n1"}}
    return {
        "query-block": [
            {"device": "", "qdev": "/machine/peripheral/virtio1/virtio-backend",
             "inserted": {"node-name": "other"}},
            block,
        ],
        "query-named-block-nodes": [
            {"node-name": "n1", "drv": "raw", "file": opened,
             "image": {"virtual-size": 4 * 1048576, "filename": opened, "format": "raw"}},
            {"node-name": "n0", "drv": "rbd", "file": opened,
             "image": {"virtual-size": 4 * 1048576, "filename": opened, "format": "rbd"}},
        ],
        "qom-get": "n1" if blockdev else "drive-scsi0",
    }  # fmt: skip


_JSON_RBD = (
    'json:{"driver": "raw", "file": {"pool": "tank", "image": "vm-100-disk-0",'
    ' "driver": "rbd", "user": "admin", "conf": "/etc/pve/ceph.conf"}}'
)


@pytest.mark.parametrize(
    ("opened", "blockdev"),
    [
        (_JSON_RBD, False),
        (_JSON_RBD, True),
        ("rbd:tank/vm-100-disk-0:conf=/etc/pve/ceph.conf:id=admin", False),
        ("rbd:tank/vm-100-disk-0", False),
        ('json:{"driver": "rbd", "pool": "tank", "image": "vm-100-disk-0"}', True),
    ],
    ids=["json-drive", "json-blockdev", "legacy-opts", "legacy-bare", "json-protocol-only"],
)
def test_rbd_disk_is_matched_by_pool_and_image(opened: str, blockdev: bool) -> None:
    # Before: compared as file paths, no rbd disk of a running VM ever matched.
    stub = Stub(rbd_answers(opened, blockdev=blockdev))
    disk = resolve_disk(stub, "drive-scsi0", Path(RBD_VOLUME.path), RBD_VOLUME)  # type: ignore[arg-type]
    assert (disk.node, disk.qom_path, disk.info.virtual_size) == (
        "n1", "/machine/peripheral/scsi0", 4 * 1048576,
    )  # fmt: skip


@pytest.mark.parametrize(
    "opened",
    [
        _JSON_RBD.replace("vm-100-disk-0", "vm-100-disk-1"),
        _JSON_RBD.replace('"tank"', '"other"'),
        _JSON_RBD.replace('"driver": "rbd",', '"driver": "rbd", "namespace": "ns",'),
        _JSON_RBD.replace('"driver": "rbd",', '"driver": "rbd", "snapshot": "snap1",'),
        "rbd:tank/vm-100-disk-0@snap1:conf=/etc/pve/ceph.conf",
        "rbd:tank/ns/vm-100-disk-0",
        "rbd:tank/vm-100-disk-0/../x",
        "/dev/rbd0",
        "json:{not json",
        'json:["driver", "rbd"]',
    ],
    ids=["other-image", "other-pool", "namespace", "json-snapshot", "legacy-snapshot",
         "legacy-namespace", "dotdot", "krbd-path", "broken-json", "json-list"],
)  # fmt: skip
def test_another_rbd_image_is_refused(opened: str) -> None:
    stub = Stub(rbd_answers(opened))
    with pytest.raises(ExternalToolError, match="the config says rbd:tank/vm-100-disk-0"):
        resolve_disk(stub, "drive-scsi0", Path(RBD_VOLUME.path), RBD_VOLUME)  # type: ignore[arg-type]


def test_rbd_namespace_and_escaped_legacy_options() -> None:
    vol = GuestVolume("rbd:tank/ns/vm-1-disk-0", "raw", "rbd",
                      {"pool": "tank", "namespace": "ns", "image": "vm-1-disk-0"})  # fmt: skip
    for opened in ("rbd:tank/ns/vm-1-disk-0:mon_host=10.0.0.1\\:6789",
                   _JSON_RBD.replace('"driver": "rbd",', '"driver": "rbd", "namespace": "ns",')
                   .replace("vm-100-disk-0", "vm-1-disk-0")):  # fmt: skip
        resolve_disk(Stub(rbd_answers(opened)), "drive-scsi0", Path(vol.path), vol)  # type: ignore[arg-type]


def test_virtio_drive_found_by_its_qdev_under_blockdev(tmp_path: Path) -> None:
    img = tmp_path / "vm-100-disk-0.qcow2"
    img.touch()
    ans = answers(img)
    ans["query-block"] = [
        {"device": "", "qdev": "/machine/peripheral/virtio1/virtio-backend",
         "inserted": {"node-name": "n1"}},
    ]  # fmt: skip
    ans["qom-get"] = "n1"
    disk = resolve_disk(Stub(ans), "drive-virtio1", img)  # type: ignore[arg-type]
    assert disk.qom_path == "/machine/peripheral/virtio1"
    with pytest.raises(ExternalToolError, match=r"no drive of that name \(it has \['virtio1'\]\)"):
        resolve_disk(Stub(ans), "drive-virtio0", img)  # type: ignore[arg-type]


def test_one_file_two_names_matches_and_a_lookalike_does_not(tmp_path: Path) -> None:
    # /dev/VG/LV is a symlink to /dev/dm-N: QEMU may report either name. A hard
    # link is the same inode too; a copy with the same content is not the disk.
    img = tmp_path / "disk.raw"
    img.write_bytes(b"x")
    link = tmp_path / "vg" / "vm-100-disk-0"
    link.parent.mkdir()
    link.symlink_to(img)
    hard = tmp_path / "hard.raw"
    os.link(img, hard)
    copy = tmp_path / "copy.raw"
    copy.write_bytes(b"x")
    for opened, config in ((img, link), (link, img), (hard, img)):
        ans = answers(config)
        ans["query-named-block-nodes"][0]["file"] = str(opened)
        resolve_disk(Stub(ans), "drive-scsi0", config)  # type: ignore[arg-type]
    ans = answers(img)
    ans["query-named-block-nodes"][0]["file"] = str(copy)
    with pytest.raises(ExternalToolError, match="the config says"):
        resolve_disk(Stub(ans), "drive-scsi0", img)  # type: ignore[arg-type]
    # A json: name of a file node (an explicit protocol driver) is read for its file.
    ans["query-named-block-nodes"][0]["file"] = json.dumps(
        {"driver": "qcow2", "file": {"driver": "host_device", "filename": str(link)}}
    ).join(["json:", ""])
    resolve_disk(Stub(ans), "drive-scsi0", img)  # type: ignore[arg-type]


def throttled(img: Path, child_drv: str = "qcow2", edges: Any = None) -> dict[str, Any]:
    """qemu-server 9's layout: throttle drive-scsi0 above format node fscsi0."""
    ans = answers(img)
    image = ans["query-named-block-nodes"][0]
    ans["query-block"] = [{"device": "", "qdev": "scsi0", "inserted": {"node-name": "drive-scsi0"}}]
    ans["query-named-block-nodes"] = [
        {"node-name": "drive-scsi0", "drv": "throttle", "file": "json:{}"},
        {**image, "node-name": "fscsi0", "drv": child_drv},
    ]
    ans["x-debug-query-block-graph"] = {
        "nodes": [
            {"name": "scsi0", "type": "block-backend", "id": 1},
            {"name": "drive-scsi0", "type": "block-driver", "id": 2},
            {"name": "fscsi0", "type": "block-driver", "id": 4},
        ],
        "edges": edges if edges is not None else [
            {"name": "root", "parent": 1, "child": 2},
            {"name": "file", "parent": 2, "child": 4},
        ],
    }  # fmt: skip
    ans["qom-get"] = "drive-scsi0"
    return ans


def test_throttle_filter_of_qemu_server_9_is_looked_through(tmp_path: Path) -> None:
    img = tmp_path / "vm-100-disk-0.qcow2"
    img.touch()
    disk = resolve_disk(Stub(throttled(img)), "drive-scsi0", img)  # type: ignore[arg-type]
    # bitmaps on the image's node; the filter goes above the throttle (the device's)
    assert (disk.node, disk.top) == ("fscsi0", "drive-scsi0")
    assert {b.name for b in disk.info.bitmaps} == {"pvebackup-st-inc", "bad"}


@pytest.mark.parametrize(
    ("ans", "message"),
    [
        ({"child_drv": "copy-before-write"}, "driver 'copy-before-write'"),
        ({"edges": []}, "has 0 file children"),
        ({"edges": "garbage"}, "cannot find what the throttle filter"),
    ],
    ids=["filter-below", "no-child", "garbage"],
)
def test_a_throttle_above_something_else_is_refused(
    tmp_path: Path, ans: dict[str, Any], message: str
) -> None:
    img = tmp_path / "vm-100-disk-0.qcow2"
    img.touch()
    with pytest.raises(ExternalToolError, match=message):
        resolve_disk(Stub(throttled(img, **ans)), "drive-scsi0", img)  # type: ignore[arg-type]
