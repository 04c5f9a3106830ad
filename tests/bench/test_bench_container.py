"""The container benchmark's tree: deterministic, mixed, with links, mapped owners."""

from __future__ import annotations

import os
from pathlib import Path

from bench.container import change_tree, make_tree


def _snapshot(root: Path) -> dict[str, tuple[int, int, bytes | str]]:
    out: dict[str, tuple[int, int, bytes | str]] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        body: bytes | str = os.readlink(p) if p.is_symlink() else (
            p.read_bytes() if p.is_file() else "")
        out[str(p.relative_to(root))] = (st.st_uid, st.st_mode, body)
    return out


def test_tree_is_deterministic_and_mixed(tmp_path: Path) -> None:
    data = make_tree(tmp_path / "a", 600)
    assert make_tree(tmp_path / "b", 600) == data > 0
    assert _snapshot(tmp_path / "a") == _snapshot(tmp_path / "b")
    files = [p for p in (tmp_path / "a").rglob("f*")]
    assert len(files) == 600
    assert any(p.is_symlink() for p in files)
    assert any(p.lstat().st_nlink > 1 for p in files if not p.is_symlink())
    assert all(100000 <= p.lstat().st_uid < 100003 for p in files)


def test_change_touches_about_one_percent(tmp_path: Path) -> None:
    make_tree(tmp_path / "a", 600)
    before = _snapshot(tmp_path / "a")
    change_tree(tmp_path / "a")
    after = _snapshot(tmp_path / "a")
    changed = [k for k in before if before[k] != after[k]]
    assert 1 <= len(changed) <= 12
