"""cli.cmd_prune: per-guest retention over list/remove, chains never left without a base."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from sample_node import MiB, Node

from pvebackup.api.errors import PermanentBackendError, VolumeInUseError
from pvebackup.api.types import GuestType
from pvebackup.cli.cmd_prune import prune_volumes
from pvebackup.cli.main import main
from pvebackup.kit.prune import KeepOptions, Mark
from pvebackup.storage import VolumeInfo

DAY = 86400
T0 = int(datetime(2024, 3, 10, 12, tzinfo=UTC).timestamp())


def vol(name: str, day: int, vmid: int = 100, parent: str | None = None) -> VolumeInfo:
    return VolumeInfo(f"s:{name}", vmid, GuestType.QEMU, T0 + day * DAY, 1, "f", parent=parent)


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")


def test_prune_groups_per_guest_and_removes_newest_first() -> None:
    vols = [vol(f"a{d}", d) for d in range(4)] + [vol(f"b{d}", d, vmid=101) for d in range(2)]
    removed: list[str] = []
    results = prune_volumes(vols, KeepOptions(last=1), removed.append)
    assert removed == ["s:a2", "s:a1", "s:b0", "s:a0"]
    kept = {r.volume.volid for r in results if r.mark is Mark.KEEP}
    assert kept == {"s:a3", "s:b1"}


def test_prune_only_the_given_guest() -> None:
    vols = [vol("a0", 0), vol("a1", 1), vol("b0", 0, vmid=101), vol("b1", 1, vmid=101)]
    removed: list[str] = []
    prune_volumes(vols, KeepOptions(last=1), removed.append, vmids=[101])
    assert removed == ["s:b0"]


def test_prune_keeps_a_chain_base_whose_child_stays_and_names_it() -> None:
    # a0 <- a1 (incremental) ; a2 full. keep-last=1 keeps a2 only: a1 goes first, then a0
    vols = [vol("a0", 0), vol("a1", 1, parent="a0"), vol("a2", 2)]
    removed: list[str] = []
    prune_volumes(vols, KeepOptions(last=1), removed.append)
    assert removed == ["s:a1", "s:a0"]
    # keep-daily picks one per day; day 1's a1 kept -> its base a0 must stay
    vols = [vol("a0", 0), vol("a1", 1, parent="a0"), vol("a2", 2)]
    removed = []
    results = prune_volumes(vols, KeepOptions(last=2), removed.append)
    assert removed == []
    base = next(r for r in results if r.volume.volid == "s:a0")
    assert base.mark is Mark.REMOVE and not base.removed and base.reason == "base of s:a1"


def test_prune_dry_run_removes_nothing_and_predicts_the_real_run() -> None:
    vols = [vol("a0", 0), vol("a1", 1, parent="a0"), vol("a2", 2)]
    removed: list[str] = []
    dry = prune_volumes(vols, KeepOptions(last=1), removed.append, dry_run=True)
    assert removed == []
    assert [r.reason for r in dry] == ["", "", ""]
    assert {r.volume.volid for r in dry if r.mark is Mark.REMOVE} == {"s:a0", "s:a1"}


def test_prune_reports_a_provider_refusal_and_a_failure_and_goes_on() -> None:
    vols = [vol("a0", 0), vol("a1", 1), vol("a2", 2), vol("a3", 3)]
    removed: list[str] = []

    def remove(volid: str) -> None:
        if volid == "s:a2":
            raise VolumeInUseError("a later backup depends on it")
        if volid == "s:a1":
            raise PermanentBackendError("disk on fire")
        removed.append(volid)

    results = {r.volume.volid: r for r in prune_volumes(vols, KeepOptions(last=1), remove)}
    assert removed == ["s:a0"]
    assert results["s:a2"].reason == "a later backup depends on it"
    assert results["s:a2"].exit_code == 0
    assert results["s:a1"].exit_code == PermanentBackendError.exit_code != 0


def test_prune_cli_on_the_recording_provider(
    cli_node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_node.add_vm(100, {"scsi0": 1 * MiB})
    for _ in range(3):
        assert main(["--root", str(cli_node.path), "backup", "--storage", "rec", "100"]) == 0
    capsys.readouterr()
    argv = ["--root", str(cli_node.path), "prune", "rec", "--keep-last", "1"]
    assert main([*argv, "--dry-run", "--output", "json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["dry_run"] is True and dry["options"] == "keep-last=1"
    assert [v["mark"] for v in dry["volumes"]].count("remove") == 2
    assert main(["--root", str(cli_node.path), "list", "rec", "--output", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("removed") == 2
    assert main(["--root", str(cli_node.path), "list", "rec", "--output", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1


def test_prune_cli_without_options_keeps_everything(
    cli_node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_node.add_vm(100, {"scsi0": 1 * MiB})
    for _ in range(2):
        assert main(["--root", str(cli_node.path), "backup", "--storage", "rec", "100"]) == 0
    capsys.readouterr()
    assert main(["--root", str(cli_node.path), "prune", "rec"]) == 0
    assert "keep everything" in capsys.readouterr().out
    assert main(["--root", str(cli_node.path), "list", "rec", "--output", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_prune_json_matches_the_doc(cli_node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    from test_cli_json_schemas import documented, keys_of

    cli_node.add_vm(100, {"scsi0": 1 * MiB})
    for _ in range(2):
        assert main(["--root", str(cli_node.path), "backup", "--storage", "rec", "100"]) == 0
    capsys.readouterr()
    argv = ["--root", str(cli_node.path), "prune", "rec", "--keep-last", "1", "--output", "json"]
    assert main(argv) == 0
    assert keys_of(json.loads(capsys.readouterr().out)) == documented()["prune"]


def test_prune_removes_a_parent_where_children_stand_alone() -> None:
    # backup-store: an incremental snapshot does not need its parent to restore
    vols = [vol("a0", 0), vol("a1", 1, parent="a0"), vol("a2", 2, parent="a1")]
    removed: list[str] = []
    prune_volumes(vols, KeepOptions(last=1), removed.append, children_need_parent=False)
    assert removed == ["s:a1", "s:a0"]


def test_only_backup_dir_declares_children_need_parent() -> None:
    from pvebackup.providers.directory.plugin import BackupDirPlugin
    from pvebackup.providers.store.plugin import BackupStorePlugin

    assert BackupDirPlugin.children_need_parent and not BackupStorePlugin.children_need_parent


@pytest.mark.parametrize("plugin_type", ["backup-dir", "backup-store"])
def test_prune_backups_property_parsed_and_refused_when_wrong(plugin_type: str) -> None:
    from pvebackup.api.errors import ConfigError
    from pvebackup.storage import lookup

    plugin = lookup(plugin_type)
    props = plugin.parse_properties(
        {"type": plugin_type, "path": "/x", "prune-backups": "keep-daily=7, keep-last=3"}, "s"
    )
    assert props["prune-backups"] == "keep-last=3,keep-daily=7"
    with pytest.raises(ConfigError, match="keep-forever"):
        plugin.parse_properties(
            {"type": plugin_type, "path": "/x", "prune-backups": "keep-forever=1"}, "s"
        )


def test_backup_prune_backups_prunes_the_backed_up_guest_only(
    cli_node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_node.add_vm(100, {"scsi0": 1 * MiB})
    cli_node.add_vm(101, {"scsi0": 1 * MiB})
    base = ["--root", str(cli_node.path), "backup", "--storage", "rec"]
    for _ in range(2):
        assert main([*base, "101"]) == 0
    capsys.readouterr()
    err = ""
    for _ in range(3):
        assert main([*base, "100", "--prune-backups", "keep-last=2", "--output", "json"]) == 0
        out = capsys.readouterr()
        json.loads(out.out)  # the job's report only, still JSON
        err += out.err
    assert err.count("INFO: prune: removed ") == 1
    assert main(["--root", str(cli_node.path), "list", "rec", "--output", "json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert sorted(v["vmid"] for v in listing) == [100, 100, 101, 101]


def test_backup_prune_backups_malformed_is_a_usage_error(cli_node: Node) -> None:
    cli_node.add_vm(100, {"scsi0": 1 * MiB})
    argv = ["--root", str(cli_node.path), "backup", "--storage", "rec", "100"]
    with pytest.raises(SystemExit) as info:
        main([*argv, "--prune-backups", "keep-last=two"])
    assert info.value.code == 2
