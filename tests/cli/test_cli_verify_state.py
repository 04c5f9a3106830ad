"""``verify`` records ok/failed and the time beside each backup, ``list`` shows it, and
``--outdated-after`` skips only recent "ok"s, which are advisory: never trusted for more."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli_verify import VOL0, VOL1, _flip
from test_cli_verify import _node as _store_node
from test_cli_verify_dir import T0, _volume
from test_cli_verify_dir import _node as _dir_node

from pvebackup.api.errors import CorruptChunkError
from pvebackup.cli.main import main
from pvebackup.kit.annotations import VerifyState
from pvebackup.store.backends.local import LocalBackend
from pvebackup.store.datastore import Datastore
from pvebackup.store.snapshot import SnapshotId


def _verify_states(root: Path, storeid: str, capsys: pytest.CaptureFixture[str]) -> dict:
    capsys.readouterr()
    assert main(["--root", str(root), "list", storeid, "--output", "json"]) == 0
    return {v["volid"].split(":", 1)[1]: v["verify"] for v in json.loads(capsys.readouterr().out)}


def _forge(path: Path, state: str, time: int) -> None:
    path.write_bytes(VerifyState(state, time).to_bytes())


def test_store_verify_records_and_outdated_after_skips_only_recent_ok(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, path, digests = _store_node(tmp_path)
    assert _verify_states(root, "st", capsys) == {VOL0: None, VOL1: None}
    assert main(["--root", str(root), "verify", "st"]) == 0
    states = _verify_states(root, "st", capsys)
    assert {s["state"] for s in states.values()} == {"ok"}
    assert main(["--root", str(root), "list", "st"]) == 0
    assert "VERIFIED" in capsys.readouterr().out
    # Recent ok: both skipped, nothing read.
    assert main(["--root", str(root), "verify", "st", "--outdated-after", "7"]) == 0
    out = capsys.readouterr().out
    assert f"skipped {VOL0}" in out and f"skipped {VOL1}" in out and "0 chunks" in out
    # Damage in VOL1; its sidecar now a forged "ok" dated in the future: not trusted.
    _flip(path, digests[3])
    _forge(path / SnapshotId.from_volname(VOL1).prefix / "verify-state.json", "ok", 4 * 10**9)
    assert main(["--root", str(root), "verify", "st", "--outdated-after", "7"]) == 5
    out = capsys.readouterr().out
    assert f"skipped {VOL0}" in out and f"failed {VOL1}" in out
    assert _verify_states(root, "st", capsys)[VOL1]["state"] == "failed"
    # A failed one is never skipped.
    assert main(["--root", str(root), "verify", "st", "--outdated-after", "7"]) == 5
    assert f"failed {VOL1}" in capsys.readouterr().out


def test_forged_ok_never_makes_a_read_skip_its_check(tmp_path: Path) -> None:
    """The restore path reads chunks through the same checks, sidecar or not."""
    root, path, digests = _store_node(tmp_path)
    sid = SnapshotId.from_volname(VOL1)
    _forge(path / sid.prefix / "verify-state.json", "ok", 1_800_000_000)
    _flip(path, digests[3])
    store = Datastore.open(LocalBackend(path))
    index = store.open_snapshot(sid).open_index("drive-scsi0")
    with pytest.raises(CorruptChunkError):
        store.read_chunk(index.digest(1), index.extent(1)[1])
    assert main(["--root", str(root), "verify", f"st:{VOL1}"]) == 5


@pytest.mark.e2e
def test_dir_verify_records_failed_and_outdated_after(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _dir_node(tmp_path)
    good, _ = _volume(tmp_path / "bd", T0)
    bad, image = _volume(tmp_path / "bd", T0 + 60)
    assert main(["--root", str(root), "verify", "bd"]) == 0
    states = _verify_states(root, "bd", capsys)
    assert states[good]["state"] == states[bad]["state"] == "ok"
    raw = bytearray(image.read_bytes())
    raw[raw.index(b"\x5a" * 4096) + 100] ^= 0xFF  # Hostile input: a flipped data byte
    image.write_bytes(bytes(raw))
    # Recently ok: skipped (advisory); without the option it is checked and fails.
    assert main(["--root", str(root), "verify", "bd", "--outdated-after", "1"]) == 0
    assert f"skipped {bad}" in capsys.readouterr().out
    assert main(["--root", str(root), "verify", "bd"]) == 5
    assert _verify_states(root, "bd", capsys)[bad]["state"] == "failed"
    # Hostile sidecar (garbage): counts as never verified, checked again.
    (image.parent / "verify-state.json").write_bytes(b"\x00garbage")
    assert _verify_states(root, "bd", capsys)[bad] is None
    assert main(["--root", str(root), "verify", "bd", "--outdated-after", "1"]) == 5


def test_outdated_after_is_validated(tmp_path: Path) -> None:
    root, _path, _d = _store_node(tmp_path)
    for bad in ("-1", "x", "1e9", "9999999"):
        with pytest.raises(SystemExit) as info:
            main(["--root", str(root), "verify", "st", "--outdated-after", bad])
        assert info.value.code == 2


def test_outdated_after_survives_a_snapshot_removed_meanwhile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pvebackup.cli import cmd_verify

    root, path, _d = _store_node(tmp_path)
    read = cmd_verify.store_annotations.read_verify_state

    def pruned_meanwhile(store: Datastore, sid: SnapshotId) -> VerifyState | None:
        if sid.volname == VOL0:  # a prune beside us removes VOL0 after the listing
            Datastore.open(LocalBackend(path)).remove_snapshot(sid)
        return read(store, sid)

    monkeypatch.setattr(cmd_verify.store_annotations, "read_verify_state", pruned_meanwhile)
    assert main(["--root", str(root), "verify", "st", "--outdated-after", "1"]) == 0
    out = capsys.readouterr().out
    assert f"ok     {VOL1}" in out and VOL0 not in out
