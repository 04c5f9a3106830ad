"""Container backups through the helper as vzdump makes them (pve-container
``src/PVE/VZDump/LXC.pm``): ``backup_container_prepare`` as root, then
``backup_container`` from a child in the container's user namespace, through an
attached helper; restores as ``pct restore`` does (``LXC/Create.pm``, with the
extra ``$storeid`` argument)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bridge_client import BridgeError, Helper

pytestmark = pytest.mark.e2e

CTID = 101
ROOT = 100000
USERNS = [sys.executable, str(Path(__file__).with_name("userns_exec.py")), str(ROOT), "65536", "--"]
CONFIG = "hostname: ct101\nunprivileged: 1\nrootfs: local:101/subvol-101-disk-0.subvol,size=0T\n"


def _tree(base: Path, root: int) -> Path:
    """A container's filesystem as vzdump's snapshot directory shows it: host ids."""
    tree = base / "snapdir"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("ct101\n")
    (tree / "var/cache").mkdir(parents=True)
    (tree / "var/cache/junk.tmp").write_text("excluded\n")
    (tree / "srv/data").mkdir(parents=True)
    (tree / "srv/data/record.txt").write_text("data\n")
    os.symlink("/etc/shadow", tree / "srv/link")  # data, never followed
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in [".", *dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), root, root)
    os.lchown(tree / "srv/data/record.txt", root + 33, root + 33)
    return tree


def _hello(kind: str, tmp: Path, **props: str) -> dict[str, Any]:
    storage = tmp / "storage"
    storage.mkdir(exist_ok=True)
    return {
        "storeid": "ext", "plugin-type": kind, "scfg": {"path": str(storage), **props},
        "state-dir": str(tmp / "state"),
    }  # fmt: skip


def _backup(
    spawn: Callable[..., Helper], hello: dict[str, Any], tree: Path, *, config: str = CONFIG,
    user: int = ROOT, prefix: list[str] | None = USERNS, secret: str | None = None,
) -> tuple[Helper, dict[str, Any]]:
    helper = spawn()
    helper.hello(**hello)
    helper.call("job_init", start_time=int(time.time()))
    init = helper.call("backup_init", vmid=CTID, vmtype="lxc", start_time=int(time.time()))
    assert helper.call("backup_get_mechanism", vmid=CTID, vmtype="lxc") == "directory"
    info = {"directory": str(tree), "sources": [".", "./srv/data"], "backup-user-id": user,
            "firewall-config": "[OPTIONS]\nenable: 0\n"}  # fmt: skip
    token = helper.call("backup_container_prepare", vmid=CTID, info=info)["attach"]
    if secret is not None:
        token = {**token, "secret": secret}
    params = {"vmid": CTID, "guest_config": config, "exclude_patterns": ["/var/cache/**"],
              "info": info}  # fmt: skip
    if prefix is None:
        helper.call("backup_container", **params)
    else:
        child = spawn(prefix)
        child.hello(attach=token)
        try:
            child.call("backup_container", **params)
        finally:
            assert child.bye() == 0
        # the provider's log lines of backup_container reached the attached
        # helper's caller (the namespace child), not the job helper's pipe
        relayed = {m["message"] for m in child.logs}
        assert relayed and not relayed & {m["message"] for m in helper.logs}
    cleanup = helper.call("backup_cleanup", vmid=CTID, vmtype="lxc", success=1, info={})
    helper.call("job_cleanup")
    return helper, {"archive-name": init["archive-name"], **cleanup}


def _tar_listing(path: str) -> dict[str, tuple[str, str]]:
    out = subprocess.run(["tar", "-tvf", path, "--numeric-owner"], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    found = {}
    for line in out.splitlines():
        fields = line.split()
        owner, name = fields[1], fields[5].removeprefix("./").rstrip("/")
        found[name] = (fields[0], owner)
    return found


def test_unprivileged_container_through_an_attached_helper(
    tmp_path: Path, spawn: Callable[..., Helper]
) -> None:
    hello = _hello("backup-store", tmp_path, **{"chunk-size": "65536"})
    tree = _tree(tmp_path, ROOT)
    helper, done = _backup(spawn, hello, tree)
    assert done["stats"]["archive-size"] > 0
    assert helper.bye() == 0

    restore = spawn()
    restore.hello(**hello)
    volname = done["archive-name"]
    # pve-container passes $storeid after $volname
    assert restore.call("restore_get_mechanism", volname=volname, storeid="ext") == ["tar", "lxc"]
    assert restore.call("archive_get_guest_config", volname=volname) == CONFIG
    assert "enable: 0" in restore.call("archive_get_firewall_config", volname=volname,
                                       storeid="ext")  # fmt: skip
    tar = restore.call("restore_container_init", volname=volname, storeid="ext", info={})
    listing = _tar_listing(tar["tar-path"])
    # container ids, not host ids: the job helper used the config's id map
    assert listing["etc/hostname"][1] == "0/0"
    assert listing["srv/data/record.txt"][1] == "33/33"
    assert listing["srv/link"][0].startswith("l")
    assert "var/cache/junk.tmp" not in listing
    restore.call("restore_container_cleanup", volname=volname, storeid="ext", info={})
    assert restore.bye() == 0


def test_directory_restore_and_privileged_container_without_attach(
    tmp_path: Path, spawn: Callable[..., Helper]
) -> None:
    hello = _hello("backup-dir", tmp_path, **{"ct-format": "directory"})
    tree = _tree(tmp_path, 0)
    config = "hostname: ct101\nrootfs: local:101/subvol-101-disk-0.subvol,size=0T\n"
    helper, done = _backup(spawn, hello, tree, config=config, user=0, prefix=None)
    assert helper.bye() == 0
    restore = spawn()
    restore.hello(**hello)
    volname = done["archive-name"]
    mechanism = restore.call("restore_get_mechanism", volname=volname, storeid="ext")
    assert mechanism == ["directory", "lxc"]
    path = Path(restore.call("restore_container_init", volname=volname, storeid="ext",
                             info={})["archive-directory"])  # fmt: skip
    assert (path / "etc/hostname").read_text() == "ct101\n"
    assert (path / "srv/link").is_symlink()
    assert not (path / "var/cache/junk.tmp").exists()
    restore.call("restore_container_cleanup", volname=volname, storeid="ext", info={})
    assert restore.bye() == 0


def test_attach_refuses_a_wrong_secret(tmp_path: Path, spawn: Callable[..., Helper]) -> None:
    hello = _hello("backup-store", tmp_path, **{"chunk-size": "65536"})
    tree = _tree(tmp_path, ROOT)
    with pytest.raises(BridgeError) as err:
        _backup(spawn, hello, tree, secret="00" * 16)
    assert "wrong secret" in err.value.message


def test_backup_user_id_must_be_the_containers_root(
    tmp_path: Path, spawn: Callable[..., Helper]
) -> None:
    hello = _hello("backup-store", tmp_path, **{"chunk-size": "65536"})
    tree = _tree(tmp_path, ROOT)
    with pytest.raises(BridgeError) as err:
        _backup(spawn, hello, tree, user=200000, prefix=None)
    assert err.value.type == "UsageError" and "backup-user-id 200000" in err.value.message
