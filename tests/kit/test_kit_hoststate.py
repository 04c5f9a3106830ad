"""kit.hoststate: private, atomic state files; damage is reported, never raised."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pvebackup.api.errors import StateError
from pvebackup.kit.hoststate import DEFAULT_STATE_DIR, STATE_DIR_ENV, HostState, default_state_dir


def test_default_dir_and_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(STATE_DIR_ENV, raising=False)
    assert default_state_dir() == DEFAULT_STATE_DIR == Path("/var/lib/pvebackup")
    monkeypatch.setenv(STATE_DIR_ENV, "")
    assert default_state_dir() == DEFAULT_STATE_DIR
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path))
    assert HostState("backup-dir", "s").dir == tmp_path / "backup-dir" / "s"


def test_write_read_modes(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        state = HostState("backup-store", "store1", tmp_path / "var/lib/pvebackup")
        state.write("vm-100", {"a": 1})
    finally:
        os.umask(old)
    assert state.read("vm-100").doc == {"a": 1}
    assert state.path("vm-100").stat().st_mode & 0o777 == 0o600
    assert state.dir.stat().st_mode & 0o777 == 0o700
    assert state.dir.parent.stat().st_mode & 0o777 == 0o700
    state.write("vm-100", {"a": 2})
    assert state.read("vm-100").doc == {"a": 2}
    assert sorted(p.name for p in state.dir.iterdir()) == ["vm-100.json"]  # no temp left


def test_storeid_cannot_climb_out(tmp_path: Path) -> None:
    for storeid in ("../../etc", "..", "a/b", ".hidden", "x" * 300):
        state = HostState("backup-dir", storeid, tmp_path / "s")
        assert state.dir.parent == tmp_path / "s" / "backup-dir"
        assert state.path("../../x").parent == state.dir


def test_missing_and_damaged(tmp_path: Path) -> None:
    state = HostState("p", "s", tmp_path)
    assert state.read("g").missing
    state.write("g", {})
    for content, what in (
        (b"{", "not JSON"),
        (b"\xff", "not JSON"),
        (b"[]", "not an object"),
        (b" " * 70_000, "too big"),
    ):
        state.path("g").write_bytes(content)
        loaded = state.read("g")
        assert loaded.doc is None and not loaded.missing
        assert loaded.problem is not None and what in loaded.problem


def test_symlink_and_directory_are_damage(tmp_path: Path) -> None:
    state = HostState("p", "s", tmp_path)
    state.write("g", {"x": 1})
    (tmp_path / "elsewhere.json").write_text('{"x": 2}')
    state.path("g").unlink()
    state.path("g").symlink_to(tmp_path / "elsewhere.json")
    assert state.read("g").problem is not None
    state.path("g").unlink()
    state.path("g").mkdir()
    assert state.read("g").problem is not None


def test_unwritable_is_a_typed_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    state = HostState("p", "s", tmp_path / "file")
    with pytest.raises(StateError, match="cannot write the host state file"):
        state.write("g", {})
