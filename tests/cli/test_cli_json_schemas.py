"""``--output json`` of every command against the schemas documented in docs/cli-json.md."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from sample_node import MiB, Node

from pvebackup.cli.main import build_parser, main

pytestmark = pytest.mark.e2e

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli-json.md"


def documented() -> dict[str, set[str]]:
    """Section title -> the keys its bullet list names (``- `key` (type): ...``)."""
    sections: dict[str, set[str]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            sections[current] = set()
        elif current is not None and (m := re.match(r"- `([^`]+)` \(", line)):
            sections[current].add(m.group(1))
    return sections


def keys_of(value: Any, prefix: str = "") -> set[str]:
    """The key paths of a document, as the doc writes them (``guests[].vmid``).

    Objects are entered at the top and in list items only: an object value
    (``kdf-params``) is one documented key.
    """
    if isinstance(value, list):
        return {k for item in value for k in keys_of(item, prefix + "[].")}
    assert isinstance(value, dict), value
    out = set()
    for k, v in value.items():
        out.add(prefix + k)
        if isinstance(v, list) and v and all(isinstance(i, dict) for i in v):
            out |= keys_of(v, prefix + k)
    return out


def no_human_sizes(value: Any) -> None:
    text = json.dumps(value)
    assert not re.search(r"\d (B|KiB|MiB|GiB|TiB)\b", text), text


def run_json(node: Node | None, capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    argv = ([] if node is None else ["--root", str(node.path)]) + [*args, "--output", "json"]
    code = main(argv)
    out = capsys.readouterr().out
    doc = json.loads(out)
    no_human_sizes(doc)
    return code, doc


def test_every_command_has_a_json_output_and_a_documented_schema() -> None:
    sections = documented()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    for verb, p in sub.choices.items():  # type: ignore[union-attr]
        if verb == "key":
            key_sub = next(a for a in p._actions if a.dest == "key_verb")
            commands = list(key_sub.choices.items())  # type: ignore[union-attr]
        else:
            commands = [(verb, p)]
        for name, cp in commands:
            assert any("--output" in a.option_strings for a in cp._actions), name
        assert verb in sections, f"docs/cli-json.md has no section for {verb}"


def test_backup_list_restore_remove_json_match_the_doc(
    cli_node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = documented()
    cli_node.add_vm(100, {"scsi0": 2 * MiB})
    code, backup = run_json(cli_node, capsys, "backup", "--storage", "rec", "100")
    assert code == 0 and backup["ok"] is True
    assert keys_of(backup) == doc["backup"]
    assert backup["guests"][0]["target"] == "rec:qemu-100-000"
    assert isinstance(backup["guests"][0]["size"], int)

    code, listing = run_json(cli_node, capsys, "list", "rec")
    assert code == 0 and keys_of(listing) == doc["list"]

    code, restored = run_json(cli_node, capsys, "restore", "rec:qemu-100-000", "200")
    assert code == 0 and keys_of(restored) == doc["restore"]
    assert restored["vmid"] == 200 and restored["vmtype"] == "qemu"

    code, removed = run_json(cli_node, capsys, "remove", "rec:qemu-100-000")
    assert code == 0 and keys_of(removed) == doc["remove"] and removed["removed"] is True


def test_backup_json_keeps_exit_11_when_a_guest_fails(
    cli_node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_node.add_vm(100, {"scsi0": 2 * MiB})
    cli_node.add_vm(101, {"scsi0": 2 * MiB})
    cli_node.image(101, "vm-101-disk-0.qcow2").unlink()  # this guest's disk is gone
    code, backup = run_json(cli_node, capsys, "backup", "--storage", "rec", "100", "101")
    assert code == 11
    assert backup["ok"] is False and keys_of(backup) == documented()["backup"]
    failed = [g for g in backup["guests"] if not g["ok"]]
    assert [g["vmid"] for g in failed] == [101] and failed[0]["error"]


def test_key_commands_json_match_the_doc(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = documented()
    path = tmp_path / "k.key"
    for argv in (["key", "create", str(path)], ["key", "show", str(path)]):
        code, info = run_json(None, capsys, *argv)
        assert code == 0 and keys_of(info) == doc["key"]
    code, paper = run_json(None, capsys, "key", "paperkey", str(path))
    assert code == 0 and keys_of(paper) == doc["key"] | doc["key paperkey"]
    paperfile = tmp_path / "paper.txt"
    paperfile.write_text(paper["paperkey"])
    code, imported = run_json(
        None, capsys, "key", "import-paperkey", str(paperfile), str(tmp_path / "k2.key")
    )
    assert code == 0 and keys_of(imported) == doc["key"]
    assert imported["fingerprint"] == info["fingerprint"]
    pw = tmp_path / "pw"
    pw.write_text("new one\n")
    pw.chmod(0o600)
    code, changed = run_json(
        None, capsys, "key", "change-passphrase", str(path), "--new-passphrase-file", str(pw)
    )
    assert code == 0 and keys_of(changed) == doc["key"]
    assert changed["kdf"] == "scrypt" and changed["fingerprint"] == info["fingerprint"]


def test_backup_without_vmid_prints_the_backup_usage(
    cli_node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--root", str(cli_node.path), "backup", "--storage", "rec"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: pvebackup backup ")
    assert "give VMIDs or --all" in err
