"""Fleecing image names and formats per storage type (qemu-server's rule), with
the storage tools faked on PATH (LVM, ZFS and Ceph are not on this machine)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from pvebackup.api.errors import UnsupportedError
from pvebackup.api.types import LogLevel
from pvebackup.host.qemu.fleecing import FleecingVolumes, fleecing_format
from pvebackup.storage import GuestVolumeStorage, parse_storage_config, registry

FAKE = """#!/bin/sh
python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' "$(basename "$0")" "$@" >> "{log}"
exit 0
"""


@pytest.fixture
def calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    for name in ("lvs", "lvcreate", "lvremove", "lvchange", "zfs", "rbd"):
        script = bin_dir / name
        script.write_text(FAKE.format(log=log))
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return log


def _storage(cfg: str, storeid: str) -> tuple[dict[str, str], GuestVolumeStorage]:
    scfg = parse_storage_config(cfg)[storeid].scfg()
    plugin = registry.lookup(scfg["type"])
    assert isinstance(plugin, GuestVolumeStorage)
    return dict(scfg), plugin


def _log(level: LogLevel, msg: str) -> None:
    pass


@pytest.mark.parametrize(
    ("cfg", "fmt", "volname"),
    [
        ("dir: st\n\tpath {tmp}\n", "qcow2", "100/vm-100-fleece-0.qcow2"),
        ("btrfs: st\n\tpath {tmp}\n", "qcow2", "100/vm-100-fleece-0.qcow2"),
        ("lvmthin: st\n\tvgname pve\n\tthinpool data\n", "raw", "vm-100-fleece-0"),
        ("lvm: st\n\tvgname pve\n", "raw", "vm-100-fleece-0"),
        ("zfspool: st\n\tpool rpool/data\n", "raw", "vm-100-fleece-0"),
        ("rbd: st\n\tpool vms\n", "raw", "vm-100-fleece-0"),
    ],
    ids=["dir", "btrfs", "lvmthin", "lvm", "zfspool", "rbd"],
)
def test_names_and_formats_as_qemu_server(
    tmp_path: Path, calls: Path, cfg: str, fmt: str, volname: str
) -> None:
    scfg, plugin = _storage(cfg.format(tmp=tmp_path / "st"), "st")
    fv = FleecingVolumes("st", scfg, plugin, 100, _log)
    assert (fv.format, fv.volname(0)) == (fmt, volname)


def test_lvmthin_fleecing_is_allocated_and_freed_with_lvm_tools(calls: Path) -> None:
    scfg, plugin = _storage("lvmthin: st\n\tvgname pve\n\tthinpool data\n", "st")
    recorded: list[str] = []
    fv = FleecingVolumes("st", scfg, plugin, 100, _log, record=recorded.append)
    volume, node = fv.allocate(5 * 1024 * 1024 + 512)
    assert recorded == ["st:vm-100-fleece-0"]  # before the allocation
    argv = [json.loads(x) for x in calls.read_text().splitlines()]
    assert ["lvcreate", "-aly", "-V", "5121k", "--name", "vm-100-fleece-0",
            "--setautoactivation", "n", "--thinpool", "pve/data"] in argv  # fmt: skip
    assert node == {
        "driver": "raw", "discard": "unmap", "size": 5 * 1024 * 1024 + 512,
        "file": {"driver": "host_device", "filename": "/dev/pve/vm-100-fleece-0",
                 "discard": "unmap"},
    }  # fmt: skip
    assert volume.path == "/dev/pve/vm-100-fleece-0"
    assert fv.free_all()
    assert [json.loads(x) for x in calls.read_text().splitlines()][-1] == [
        "lvremove", "-f", "pve/vm-100-fleece-0",
    ]  # fmt: skip


def test_a_storage_without_images_is_refused() -> None:
    class NoImages(GuestVolumeStorage):
        type = "test-noimages"
        subvols = True

    with pytest.raises(UnsupportedError, match="cannot hold disk images"):
        fleecing_format(NoImages(), "x")
