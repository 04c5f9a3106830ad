"""`pvebackup list`/`remove` on a plugin that has a provider but no listing."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import pytest

from pvebackup.api import BackupProvider, LogFunction
from pvebackup.cli.main import main
from pvebackup.storage import COMMON_PROPERTIES, PropertySpec, StoragePlugin, registry


class NoListPlugin(StoragePlugin):
    type: ClassVar[str] = "no-list"
    properties: ClassVar[Mapping[str, PropertySpec]] = {**COMMON_PROPERTIES}

    def new_backup_provider(
        self, scfg: Mapping[str, str], storeid: str, log_function: LogFunction
    ) -> BackupProvider:
        return BackupProvider(self, scfg, storeid, log_function)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["list", "nl"], "error: plugin no-list does not implement listing"),
        (["remove", "nl:vm-100"], "error: plugin no-list does not implement removal"),
    ],
)
def test_plugin_without_listing_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    pve = tmp_path / "etc/pve"
    pve.mkdir(parents=True)
    (pve / "storage.cfg").write_text("no-list: nl\n")
    with registry.registered(NoListPlugin):
        code = main(["--root", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert err.startswith(message), err
    assert "does not hold backups" not in err
    assert code == 4  # UnsupportedError
