"""Optional dependencies: absent ones fail with a typed error naming the fix, only
where they are used; the private pip directory is searched after sys.path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pvebackup.api.errors import UnsupportedError
from pvebackup.kit import optdeps


@pytest.fixture
def no_private_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    missing = tmp_path / "nothing-here"
    monkeypatch.setattr(optdeps, "PRIVATE_DIR", str(missing))
    return missing


def test_kit_optdeps_missing_module_is_typed_and_names_the_fix(
    monkeypatch: pytest.MonkeyPatch, no_private_dir: Path
) -> None:
    monkeypatch.setitem(sys.modules, "pyfastcdc", None)  # import raises ImportError
    with pytest.raises(UnsupportedError, match=r"container archive.*pip install --target"):
        optdeps.require("pyfastcdc", "a container archive in a backup-store")
    assert not optdeps.available("pyfastcdc")


def test_kit_optdeps_private_dir_is_searched_after_sys_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    private = tmp_path / "private"
    private.mkdir()
    (private / "pvebackup_optdeps_probe.py").write_text("VALUE = 42\n")
    monkeypatch.setattr(optdeps, "PRIVATE_DIR", str(private))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "pvebackup_optdeps_probe", raising=False)
    assert optdeps.require("pvebackup_optdeps_probe", "a test").VALUE == 42
    assert sys.path[-1] == str(private)


def test_kit_optdeps_no_bar_without_rich(
    monkeypatch: pytest.MonkeyPatch, no_private_dir: Path
) -> None:
    from pvebackup.host import progress

    class Tty:
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("TERM", "xterm")
    assert progress.wants_bar(Tty())  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "rich", None)
    assert not progress.wants_bar(Tty())  # type: ignore[arg-type]


def test_kit_optdeps_cdc_sink_without_pyfastcdc(
    monkeypatch: pytest.MonkeyPatch, no_private_dir: Path
) -> None:
    from pvebackup.providers.store.cdc import CdcSink

    monkeypatch.setitem(sys.modules, "pyfastcdc", None)
    with pytest.raises(UnsupportedError, match="pyfastcdc"):
        CdcSink(None, None)  # type: ignore[arg-type]
