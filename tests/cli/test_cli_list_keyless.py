"""``pvebackup list`` of an encrypted backup-store without its key, as PBS lists snapshots.

Names, times and sizes are shown; the contents stay unreadable (a restore still
needs the key), and a forged manifest is still reported damaged by its shape.
"""

from __future__ import annotations

import json
import shutil
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
{keyline}
"""


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSPHRASE_FILE_ENV, raising=False)
    monkeypatch.setattr("pvebackup.kit.passphrase._typed", {})


def _node(tmp_path: Path, keyfile: Path | None) -> Node:
    node = Node(tmp_path / "node")
    line = "" if keyfile is None else f"\tencryption-key {keyfile}\n"
    node.root.storage_cfg.write_text(CFG.format(root=node.path, keyline=line))
    return node


def run(node: Node, *args: str) -> int:
    return main(["--root", str(node.path), *args])


@pytest.mark.parametrize("how", ["key-file-gone", "no-key-configured", "protected-no-pass"])
def test_list_without_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    keyfile = tmp_path / "keys/bs.key"
    keyfile.parent.mkdir()
    passphrase = "a passphrase" if how == "protected-no-pass" else None
    fingerprint = create_key_file(keyfile, passphrase, scrypt_n=2**10).fingerprint
    node = _node(tmp_path, keyfile)
    node.add_vm(100, {"scsi0": 2 * MiB})
    if passphrase is not None:
        (tmp_path / "pass").write_text(passphrase + "\n")
        (tmp_path / "pass").chmod(0o600)
        line = f"\tencryption-key {keyfile}\n\tencryption-passphrase-file {tmp_path / 'pass'}"
        node.root.storage_cfg.write_text(CFG.format(root=node.path, keyline=line))
    assert run(node, "backup", "--storage", "bs", "100") == 0
    capsys.readouterr()
    assert run(node, "list", "bs", "--output", "json") == 0
    (made,) = json.loads(capsys.readouterr().out)
    assert run(node, "notes", made["volid"], "--set", "before the upgrade") == 0
    assert run(node, "protect", made["volid"]) == 0
    capsys.readouterr()
    if how == "key-file-gone":
        shutil.move(keyfile, tmp_path / "elsewhere.key")
    elif how == "no-key-configured":
        node.root.storage_cfg.write_text(CFG.format(root=node.path, keyline=""))
    else:
        node.root.storage_cfg.write_text(
            CFG.format(root=node.path, keyline=f"\tencryption-key {keyfile}\n")
        )
    assert run(node, "list", "bs", "--output", "json") == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert record["volid"].startswith("bs:backup/vm-100-")
    assert record["vmid"] == 100 and record["ctime"] > 0 and record["size"] > 0
    assert "listed without the key" in record["comment"]
    # notes and protection, as PBS shows them without the key (unencrypted sidecars)
    assert record["notes"] == "before the upgrade" and record["protected"] is True
    assert fingerprint not in json.dumps(record)  # nothing key-derived beyond need

    # the contents stay unreadable: a restore fails with the key's exit code
    assert run(node, "restore", record["volid"], "200") == 6
    assert node.root.guest_type(200) is None
    assert "key" in capsys.readouterr().err


def test_keyless_listing_still_rejects_a_malformed_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keyfile = tmp_path / "bs.key"
    create_key_file(keyfile, None, scrypt_n=2**10)
    node = _node(tmp_path, keyfile)
    node.add_vm(100, {"scsi0": MiB})
    assert run(node, "backup", "--storage", "bs", "100") == 0
    assert run(node, "backup", "--storage", "bs", "100") == 0
    keyfile.unlink()
    manifests = sorted((node.path / "bs").rglob("manifest.json"))
    assert len(manifests) == 2
    # hostile storage: a forged manifest that is not even canonical JSON
    raw = manifests[0].read_bytes()
    assert b'"encrypted":true' in raw
    manifests[0].write_bytes(raw.replace(b'"encrypted":true', b'"encrypted": true'))
    capsys.readouterr()
    run(node, "list", "bs", "--output", "json")
    out, err = capsys.readouterr()
    assert len(json.loads(out)) == 1
    assert "not in canonical form" in err, err
