"""backup-store on a real Ceph RGW, end to end: the host layer backs up a VM (real
qemu exports) full and incremental, restores it identically (nbdkit reading the
bucket), and ``pvebackup gc`` and ``pvebackup verify`` work on the bucket."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from pvebackup.api.types import GuestType
from pvebackup.cli.main import main
from pvebackup.host.guests import NodeRoot
from pvebackup.host.job import run_backup_job
from pvebackup.host.restore import run_restore
from pvebackup.providers.store.settings import StoreSettings
from pvebackup.storage.config import read_storage_config
from s3fixture import S3Server, s3_client

pytestmark = [pytest.mark.e2e, pytest.mark.s3]

MiB = 1024 * 1024


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture
def root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_server: S3Server, s3_bucket: str
) -> NodeRoot:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("PVEBACKUP_STATE_DIR", str(tmp_path / "state"))
    cred = tmp_path / "s3.cred"
    cred.write_text(f"access-key = {s3_server.access_key}\nsecret-key = {s3_server.secret_key}\n")
    cred.chmod(0o600)
    path = tmp_path / "node"
    root = NodeRoot(path)
    for sub in ("qemu-server", "lxc"):
        (root.pve_dir / sub).mkdir(parents=True, exist_ok=True)
    root.storage_cfg.write_text(
        f"dir: local\n\tpath {path}/vz\n\tcontent images,rootdir\n\n"
        f"backup-store: s3st\n\ts3-endpoint {s3_server.endpoint}\n\ts3-bucket {s3_bucket}\n"
        f"\ts3-prefix pve/node1\n\ts3-credentials {cred}\n\ts3-max-requests 4\n"
        "\tchunk-size 65536\n"
    )
    return root


def _vm(root: NodeRoot, vmid: int) -> Path:
    images = root.root / "vz/images" / str(vmid)
    images.mkdir(parents=True)
    disk = images / f"vm-{vmid}-disk-0.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(8 * MiB))
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 3M", "-c", "write -P 0x22 5M 1M",
       str(disk))  # fmt: skip
    root.config_path(vmid, GuestType.QEMU).write_text(
        f"name: vm\nmemory: 512\nscsi0: local:{vmid}/{disk.name},size=8M\n"
    )
    return disk


def _restores_identically(root: NodeRoot, volid: str, expected: Path, vmid: int) -> None:
    run_restore(root, volid, vmid, terminal=None)
    restored = next((root.root / "vz/images" / str(vmid)).glob("*.qcow2"))
    sh("qemu-img", "compare", "-q", str(expected), str(restored))


def test_vm_backup_restore_gc_verify_on_rgw(
    root: NodeRoot, s3_server: S3Server, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = _vm(root, 100)
    full = run_backup_job(root, "s3st", [100], terminal=None).guests[0]
    assert full.ok and full.target is not None, full.error
    first = disk.with_name("first.qcow2")
    sh("cp", str(disk), str(first))
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 1M 64k", str(disk))
    incr = run_backup_job(root, "s3st", [100], terminal=None).guests[0]
    assert incr.ok and incr.target is not None, incr.error
    assert incr.log_path is not None
    log = incr.log_path.read_text()
    assert "0 storage requests retried" in log
    assert " PUT)" in log and " S3 requests (" in log

    # Everything is in the bucket, under the prefix; nothing in a local path.
    client = s3_client(s3_server)
    try:
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    finally:
        client.close()
    assert keys and all(k.startswith("pve/node1/") for k in keys)
    assert any(k.startswith("pve/node1/packs/") for k in keys)

    _restores_identically(root, incr.target, disk, 201)
    _restores_identically(root, full.target, first, 202)

    r = str(root.root)
    assert main(["--root", r, "verify", "s3st"]) == 0
    out = capsys.readouterr().out
    assert out.count("ok ") >= 2, out
    assert main(["--root", r, "remove", full.target]) == 0
    assert main(["--root", r, "gc", "s3st"]) == 0  # condemns
    assert main(["--root", r, "gc", "s3st"]) == 0  # deletes
    assert "removed" in capsys.readouterr().out
    assert main(["--root", r, "verify", "s3st"]) == 0
    _restores_identically(root, incr.target, disk, 203)


def test_storage_cfg_holds_no_secret(root: NodeRoot, s3_server: S3Server) -> None:
    text = root.storage_cfg.read_text()
    assert s3_server.secret_key not in text
    scfg = read_storage_config(root.storage_cfg, strict=True)["s3st"].scfg()
    settings = StoreSettings.from_scfg(scfg, "s3st")
    assert s3_server.secret_key not in settings.location  # what nbdkit's argv carries
