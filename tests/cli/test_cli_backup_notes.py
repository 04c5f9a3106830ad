"""``backup --notes-template`` and ``--protected``: set on each new backup, before prune."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path

import pytest
from recording_provider import RecordingPlugin
from sample_node import MiB, Node

from pvebackup.cli.main import main
from pvebackup.storage import AttributeValue

pytestmark = pytest.mark.e2e


def _run(node: Node, *args: str) -> int:
    return main(["--root", str(node.root.root), *args])


@pytest.fixture
def attributes(monkeypatch: pytest.MonkeyPatch) -> dict[tuple[str, str], AttributeValue]:
    """The recording plugin, given notes and protection in memory (a fake)."""
    store: dict[tuple[str, str], AttributeValue] = {}

    def update(
        self: RecordingPlugin,
        scfg: Mapping[str, str],
        storeid: str,
        volname: str,
        attribute: str,
        value: AttributeValue,
    ) -> None:
        store[(volname, attribute)] = value

    monkeypatch.setattr(RecordingPlugin, "update_volume_attribute", update, raising=False)
    return store


def test_notes_template_variables_and_escapes(
    cli_node: Node, attributes: dict[tuple[str, str], AttributeValue], tmp_path: Path
) -> None:
    cli_node.add_vm(100, {"scsi0": MiB})
    (cli_node.root.pve_dir / "corosync.conf").write_text(
        "totem {\n  cluster_name: prod-eu\n  version: 2\n}\n"
    )
    template = "{{guestname}} on {{node}}\\n{{vmid}}@{{cluster}} \\\\ {x}"
    assert _run(cli_node, "backup", "--storage", "rec", "--notes-template", template,
                "--protected", "100") == 0  # fmt: skip
    node = socket.gethostname().split(".", 1)[0]
    assert attributes == {
        ("qemu-100-000", "notes"): f"vm on {node}\n100@prod-eu \\ {{x}}",
        ("qemu-100-000", "protected"): True,
    }


def test_notes_template_without_cluster_and_ct_hostname(
    cli_node: Node, attributes: dict[tuple[str, str], AttributeValue]
) -> None:
    cli_node.add_ct(101, mp=False)
    assert _run(cli_node, "backup", "--storage", "rec", "--notes-template",
                "{{guestname}}/{{cluster}}", "101") == 0  # fmt: skip
    assert attributes == {("lxc-101-000", "notes"): "ct101/standalone node"}


@pytest.mark.parametrize("template", ["{{guest}}", "a\\tb", "x\ny"])
def test_bad_notes_template_is_a_usage_error_before_any_backup(
    cli_node: Node, template: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_node.add_vm(100, {"scsi0": MiB})
    with pytest.raises(SystemExit) as info:
        _run(cli_node, "backup", "--storage", "rec", "--notes-template", template, "100")
    assert info.value.code == 2
    assert "--notes-template" in capsys.readouterr().err
    assert not list((cli_node.path).rglob("meta.json"))  # nothing was backed up


def test_notes_on_a_plugin_without_notes_is_a_warning(
    cli_node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_node.add_vm(100, {"scsi0": MiB})
    assert _run(cli_node, "backup", "--storage", "rec", "--notes-template", "x", "100") == 0
    assert "unable to add notes" in capsys.readouterr().err
    # --protected that cannot be honoured is an error: a prune could remove it.
    assert _run(cli_node, "backup", "--storage", "rec", "--protected", "100") == 4
    assert "unable to set protected flag" in capsys.readouterr().err
