"""``pvebackup prune`` end to end on both real providers, backups made at chosen times.

The clock is injected into the backup job, so the volumes carry the ctimes the
retention rule is tested on. After the prune every kept backup restores to the
disk it was taken of: on backup-dir that is an incremental chain, whose bases must
stay while a child stays.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pvebackup.api.types import GuestType
from pvebackup.cli.main import main
from pvebackup.host.guests import NodeRoot
from pvebackup.host.job import run_backup_job
from pvebackup.host.restore import run_restore

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
DAY = 86400
real_time = time.time
T0 = int(datetime(2024, 3, 10, 12, tzinfo=UTC).timestamp())


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> NodeRoot:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("PVEBACKUP_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("TZ", "UTC")
    path = tmp_path / "node"
    root = NodeRoot(path)
    for sub in ("qemu-server", "lxc"):
        (root.pve_dir / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("bdir", "bstore"):
        (path / sub).mkdir()
    root.storage_cfg.write_text(
        f"dir: local\n\tpath {path}/vz\n\tcontent images,rootdir\n\n"
        f"backup-dir: bdir\n\tpath {path}/bdir\n\n"
        f"backup-store: bstore\n\tpath {path}/bstore\n\tchunk-size 65536\n"
        "\tprune-backups keep-last=1\n"
    )
    return root


def add_vm(root: NodeRoot, vmid: int) -> Path:
    images = root.root / "vz/images" / str(vmid)
    images.mkdir(parents=True)
    disk = images / f"vm-{vmid}-disk-0.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(4 * MiB))
    root.config_path(vmid, GuestType.QEMU).write_text(
        f"name: vm\nmemory: 512\nscsi0: local:{vmid}/{disk.name},size=4M\n"
    )
    return disk


def backups_at(root: NodeRoot, storeid: str, disk: Path, days: list[int]) -> dict[str, Path]:
    """One backup per day (a different byte each time); volid -> copy of the disk then."""
    taken = {}
    for day in days:
        sh("qemu-io", "-f", "qcow2", "-c", f"write -P {0x40 + day} {day * 64}k 4k", str(disk))
        # the providers take a backup's ctime from time.time(): shift the whole
        # process's wall clock to the chosen day while the job runs (it still moves)
        shift = T0 + day * DAY - real_time()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(time, "time", lambda shift=shift: real_time() + shift)
            result = run_backup_job(root, storeid, [100], terminal=None)
        guest = result.guests[0]
        assert guest.ok and guest.target is not None, guest.error
        copy = disk.with_name(f"at-{storeid}-{day}.qcow2")
        sh("cp", str(disk), str(copy))
        taken[guest.target] = copy
    return taken


def cli_json(root: NodeRoot, capsys: pytest.CaptureFixture[str], *args: str) -> object:
    capsys.readouterr()
    assert main(["--root", str(root.root), *args, "--output", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def restores_identically(root: NodeRoot, volid: str, expected: Path, vmid: int) -> bool:
    run_restore(root, volid, vmid, terminal=None)
    restored = next((root.root / "vz/images" / str(vmid)).glob("*.qcow2"))
    return (
        subprocess.run(["qemu-img", "compare", "-q", str(expected), str(restored)]).returncode == 0
    )


@pytest.mark.parametrize("storeid", ["bdir", "bstore"])
def test_prune_keep_last_and_daily_leaves_kept_backups_restorable(
    root: NodeRoot, capsys: pytest.CaptureFixture[str], storeid: str
) -> None:
    disk = add_vm(root, 100)
    taken = backups_at(root, storeid, disk, [0, 1, 2, 3])
    listing = cli_json(root, capsys, "list", storeid)
    assert isinstance(listing, list)
    assert sorted(v["ctime"] for v in listing) == [T0 + d * DAY for d in range(4)]

    # bstore: its storage.cfg property prune-backups keep-last=1 applies
    given = ["--keep-last", "1"] if storeid == "bdir" else []
    report = cli_json(root, capsys, "prune", storeid, "--vmid", "100", *given)
    assert isinstance(report, dict) and report["options"] == "keep-last=1"
    marks = {v["volid"]: v for v in report["volumes"]}
    newest = max(taken, key=lambda v: marks[v]["ctime"])
    assert marks[newest]["mark"] == "keep"
    remaining = cli_json(root, capsys, "list", storeid)
    assert isinstance(remaining, list)
    left = {v["volid"] for v in remaining}
    by_volname = {v["volid"].split(":", 1)[1]: v for v in remaining}
    if storeid == "bdir":  # never a child without its base
        assert all(v["parent"] is None or v["parent"] in by_volname for v in remaining)
    if storeid == "bstore":
        # snapshots stand alone: everything but the newest is gone
        assert left == {newest}, report
    else:
        # an incremental chain: the bases of the newest stay, each with the reason
        kept_bases = [m for m in report["volumes"] if m["mark"] == "remove" and not m["removed"]]
        assert all(m["reason"].startswith("base of ") for m in kept_bases)
        assert {m["volid"] for m in kept_bases} == left - {newest}
    for n, volid in enumerate(sorted(left)):
        assert restores_identically(root, volid, taken[volid], 200 + n)
