"""Fixtures for the backup-dir provider tests: a provider, qemu-nbd exports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from bdir_helpers import STOREID, LogRecords, NbdExports

from pvebackup.providers.directory.plugin import BackupDirPlugin
from pvebackup.providers.directory.provider import BackupDirProvider


@pytest.fixture
def logs() -> LogRecords:
    return []


@pytest.fixture
def storage_path(tmp_path: Path) -> Path:
    path = tmp_path / "store"
    path.mkdir()
    return path


@pytest.fixture
def make_provider(storage_path: Path, logs: LogRecords) -> Callable[..., BackupDirProvider]:
    """``make_provider(**props)``: a provider on ``storage_path``, logging into ``logs``."""

    def make(**props: str) -> BackupDirProvider:
        scfg = {"type": "backup-dir", "path": str(storage_path), **props}
        provider = BackupDirPlugin().new_backup_provider(
            scfg, STOREID, lambda level, msg: logs.append((level, msg))
        )
        assert isinstance(provider, BackupDirProvider)
        return provider

    return make


@pytest.fixture
def provider(make_provider: Callable[..., BackupDirProvider]) -> BackupDirProvider:
    return make_provider()


@pytest.fixture
def nbd_exports(tmp_path: Path) -> Iterator[NbdExports]:
    exports = NbdExports(tmp_path)
    yield exports
    exports.stop_all()
