"""``pvebackup restore --keep-host-access``: the flag reaches the restore, and is documented."""

from __future__ import annotations

import json

import pytest
from sample_node import Node

from pvebackup.api.types import GuestType
from pvebackup.cli.main import main

pytestmark = pytest.mark.e2e

HOSTILE = ["hookscript: local:snippets/evil.pl", "mp0: /,mp=/mnt/host", "lxc.idmap: u 0 0 65536"]


def hostile_ct_backup(node: Node) -> None:
    vol = node.backup_dir / "lxc-100-000"
    (vol / "tree/etc").mkdir(parents=True)
    (vol / "tree/etc/hostname").write_text("ct\n")
    (vol / "vmtype").write_text("lxc")
    (vol / "meta.json").write_text(json.dumps({"vmid": 100, "ctime": 1}))
    conf = ["rootfs: local:100/subvol-100-disk-0.subvol,size=0T", "unprivileged: 1", *HOSTILE]
    (vol / "guest.conf").write_text("\n".join(conf) + "\n")


@pytest.mark.parametrize("flag", [[], ["--keep-host-access"]])
def test_restore_flag(cli_node: Node, capsys: pytest.CaptureFixture[str], flag: list[str]) -> None:
    hostile_ct_backup(cli_node)
    assert main(["--root", str(cli_node.path), "restore", "rec:lxc-100-000", "300", *flag]) == 0
    lines = cli_node.root.config_path(300, GuestType.LXC).read_text().splitlines()
    err = capsys.readouterr().err
    assert ("hookscript: local:snippets/evil.pl" in lines) == bool(flag)
    assert ("mp0: /,mp=/mnt/host" in lines) == bool(flag)
    assert "lxc.idmap: u 0 0 65536" not in lines
    assert "WARN: lxc.idmap: u 0 0 65536: dropped" in err
    assert "WARN: mp0: /,mp=/mnt/host: " + ("kept" if flag else "dropped") in err
    rootfs = cli_node.images / "300/subvol-300-disk-0.subvol"
    assert (rootfs / "etc/hostname").stat().st_uid == 100000


def test_restore_help_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["restore", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--keep-host-access" in out and "lxc.idmap is never taken from a backup" in out
