"""``remove`` and ``prune`` of an encrypted backup-store without its key, as PBS's
``snapshot forget``: removal decrypts nothing and writes no data, so it needs no key;
the freed chunks go at the next GC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sample_node import MiB, Node

from pvebackup.cli.main import main
from pvebackup.kit.passphrase import PASSPHRASE_FILE_ENV
from pvebackup.store.keys import create_key_file

pytestmark = pytest.mark.e2e

CFG = """\
dir: local
\tpath {root}/var/lib/vz
\tcontent images,rootdir

backup-store: bs
\tpath {root}/bs
\tcreate-base-path 1
\tencryption-key {keyfile}
"""


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_FILE_ENV, raising=False)
    monkeypatch.setattr("pvebackup.kit.passphrase._typed", {})


def run(node: Node, *args: str) -> int:
    return main(["--root", str(node.path), *args])


def _volids(node: Node, capsys: pytest.CaptureFixture[str]) -> list[str]:
    capsys.readouterr()
    assert run(node, "list", "bs", "--output", "json") == 0
    return [r["volid"] for r in json.loads(capsys.readouterr().out)]


def _objects(node: Node) -> dict[str, bytes]:
    return {
        str(p.relative_to(node.path / "bs")): p.read_bytes()
        for p in (node.path / "bs").rglob("*")
        if p.is_file()
    }


def test_remove_and_prune_without_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keyfile = tmp_path / "keys/bs.key"
    keyfile.parent.mkdir()
    create_key_file(keyfile, None, scrypt_n=2**10)
    node = Node(tmp_path / "node")
    node.root.storage_cfg.write_text(CFG.format(root=node.path, keyfile=keyfile))
    node.add_vm(100, {"scsi0": MiB})
    for _ in range(4):
        assert run(node, "backup", "--storage", "bs", "100") == 0
    first, second, _third, newest = _volids(node, capsys)
    assert run(node, "protect", second) == 0
    keyfile.rename(tmp_path / "elsewhere.key")  # the key is kept off this node
    before = _objects(node)

    assert run(node, "remove", first) == 0
    assert run(node, "remove", second) == 7  # protected: refused, also without the key
    assert run(node, "prune", "bs", "--keep-last", "1") == 0
    assert _volids(node, capsys) == [second, newest]

    # Only deletions: no object was added or rewritten (no plaintext, no new data).
    after = _objects(node)
    assert set(after) <= set(before)
    assert all(after[name] == before[name] for name in after)

    # What is left still restores with the key.
    (tmp_path / "elsewhere.key").rename(keyfile)
    assert run(node, "restore", newest, "200") == 0
