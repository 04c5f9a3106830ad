"""``disable`` in storage.cfg: a disabled storage is refused for every use (exit 3).

Proxmox VE's ``storage_check_enabled``: no backup to it, no restore from or onto
it, no list or remove; storage.cfg itself still parses.
"""

from __future__ import annotations

import re

import pytest
from sample_node import MiB, Node

from pvebackup.api.errors import StorageUnavailableError
from pvebackup.cli.main import main
from pvebackup.storage import read_storage_config, storage_config

pytestmark = pytest.mark.e2e


def run(node: Node, *args: str) -> int:
    return main(["--root", str(node.path), *args])


def disable(node: Node, storeid: str, value: str = "1") -> None:
    """Add ``disable VALUE`` to the section of ``storeid`` in the node's storage.cfg."""
    cfg = node.root.storage_cfg
    text, n = re.subn(rf"(?m)^(\S+: {re.escape(storeid)})$", rf"\1\n\tdisable {value}",
                      cfg.read_text())  # fmt: skip
    assert n == 1
    cfg.write_text(text)


def backed_up(node: Node, capsys: pytest.CaptureFixture[str]) -> str:
    node.add_vm(100, {"scsi0": 1 * MiB})
    assert run(node, "backup", "--storage", "rec", "100") == 0
    capsys.readouterr()
    return "rec:qemu-100-000"


def refused(capsys: pytest.CaptureFixture[str], storeid: str) -> None:
    err = capsys.readouterr().err
    assert f"error: storage '{storeid}' is disabled" in err, err


@pytest.mark.parametrize("value", ["1", "yes", "ON", "true"])
def test_backup_to_a_disabled_storage_is_refused(
    cli_node: Node, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    cli_node.add_vm(100, {"scsi0": 1 * MiB})
    disable(cli_node, "rec", value)
    assert run(cli_node, "backup", "--storage", "rec", "100") == StorageUnavailableError.exit_code
    refused(capsys, "rec")
    assert not cli_node.backup_dir.exists() or not any(cli_node.backup_dir.iterdir())


def test_disable_no_keeps_the_storage_usable(
    cli_node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_node.add_vm(100, {"scsi0": 1 * MiB})
    disable(cli_node, "rec", "no")
    assert run(cli_node, "backup", "--storage", "rec", "100") == 0


def test_restore_from_a_disabled_storage_is_refused(
    cli_node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    volid = backed_up(cli_node, capsys)
    disable(cli_node, "rec")
    assert run(cli_node, "restore", volid, "200") == 3
    refused(capsys, "rec")
    assert cli_node.root.guest_type(200) is None
    assert not (cli_node.images / "200").exists()


def test_restore_onto_a_disabled_target_is_refused(
    cli_node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    volid = backed_up(cli_node, capsys)
    disable(cli_node, "other")
    assert run(cli_node, "restore", volid, "200", "--storage", "other") == 3
    refused(capsys, "other")
    assert cli_node.root.guest_type(200) is None
    assert not (cli_node.path / "var/lib/other/images/200").exists()


def test_restore_skips_a_disabled_original_storage(
    cli_node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    # The disks were on 'local'; disabled now, the volumes go to the next dir
    # storage that takes images ('other'), and nothing is written to 'local'.
    volid = backed_up(cli_node, capsys)
    disable(cli_node, "local")
    assert run(cli_node, "restore", volid, "200") == 0
    assert (cli_node.path / "var/lib/other/images/200/vm-200-disk-0.qcow2").exists()
    assert not (cli_node.images / "200").exists()


@pytest.mark.parametrize("verb", ["list", "remove"])
def test_list_and_remove_of_a_disabled_storage_are_refused(
    cli_node: Node, capsys: pytest.CaptureFixture[str], verb: str
) -> None:
    volid = backed_up(cli_node, capsys)
    stored = sorted(cli_node.backup_dir.iterdir())
    assert stored
    disable(cli_node, "rec")
    assert run(cli_node, verb, "rec" if verb == "list" else volid) == 3
    refused(capsys, "rec")
    assert sorted(cli_node.backup_dir.iterdir()) == stored  # nothing removed


def test_a_disabled_storage_still_parses(cli_node: Node) -> None:
    disable(cli_node, "rec")
    cfg = read_storage_config(cli_node.root.storage_cfg)
    assert cfg.disabled("rec") and not cfg.disabled("local")
    assert storage_config(cfg, "rec", allow_disabled=True)["disable"] == "1"
    with pytest.raises(StorageUnavailableError, match="'rec' is disabled"):
        storage_config(cfg, "rec")


def test_a_guest_with_a_disk_on_a_disabled_storage_fails(
    cli_node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its image is not read: vzdump refuses a volume on a disabled storage too.
    cli_node.add_vm(100, {"scsi0": 1 * MiB})
    disable(cli_node, "local")
    assert run(cli_node, "backup", "--storage", "rec", "100") == 11
    out, err = capsys.readouterr()
    assert re.search(r"^100\s+qemu\s+FAILED", out, re.M)
    assert "storage 'local' is disabled" in err
