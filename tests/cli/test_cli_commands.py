"""The pvebackup command line, in process (pvebackup.cli)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from sample_node import MiB, Node

from pvebackup.cli.main import main

pytestmark = pytest.mark.e2e


def run(node: Node, *args: str) -> int:
    return main(["--root", str(node.path), *args])


def test_help_states_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "exit status" in out
    assert re.search(r"11\s+backup job finished, but one or more guests failed", out)
    assert re.search(r"130\s+interrupted", out)
    for verb in ("backup", "restore", "list", "remove"):
        assert verb in out


@pytest.mark.parametrize(
    "args",
    [
        ["backup", "--storage", "rec"],  # neither VMIDs nor --all
        ["backup", "--storage", "rec", "--all", "100"],
        ["backup", "--storage", "rec", "abc"],
        ["backup", "--storage", "rec", "99"],
        ["backup", "--storage", "rec", "--bwlimit", "-1", "100"],
        ["restore", "rec:x"],
        ["list"],
    ],
)
def test_usage_errors_exit_2(cli_node: Node, args: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run(cli_node, *args)
    assert info.value.code == 2


def test_backup_list_restore_remove(cli_node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    cli_node.add_vm(100, {"scsi0": 2 * MiB})
    assert run(cli_node, "backup", "--storage", "rec", "100") == 0
    out, err = capsys.readouterr()
    assert re.search(r"^100\s+qemu\s+ok\s+\S+\s+[\d.]+ \w*B\s+rec:qemu-100-000$", out, re.M)
    assert "INFO: Starting Backup of VM 100 (qemu)" in err

    assert run(cli_node, "list", "rec", "--output", "json") == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["volid"] for r in records] == ["rec:qemu-100-000"]
    assert records[0]["vmid"] == 100 and records[0]["vmtype"] == "qemu"
    assert isinstance(records[0]["ctime"], int) and records[0]["size"] > 0

    assert run(cli_node, "list", "rec") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "VOLID", "GUEST", "TYPE", "TIME", "(UTC)", "SIZE", "VIRTUAL", "PARENT"
    ]
    assert re.match(
        r"rec:qemu-100-000\s+100\s+qemu\s+\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\s+\S+ "
        r"(B|KiB|MiB)\s+-\s+-$",
        lines[1],
    )

    assert run(cli_node, "restore", "rec:qemu-100-000", "100") == 7
    assert "error: guest 100 exists already" in capsys.readouterr().err
    assert run(cli_node, "restore", "rec:qemu-100-000", "200") == 0
    assert "restored rec:qemu-100-000 as qemu guest 200" in capsys.readouterr().out
    assert cli_node.image(200, "vm-200-disk-0.qcow2").exists()

    assert run(cli_node, "remove", "rec:qemu-100-000") == 0
    assert run(cli_node, "remove", "rec:qemu-100-000") == 3
    assert "error: no backup qemu-100-000" in capsys.readouterr().err


def test_failed_guest_exits_11(cli_node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    cli_node.add_vm(100, {"scsi0": 1 * MiB})
    cli_node.add_ct(101)
    cli_node.set_provider_options(**{"fail-vmid": "100"})
    assert run(cli_node, "backup", "--storage", "rec", "--all") == 11
    out, err = capsys.readouterr()
    assert re.search(r"^100\s+qemu\s+FAILED", out, re.M)
    assert re.search(r"^101\s+lxc\s+ok", out, re.M)
    assert "error: backup of 100 failed: injected failure for 100" in err


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["backup", "--storage", "local", "100"], 4, "error: storage 'local' (type dir) has no"),
        (["backup", "--storage", "nope", "100"], 3, "error: "),
        (["backup", "--storage", "rec", "555"], 3, "error: no guest with vmid 555"),
        (["list", "local"], 4, "error: storage type dir does not hold backups"),
        (["restore", "bad", "200"], 2, "error: invalid volume id"),
    ],
)
def test_errors_print_message_and_exit_code(
    cli_node: Node, capsys: pytest.CaptureFixture[str], args: list[str], code: int, message: str
) -> None:
    cli_node.add_vm(100, {"scsi0": 1 * MiB})
    assert run(cli_node, *args) == code
    assert capsys.readouterr().err.startswith(message)


def test_missing_storage_cfg_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--root", str(tmp_path), "list", "rec"]) == 2
    assert "storage.cfg" in capsys.readouterr().err


def test_list_shows_parent_virtual_size_comment_and_notes_apart(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from pvebackup.api.types import GuestType
    from pvebackup.cli import cmd_list
    from pvebackup.storage import VolumeInfo, VolumeScan

    volumes = [
        VolumeInfo("st:backup/a", 100, GuestType.QEMU, 0, 1024, "f", None, "",
                   virtual_size=4 << 20, comment="full, stored 1 KiB"),
        VolumeInfo("st:backup/b", 100, GuestType.QEMU, 60, 512, "f", "backup/a",
                   "before the upgrade", virtual_size=4 << 20, comment="incremental"),
    ]
    monkeypatch.setattr(cmd_list, "scan_volumes", lambda root, storeid: VolumeScan(volumes, []))
    assert cmd_list.run(cmd_list.ListOptions(tmp_path, "st")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-4:] == ["VIRTUAL", "PARENT", "COMMENT", "NOTES"]
    assert "full, stored 1 KiB" in lines[1] and "before the upgrade" not in lines[1]
    assert lines[2].split()[-4:] == ["incremental", "before", "the", "upgrade"]
    assert "backup/a" in lines[2] and "4.0 MiB" in lines[2]
    assert cmd_list.run(cmd_list.ListOptions(tmp_path, "st", "json")) == 0
    records = json.loads(capsys.readouterr().out)
    assert records[1]["parent"] == "backup/a" and records[1]["notes"] == "before the upgrade"
    assert records[0]["comment"] == "full, stored 1 KiB" and records[0]["notes"] == ""
    assert records[0]["virtual-size"] == 4 << 20 and records[0]["size"] == 1024


def test_root_sets_the_host_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Providers keep their host-side state below --root; an explicit variable wins."""
    from pvebackup.kit.hoststate import STATE_DIR_ENV, default_state_dir

    monkeypatch.delenv(STATE_DIR_ENV, raising=False)
    main(["--root", str(tmp_path), "list", "rec"])
    assert default_state_dir() == tmp_path / "var/lib/pvebackup"
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "mine"))
    main(["--root", str(tmp_path), "list", "rec"])
    assert default_state_dir() == tmp_path / "mine"
