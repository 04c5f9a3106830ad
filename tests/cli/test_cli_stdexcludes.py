"""``stdexcludes`` (vzdump.conf / ``--stdexcludes``, on by default as in Proxmox VE):
``/tmp/?*``, ``/var/tmp/?*`` and ``/var/run/?*.pid`` stay out of container backups,
on both providers, through the shared exclude matcher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sample_node import Node

from pvebackup.api.errors import ConfigError
from pvebackup.cli.main import main
from pvebackup.host.defaults import STD_EXCLUDES, read_job_defaults
from pvebackup.host.guests import NodeRoot

pytestmark = pytest.mark.e2e

CFG = """\
dir: local
\tpath {root}/var/lib/vz
\tcontent images,rootdir

backup-dir: bdir
\tpath {root}/bdir
\tcreate-base-path 1

backup-store: bs
\tpath {root}/bs
\tcreate-base-path 1
"""

# Matched by a standard exclude / kept: the directories themselves, other files
# of /var/run, and a /tmp deeper in the tree (the patterns are anchored).
EXCLUDED = ("tmp/a", "tmp/sub/b", "var/tmp/c", "var/run/sshd.pid")
KEPT = ("tmp", "var/tmp", "var/run/keep.sock.txt", "srv/tmp/d", "var/run/sub/x.pid")


def _node(tmp_path: Path) -> Node:
    node = Node(tmp_path / "node")
    node.root.storage_cfg.write_text(CFG.format(root=node.path))
    (rootfs,) = node.add_ct(101, mp=False)
    for rel in (*EXCLUDED, *KEPT):
        path = rootfs / rel
        if rel in ("tmp", "var/tmp"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(rel)
    return node


def run(node: Node, *args: str) -> int:
    return main(["--root", str(node.path), *args])


def _restored(node: Node, storage: str, capsys: pytest.CaptureFixture[str]) -> Path:
    capsys.readouterr()
    assert run(node, "list", storage, "--output", "json") == 0
    (made,) = json.loads(capsys.readouterr().out)
    assert run(node, "restore", made["volid"], "201", "--storage", "local") == 0
    return node.image(201, "subvol-201-disk-0.subvol")


@pytest.mark.parametrize("storage", ["bdir", "bs"])
def test_standard_excludes_are_on_by_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], storage: str
) -> None:
    node = _node(tmp_path)
    assert run(node, "backup", "--storage", storage, "101") == 0
    root = _restored(node, storage, capsys)
    assert [rel for rel in EXCLUDED if (root / rel).exists()] == []
    assert [rel for rel in KEPT if not (root / rel).exists()] == []


@pytest.mark.parametrize("how", ["command-line", "vzdump.conf"])
def test_stdexcludes_0_keeps_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    node = _node(tmp_path)
    args = ["backup", "--storage", "bdir", "101"]
    if how == "command-line":
        (node.path / "etc").mkdir(exist_ok=True)
        (node.path / "etc/vzdump.conf").write_text("stdexcludes: 1\n")  # the option wins
        args.append("--stdexcludes=0")
    else:
        (node.path / "etc").mkdir(exist_ok=True)
        (node.path / "etc/vzdump.conf").write_text("stdexcludes: 0\n")
    assert run(node, *args) == 0
    root = _restored(node, "bdir", capsys)
    assert [rel for rel in (*EXCLUDED, *KEPT) if not (root / rel).exists()] == []


def test_vzdump_conf_stdexcludes_values(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    conf = tmp_path / "etc/vzdump.conf"
    conf.write_text("stdexcludes: 0\n")
    defaults = read_job_defaults(NodeRoot(tmp_path))
    assert defaults.stdexcludes is False and not defaults.warnings
    conf.write_text("stdexcludes: maybe\n")
    with pytest.raises(ConfigError, match=":1: stdexcludes 'maybe'"):
        read_job_defaults(NodeRoot(tmp_path))
    assert STD_EXCLUDES == ("/tmp/?*", "/var/tmp/?*", "/var/run/?*.pid")  # PVE/VZDump.pm
