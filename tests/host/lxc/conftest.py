"""Fixtures of the pvebackup.host.lxc tests (helpers live in lxc_fixtures.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxc_fixtures import LogRecorder, make_container_tree


@pytest.fixture
def container_tree(tmp_path: Path) -> Path:
    return make_container_tree(tmp_path / "ct")


@pytest.fixture
def log() -> LogRecorder:
    return LogRecorder()
