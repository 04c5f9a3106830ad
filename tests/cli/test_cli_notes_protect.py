"""``protect``/``unprotect``/``notes``, and what ``list``/``remove``/``prune`` make of them,
on both providers; the sidecars as hostile input."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from pvebackup.api.types import GuestType
from pvebackup.cli.main import main
from pvebackup.providers.directory.volumes import BackupIndex, VolumeName
from pvebackup.store.backends.local import LocalBackend
from pvebackup.store.datastore import Datastore
from pvebackup.store.snapshot import SnapshotId

CS = 64 * 1024
T0 = 1795685400
SECRET = "host secret\n"


@dataclass
class Setup:
    root: Path
    storeid: str
    volnames: list[str]
    sidecar_dir: Callable[[str], Path]  # volname -> where its sidecars live

    def volid(self, n: int) -> str:
        return f"{self.storeid}:{self.volnames[n]}"


def _store(tmp_path: Path) -> Setup:
    path = tmp_path / "st"
    Datastore.create(LocalBackend(path), chunk_size=CS)
    sids = [SnapshotId(GuestType.QEMU, 100, t) for t in (T0, T0 + 60)]
    for sid in sids:
        store = Datastore.open(LocalBackend(path))
        with store.new_snapshot(sid, chunk_size=CS) as w:
            with w.index_writer("drive-scsi0", CS) as iw:
                iw.set(0, store.insert_chunk(os.urandom(CS)).digest)
        store.close()
    root = _root(tmp_path, f"backup-store: st\n\tpath {path}\n")

    def where(volname: str) -> Path:
        return path / SnapshotId.from_volname(volname).prefix

    return Setup(root, "st", [s.volname for s in sids], where)


def _dir(tmp_path: Path) -> Setup:
    path = tmp_path / "bd"
    volnames = []
    for t in (T0, T0 + 60):
        name = VolumeName(GuestType.LXC, 100, t)
        directory = path / "backup" / name.dirname
        directory.mkdir(parents=True)
        index = BackupIndex(vmid=100, vmtype=GuestType.LXC, ctime=t, ct_format="tar")
        (directory / "index.json").write_text(index.to_json())
        volnames.append(str(name))
    root = _root(tmp_path, f"backup-dir: bd\n\tpath {path}\n")

    def where(volname: str) -> Path:
        return path / "backup" / VolumeName.parse(volname).dirname

    return Setup(root, "bd", volnames, where)


def _root(tmp_path: Path, section: str) -> Path:
    root = tmp_path / "node"
    (root / "etc" / "pve").mkdir(parents=True)
    (root / "etc" / "pve" / "storage.cfg").write_text(
        f"{section}\ndir: local\n\tpath {tmp_path / 'vz'}\n"
    )
    return root


@pytest.fixture(params=["backup-store", "backup-dir"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Setup:
    return _store(tmp_path) if request.param == "backup-store" else _dir(tmp_path)


def _run(s: Setup, *args: str) -> int:
    return main(["--root", str(s.root), *args])


def _listing(s: Setup, capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, object]]:
    capsys.readouterr()
    assert _run(s, "list", s.storeid, "--output", "json") == 0
    return {v["volid"]: v for v in json.loads(capsys.readouterr().out)}


def test_protected_backup_survives_remove_and_prune(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    s, old, new = setup, setup.volid(0), setup.volid(1)
    assert _run(s, "protect", old) == 0
    assert _listing(s, capsys)[old]["protected"] is True
    assert _listing(s, capsys)[new]["protected"] is False
    assert _run(s, "remove", old) == 7
    assert "is protected" in capsys.readouterr().err
    assert _run(s, "prune", s.storeid, "--keep-last", "1", "--output", "json") == 0
    marks = {v["volid"]: v for v in json.loads(capsys.readouterr().out)["volumes"]}
    assert marks[old]["mark"] == "protected" and not marks[old]["removed"]
    assert marks[new]["mark"] == "keep"
    assert set(_listing(s, capsys)) == {old, new}
    # keep-last 1 is used by the newer backup: the protected one took no slot
    assert _run(s, "unprotect", old, "--output", "json") == 0
    assert json.loads(capsys.readouterr().out) == {"volid": old, "protected": False}
    assert _run(s, "prune", s.storeid, "--keep-last", "1") == 0
    assert set(_listing(s, capsys)) == {new}


def test_notes_set_show_list_and_remove(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    s, vol = setup, setup.volid(1)
    assert _run(s, "notes", vol, "--set", "weekly\nbefore the upgrade") == 0
    capsys.readouterr()
    assert _run(s, "notes", vol) == 0
    assert capsys.readouterr().out == "weekly\nbefore the upgrade\n"
    assert _listing(s, capsys)[vol]["notes"] == "weekly\nbefore the upgrade"
    assert _run(s, "list", s.storeid) == 0
    out = capsys.readouterr().out
    assert "NOTES" in out and "weekly" in out and "before the upgrade" not in out
    assert _run(s, "notes", vol, "--set", "") == 0
    assert _listing(s, capsys)[vol]["notes"] == ""
    assert not (s.sidecar_dir(s.volnames[1]) / "notes").exists()


def test_notes_usage_and_missing_volume_exit_codes(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    s = setup
    assert _run(s, "notes", s.volid(0), "--set", "\x1b]0;owned\x07") == 2
    assert _run(s, "notes", s.volid(0), "--set", "x" * (64 * 1024 + 1)) == 2
    missing = f"{s.storeid}:backup/vm-100-2020-01-01T00:00:00Z"
    for args in (["notes", missing], ["notes", missing, "--set", "x"], ["protect", missing]):
        assert _run(s, *args) == 3, args
    assert _run(s, "protect", f"{s.storeid}:../../etc") in (2, 3)
    # a plain dir storage holds no backups: notes are not supported there
    assert _run(s, "protect", "local:backup/vm-100-2020-01-01T00:00:00Z") == 4
    assert "not supported" in capsys.readouterr().err


def test_hostile_notes_sidecar_never_reaches_the_terminal(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    s, vol = setup, setup.volid(0)
    notes = s.sidecar_dir(s.volnames[0]) / "notes"
    # Hostile input: escape sequences (retitle, clear screen, C1 CSI, bidi override).
    notes.write_text("ok\x1b]0;owned\x07\x1b[2J\u009b31m\u202eevil")
    assert _run(s, "notes", vol) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "evil" in out
    assert not any(c in out for c in "\x1b\x07\u009b\u202e")
    assert _run(s, "list", s.storeid) == 0
    out = capsys.readouterr().out
    assert "evil" in out and not any(c in out for c in "\x1b\x07\u009b\u202e")
    assert _run(s, "list", s.storeid, "--output", "json") == 0
    assert "\x1b" not in capsys.readouterr().out  # JSON escapes it


@pytest.mark.parametrize("kind", ["oversized", "binary", "symlink", "fifo"])
def test_unreadable_notes_sidecar_is_named_and_does_not_break_the_listing(
    setup: Setup, capsys: pytest.CaptureFixture[str], tmp_path: Path, kind: str
) -> None:
    s, vol = setup, setup.volid(0)
    notes = s.sidecar_dir(s.volnames[0]) / "notes"
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    if kind == "oversized":
        notes.write_bytes(b"a" * (64 * 1024 + 1))
    elif kind == "binary":
        notes.write_bytes(b"\xff\xfe\x00\x01binary")
    elif kind == "symlink":
        notes.symlink_to(secret)  # Hostile input: a link to a host file
    else:
        os.mkfifo(notes)  # a reader that opened it would hang
    capsys.readouterr()
    code = _run(s, "notes", vol)
    assert code in (5, 8), code  # damaged (5) or unsafe storage content (8)
    out, err = capsys.readouterr()
    assert "host secret" not in out + err and "notes" in err
    listing = _listing(s, capsys)
    assert listing[vol]["notes"] == "" and len(listing) == 2
    # Setting notes replaces what is there, never writes through it.
    if kind != "fifo" or s.storeid == "bd":
        assert _run(s, "notes", vol, "--set", "fresh") == 0
        assert secret.read_text() == SECRET
        assert not notes.is_symlink() and notes.read_text() == "fresh"


def test_symlinked_protected_sidecar_counts_as_protected(
    setup: Setup, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    s, vol = setup, setup.volid(0)
    target = tmp_path / "target"
    target.write_text(SECRET)
    (s.sidecar_dir(s.volnames[0]) / "protected").symlink_to(target)
    assert _listing(s, capsys)[vol]["protected"] is True
    assert _run(s, "remove", vol) == 7  # fails safe: kept
    assert _run(s, "unprotect", vol) == 0
    assert target.read_text() == SECRET  # the link went, not its target
    assert _run(s, "remove", vol) == 0
