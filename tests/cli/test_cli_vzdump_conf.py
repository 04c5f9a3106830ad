"""``pvebackup backup`` with ROOT/etc/vzdump.conf: defaults, command line wins, mail."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from recording_provider import RecordingPlugin, read_calls
from sample_node import MiB, Node

from pvebackup.cli.main import main
from pvebackup.host import mail
from pvebackup.kit.units import format_bytes

pytestmark = pytest.mark.e2e


def run(node: Node, *args: str) -> int:
    return main(["--root", str(node.path), *args])


def _vzdump_conf(node: Node, text: str) -> None:
    (node.path / "etc").mkdir(exist_ok=True)
    (node.path / "etc/vzdump.conf").write_text(text)


def _fake_sendmail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int = 0) -> Path:
    """A sendmail on PATH that records its argv and its input under tmp_path."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "mails"
    record.mkdir()
    script = bindir / "sendmail"
    script.write_text(
        "#!/bin/sh\n"
        f'n=$(ls {record} | wc -l)\n'
        f'printf "%s\\n" "$@" > {record}/$n.argv\n'
        f"cat > {record}/$n.msg\n"
        f"exit {code}\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return record


def test_backup_all_with_no_options_takes_vzdump_conf(
    cli_node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_node.add_vm(100, {"scsi0": MiB})
    cli_node.add_ct(101)
    _vzdump_conf(
        cli_node,
        "storage: rec\nbwlimit: 100\nexclude-path: /var/cache/?* '/srv/a b'\n"
        "tmpdir: /var/tmp\n",
    )
    assert run(cli_node, "backup", "--all", "--exclude-path", "/opt/x") == 0
    calls = read_calls(cli_node.backup_dir)
    nbd = [c for c in calls if c[0] == "backup_nbd"]
    assert nbd and all(c[-1] == 100 * 1024 for c in nbd)  # KiB/s -> bytes/s
    (ct,) = [c for c in calls if c[0] == "backup_directory"]
    # vzdump: the file's exclude paths, then the command line's, then stdexcludes
    assert ct[4] == [
        "/var/cache/?*", "/srv/a b", "/opt/x", "/tmp/?*", "/var/tmp/?*", "/var/run/?*.pid"
    ]
    assert ct[6] == 100 * 1024
    assert "tmpdir" not in capsys.readouterr().err  # a known PVE key: no warning


def test_command_line_wins_over_vzdump_conf(cli_node: Node) -> None:
    cli_node.add_vm(100, {"scsi0": MiB})
    _vzdump_conf(cli_node, "storage: nosuch\nbwlimit: 100\n")
    assert run(cli_node, "backup", "100", "--storage", "rec", "--bwlimit", "0") == 0
    (nbd,) = [c for c in read_calls(cli_node.backup_dir) if c[0] == "backup_nbd"]
    assert nbd[-1] is None  # 0: unlimited, as vzdump


def test_no_storage_anywhere_is_a_usage_error(
    cli_node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_node.add_vm(100, {"scsi0": MiB})
    assert run(cli_node, "backup", "100") == 2
    assert "no --storage given and no 'storage:' in vzdump.conf" in capsys.readouterr().err


def test_malformed_vzdump_conf_fails_before_any_backup(
    cli_node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_node.add_vm(100, {"scsi0": MiB})
    _vzdump_conf(cli_node, "storage: rec\n\nbwlimit: fast\n")
    assert run(cli_node, "backup", "--all") == 2
    assert "vzdump.conf:3: bwlimit 'fast'" in capsys.readouterr().err
    assert not (cli_node.backup_dir / "calls.jsonl").exists()


def test_unknown_key_warns_and_the_job_runs(
    cli_node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_node.add_vm(100, {"scsi0": MiB})
    _vzdump_conf(cli_node, "storage: rec\nfrobnicate: yes\n")
    assert run(cli_node, "backup", "--all") == 0
    assert "WARN:" in (err := capsys.readouterr().err) and "unknown key 'frobnicate'" in err


def test_prune_backups_default_applies_when_storage_has_none(
    cli_node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_node.add_vm(100, {"scsi0": MiB})
    _vzdump_conf(cli_node, "storage: rec\nprune-backups: keep-last=1\n")
    for _ in range(2):
        assert run(cli_node, "backup", "--all") == 0
    capsys.readouterr()
    assert run(cli_node, "list", "rec", "--output", "json") == 0
    assert len(json.loads(capsys.readouterr().out)) == 1


def test_mail_summary_through_sendmail(
    cli_node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = _fake_sendmail(tmp_path, monkeypatch)
    cli_node.add_vm(100, {"scsi0": MiB})
    _vzdump_conf(cli_node, "storage: rec\nmailto: root@example.com,ops@example.com\n")
    assert run(cli_node, "backup", "--all") == 0
    argv = (record / "0.argv").read_text().split("\n")
    assert argv[:4] == ["-i", "--", "root@example.com", "ops@example.com"]
    msg = (record / "0.msg").read_text()
    assert "Subject: vzdump backup status (" in msg and "): backup successful" in msg
    assert "To: root@example.com, ops@example.com" in msg
    assert "rec:qemu-100-000" in msg  # the table
    assert "100: " in msg and "Starting Backup of VM 100" in msg  # the task log


def test_mail_names_guests_by_their_name_and_hostname(
    cli_node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vzdump's "Name" column: the VM's ``name``, the container's ``hostname``."""
    record = _fake_sendmail(tmp_path, monkeypatch)
    cli_node.add_vm(100, {"scsi0": MiB})  # name: vm
    cli_node.add_ct(101)  # hostname: ct101
    _vzdump_conf(cli_node, "storage: rec\nmailto: root\n")
    assert run(cli_node, "backup", "--all") == 0
    rows = {
        line.split()[0]: line.split()[1]
        for line in (record / "0.msg").read_text().splitlines()
        if re.match(r"^10[01] ", line)
    }
    assert rows == {"100": "vm", "101": "ct101"}


def test_mailnotification_failure_mails_only_failures(
    cli_node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = _fake_sendmail(tmp_path, monkeypatch)
    cli_node.add_vm(100, {"scsi0": MiB})
    _vzdump_conf(cli_node, "storage: rec\nmailto: root\nmailnotification: failure\n")
    assert run(cli_node, "backup", "--all") == 0
    assert list(record.iterdir()) == []
    cli_node.set_provider_options(**{"fail-vmid": "100"})
    assert run(cli_node, "backup", "--all") == 11
    msg = (record / "0.msg").read_text()
    assert "backup failed" in msg and "injected failure for 100" in msg


def test_no_sendmail_is_a_clear_note(
    cli_node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty") + os.pathsep + "/usr/bin:/bin")
    monkeypatch.setattr(mail, "_SBIN", ())
    cli_node.add_vm(100, {"scsi0": MiB})
    _vzdump_conf(cli_node, "storage: rec\nmailto: root\n")
    assert run(cli_node, "backup", "--all") == 0
    assert "no sendmail on this node: the job summary was not mailed to root" in (
        capsys.readouterr().err
    )


def test_failing_sendmail_never_fails_the_job(
    cli_node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _fake_sendmail(tmp_path, monkeypatch, code=75)
    cli_node.add_vm(100, {"scsi0": MiB})
    assert run(cli_node, "backup", "--all", "--storage", "rec", "--mailto", "root") == 0
    assert "sendmail exited 75" in capsys.readouterr().err


def test_job_summary_line_agrees_with_the_table(
    cli_node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_node.add_vm(100, {"scsi0": MiB})
    cli_node.add_ct(101)
    assert run(cli_node, "backup", "--all", "--storage", "rec") == 0
    out, err = capsys.readouterr()
    sizes = [line.split()[4:6] for line in out.splitlines()[1:]]
    assert run(cli_node, "backup", "--all", "--storage", "rec", "--output", "json") == 0
    out, err = capsys.readouterr()
    total = sum(g["size"] for g in json.loads(out)["guests"])
    m = re.search(r"backup job finished successfully \(2 guests, ([^,]+), \d\d:\d\d:\d\d\)", err)
    assert m and m.group(1) == format_bytes(total)
    assert len(sizes) == 2 and all(len(s) == 2 for s in sizes)
    assert "\x1b[" not in err  # not a terminal: no bar, plain lines


def test_a_job_that_fails_as_a_whole_is_mailed_too(
    cli_node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = _fake_sendmail(tmp_path, monkeypatch)
    cli_node.add_vm(100, {"scsi0": MiB})
    cli_node.set_provider_options(**{"fail-job-start": "1"})
    _vzdump_conf(cli_node, "storage: rec\nmailto: root\nmailnotification: failure\n")
    assert run(cli_node, "backup", "--all") != 0
    msg = (record / "0.msg").read_text()
    assert "): backup failed: " in msg


def test_notes_template_of_vzdump_conf_is_applied_and_checked(
    cli_node: Node, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    notes: dict[str, object] = {}

    def update(
        self: RecordingPlugin, scfg: object, storeid: str, volname: str, attribute: str,
        value: object,
    ) -> None:
        notes[volname] = value

    monkeypatch.setattr(RecordingPlugin, "update_volume_attribute", update, raising=False)
    cli_node.add_vm(100, {"scsi0": MiB})
    _vzdump_conf(cli_node, "storage: rec\nnotes-template: {{vmid}} nightly\n")
    assert run(cli_node, "backup", "--all") == 0
    assert notes == {"qemu-100-000": "100 nightly"}
    # the command line wins
    assert run(cli_node, "backup", "--all", "--notes-template", "manual") == 0
    assert notes["qemu-100-001"] == "manual"
    # a template Proxmox VE refuses fails the job before it starts, naming the line
    _vzdump_conf(cli_node, "storage: rec\n\nnotes-template: {{secret}}\n")
    capsys.readouterr()
    assert run(cli_node, "backup", "--all") == 2
    assert "vzdump.conf:3: notes-template:" in capsys.readouterr().err
