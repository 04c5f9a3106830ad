"""Finding a running VM's disks: layouts that are not Proxmox VE's fail clearly.

A stub QMP client answers with canned (and hostile) query results; the real QEMU
cases are in tests/host/test_job_live.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pvebackup.api.errors import ExternalToolError, QmpError
from pvebackup.host.qemu.running import check_features, resolve_disk


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
            {"node-name": "n1", "drv": "throttle", "file": "x"}]}, "driver 'throttle'"),
        ({"query-named-block-nodes": [
            {"node-name": "n1", "drv": "copy-before-write", "file": "x"}]}, "unsupported block"),
        ({"query-named-block-nodes": [
            {"node-name": "n1", "drv": "qcow2", "file": "/other.qcow2"}]}, "the config says"),
        ({"qom-get": QmpError("no such device")}, "no device 'scsi0'"),
        ({"qom-get": "drive-scsi1"}, "uses 'drive-scsi1'"),
        ({"query-block": "garbage", "query-named-block-nodes": 7}, "no drive of that name"),
    ],
    ids=["missing", "no-medium", "throttle", "leftover-filter", "other-file", "no-device",
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
