"""Fixtures for the whole suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvebackup.kit.hoststate import STATE_DIR_ENV


@pytest.fixture(autouse=True)
def host_state_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Providers keep their host-side state per test, never in the real /var/lib."""
    path = tmp_path_factory.mktemp("hoststate")
    monkeypatch.setenv(STATE_DIR_ENV, str(path))
    return path
