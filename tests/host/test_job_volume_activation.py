"""Volumes a backup activated are deactivated after it, as Proxmox VE does for a
stopped guest (an LV left active on a shared VG is active on two nodes).

A test storage plays LVM: a volume's device path (a symlink) exists only while it
is active; activation and deactivation are recorded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import pytest
from sample_node import MiB, Node, sh

from pvebackup.api.errors import ExternalToolError
from pvebackup.api.types import GuestType
from pvebackup.host.job import run_backup_job
from pvebackup.storage import GuestVolume, GuestVolumeStorage, registry
from pvebackup.storage.guestvol import next_disk_name
from pvebackup.storage.plugin import COMMON_PROPERTIES, PropertyKind, PropertySpec


class LvLike(GuestVolumeStorage):
    """``<path>/<name>.img`` holds the data; ``<path>/dev/<name>`` exists while active."""

    type = "test-lvlike"
    properties = {**COMMON_PROPERTIES, "path": PropertySpec(PropertyKind.PATH, required=True)}
    image_formats = ("raw",)

    @staticmethod
    def _base(scfg: Mapping[str, str]) -> Path:
        return Path(scfg["path"])

    def _note(self, scfg: Mapping[str, str], *call: str) -> None:
        with open(self._base(scfg) / "calls.jsonl", "a") as f:
            f.write(json.dumps(call) + "\n")

    def guest_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> GuestVolume:
        return GuestVolume(str(self._base(scfg) / "dev" / volname), "raw", "file")

    def activate_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> bool:
        dev = self._base(scfg) / "dev" / volname
        if dev.exists():
            return False
        self._note(scfg, "activate", volname)
        dev.symlink_to(self._base(scfg) / f"{volname}.img")
        return True

    def deactivate_volume(self, scfg: Mapping[str, str], storeid: str, volname: str) -> None:
        self._note(scfg, "deactivate", volname)
        if (self._base(scfg) / "fail").exists():
            raise ExternalToolError("lvchange: Logical volume in use")
        (self._base(scfg) / "dev" / volname).unlink()

    def volume_exists(self, scfg: Mapping[str, str], storeid: str, volname: str) -> bool:
        return (self._base(scfg) / f"{volname}.img").exists()

    def next_volname(self, scfg: Mapping[str, str], storeid: str, vmid: int, fmt: str) -> str:
        return next_disk_name((p.stem for p in self._base(scfg).glob("*.img")), vmid)

    def allocate(
        self, scfg: Mapping[str, str], storeid: str, vmid: int, fmt: str, size: int, volname: str
    ) -> str:
        with open(self._base(scfg) / f"{volname}.img", "wb") as f:
            f.truncate(size)
        return volname

    def free(self, scfg: Mapping[str, str], storeid: str, volname: str) -> None:
        (self._base(scfg) / f"{volname}.img").unlink()


@pytest.fixture
def lv(node: Node, tmp_path: Path) -> Path:
    base = tmp_path / "lv"
    (base / "dev").mkdir(parents=True)
    with open(node.root.storage_cfg, "a") as f:
        f.write(f"\ntest-lvlike: lv\n\tpath {base}\n\tcontent images\n")
    img = base / "vm-100-disk-0.img"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
    sh("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 1M", str(img))
    node.root.config_path(100, GuestType.QEMU).write_text(
        "name: vm\nmemory: 512\nscsi0: lv:vm-100-disk-0,size=4M\n"
    )
    return base


def _calls(base: Path) -> list[list[str]]:
    log = base / "calls.jsonl"
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture(autouse=True)
def _plugin() -> object:
    with registry.registered(LvLike):
        yield


def _log(node: Node) -> str:
    return (node.root.log_dir / "qemu-100.log").read_text()


def test_a_volume_the_backup_activated_is_deactivated_after_it(node: Node, lv: Path) -> None:
    res = run_backup_job(node.root, "rec", [100], terminal=None)
    assert not res.failed, res.guests
    assert _calls(lv) == [["activate", "vm-100-disk-0"], ["deactivate", "vm-100-disk-0"]]
    assert not os.path.lexists(lv / "dev/vm-100-disk-0")
    assert "deactivated volume lv:vm-100-disk-0 (activated for this backup)" in _log(node)


def test_a_volume_active_before_stays_active(node: Node, lv: Path) -> None:
    (lv / "dev/vm-100-disk-0").symlink_to(lv / "vm-100-disk-0.img")
    res = run_backup_job(node.root, "rec", [100], terminal=None)
    assert not res.failed, res.guests
    assert _calls(lv) == []
    assert os.path.lexists(lv / "dev/vm-100-disk-0")


def test_a_volume_a_running_guest_uses_stays_active(node: Node, lv: Path) -> None:
    # Container 300 runs and has the same volume as a mount point.
    node.add_ct(300, mp=False, extra="mp1: lv:vm-100-disk-0,mp=/shared\n")
    node.root.running_marker(300).parent.mkdir(parents=True, exist_ok=True)
    node.root.running_marker(300).write_text("")
    res = run_backup_job(node.root, "rec", [100], terminal=None)
    assert not res.failed, res.guests
    assert _calls(lv) == [["activate", "vm-100-disk-0"]]
    assert "volume lv:vm-100-disk-0 stays active: a running guest uses it" in _log(node)


def test_a_failing_deactivation_is_a_warning_and_the_backup_stands(
    node: Node, lv: Path
) -> None:
    (lv / "fail").write_text("")
    res = run_backup_job(node.root, "rec", [100], terminal=None)
    assert not res.failed, res.guests
    assert "cannot deactivate volume lv:vm-100-disk-0: lvchange: Logical volume in use" in _log(
        node
    )
