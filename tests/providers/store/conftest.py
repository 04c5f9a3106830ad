"""Fixtures for the backup-store provider tests (helpers live in bstore_support)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from bstore_support import CHUNK, FakeHost


@pytest.fixture(autouse=True)
def short_tempdir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Temp files (nbdkit's socket dir) under pytest's tree, with short socket paths."""
    short = tmp_path_factory.mktemp("t")
    monkeypatch.setattr(tempfile, "tempdir", str(short))
    return short


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path, {"type": "backup-store", "path": str(tmp_path / "store"),
                               "chunk-size": str(CHUNK)})  # fmt: skip
