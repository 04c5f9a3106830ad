"""Fixtures of the bridge tests: helper processes that are always stopped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from bridge_client import Helper


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Helper]]:
    """``spawn(prefix=None)`` starts a helper; all are killed (by PID) at the end."""
    started: list[Helper] = []

    def start(prefix: list[str] | None = None) -> Helper:
        helper = Helper(tmp_path / f"helper{len(started)}.stderr", prefix)
        started.append(helper)
        return helper

    yield start
    for helper in started:
        helper.close()


@pytest.fixture
def dir_store(tmp_path: Path) -> dict[str, object]:
    """hello params of a backup-dir storage under tmp_path."""
    path = tmp_path / "storage"
    path.mkdir()
    return {
        "storeid": "bdir",
        "plugin-type": "backup-dir",
        "scfg": {"path": str(path)},
        "state-dir": str(tmp_path / "state"),
    }
