"""ROOT/etc/vzdump.conf: the live-backup defaults, and what a malformed file does."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvebackup.api.errors import ConfigError
from pvebackup.host.defaults import JobDefaults, read_job_defaults
from pvebackup.host.guests import NodeRoot


def _conf(tmp_path: Path, text: str | bytes) -> NodeRoot:
    (tmp_path / "etc").mkdir(exist_ok=True)
    path = tmp_path / "etc/vzdump.conf"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return NodeRoot(tmp_path)


def test_no_file_no_defaults(tmp_path: Path) -> None:
    assert read_job_defaults(NodeRoot(tmp_path)) == JobDefaults()


def test_vzdump_keys(tmp_path: Path) -> None:
    root = _conf(
        tmp_path,
        "# vzdump defaults\ntmpdir: /var/tmp\nmode: suspend\nstopwait: 3\n"
        "fleecing: enabled=1,storage=local\n",
    )
    assert read_job_defaults(root) == JobDefaults("suspend", 3.0, "local")
    root = _conf(tmp_path, "fleecing: enabled=0,storage=local\n")
    assert read_job_defaults(root).fleecing_storage is None


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("mode: yolo\n", ":1: mode 'yolo'"),
        ("\n\nstopwait: -5\n", ":3: stopwait"),
        ("stopwait: nan\n", ":1: stopwait"),
        ("no colon here\n", ":1: cannot parse"),
        ("fleecing: enabled=1\n", "names no storage"),
        (b"mode: \xff\n", "cannot read"),
        ("# big\n" + "x: y\n" * 300_000, "cannot read"),
    ],
)
def test_malformed_files_fail_naming_file_and_line(
    tmp_path: Path, text: str | bytes, where: str
) -> None:
    with pytest.raises(ConfigError) as err:
        read_job_defaults(_conf(tmp_path, text))
    assert "vzdump.conf" in str(err.value) and where in str(err.value)



def test_every_vzdump_key_as_proxmox_writes_it(tmp_path: Path) -> None:
    root = _conf(
        tmp_path,
        "# vzdump default settings\n"
        "  storage: rec  \n"
        "bwlimit: 4096\n"
        "exclude-path: /tmp/?* '/var/a b'\n"
        'exclude-path: "/srv/x y"\n'
        "prune-backups: keep-daily=7,keep-last=3\n"
        "notes-template: {{guestname}} on {{node}}\n"
        "mailto: root@example.com; ops@example.com,backup\n"
        "mailnotification: failure\n"
        "notification-mode: legacy-sendmail\n"
        "performance: max-workers=8,pbs-entries-max=2000000\n"
        "fleecing: 1,storage=local\n"
        "tmpdir: /var/tmp\nionice: 7\n",
    )
    d = read_job_defaults(root)
    assert d.storage == "rec" and d.bwlimit_kib == 4096
    # PVE's split_args: shell quoting, several lines accumulate
    assert d.exclude_paths == ("/tmp/?*", "/var/a b", "/srv/x y")
    assert d.prune_backups == "keep-last=3,keep-daily=7"
    assert d.notes_template == "{{guestname}} on {{node}}"
    assert d.mailto == ("root@example.com", "ops@example.com", "backup")
    assert d.mail_policy == "failure" and d.notification_mode == "legacy-sendmail"
    assert (d.max_workers, d.pbs_entries_max) == (8, 2_000_000)
    assert d.fleecing_storage == "local"  # "1" is the default key: enabled
    assert d.warnings == ()  # valid PVE settings: no warnings
    assert len(d.notes) == 1 and "performance (max-workers=8" in d.notes[0]


def test_fleecing_storage_without_enabled_stays_off_as_in_pve(tmp_path: Path) -> None:
    d = read_job_defaults(_conf(tmp_path, "fleecing: storage=local\n"))
    assert d.fleecing_storage is None
    assert any("not enabled" in w for w in d.warnings)


def test_unknown_and_ignored_keys_warn_naming_the_line(tmp_path: Path) -> None:
    text = "mode: stop\nfrobnicate: 1\nscript: /x.pl\nmaxfiles: 2\n"
    d = read_job_defaults(_conf(tmp_path, text))
    assert d.mode == "stop"
    assert d.prune_backups == "keep-last=2"  # legacy maxfiles, as PVE 7 read it
    text = "\n".join(d.warnings)
    assert "vzdump.conf:2: unknown key 'frobnicate'" in text
    assert "vzdump.conf:3: 'script' ignored" in text
    assert "vzdump.conf:4: 'maxfiles' is deprecated" in text


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("storage: ../etc\n", ":1: storage '../etc'"),
        ("bwlimit: -1\n", ":1: bwlimit"),
        ("bwlimit: 1e9\n", ":1: bwlimit"),
        ("\nexclude-path: '/unterminated\n", ":2: exclude-path"),
        ("prune-backups: keep-often=3\n", ":1: prune-backups"),
        ("mailto: -oQ/tmp/x\n", ":1: mailto"),
        ("mailto: a@b\nmailnotification: never\n", ":2: mailnotification"),
        ("performance: max-workers=0\n", ":1: performance: max-workers"),
        ("performance: threads=4\n", ":1: performance: unknown"),
        ("fleecing: enabled=maybe,storage=x\n", ":1: fleecing"),
        ("notes-template: " + "x" * 1025 + "\n", ":1: notes-template"),
    ],
)
def test_malformed_values_are_typed_errors_naming_the_line(
    tmp_path: Path, text: str, where: str
) -> None:
    with pytest.raises(ConfigError) as err:
        read_job_defaults(_conf(tmp_path, text))
    assert where in str(err.value)
    assert err.value.exit_code == 2
