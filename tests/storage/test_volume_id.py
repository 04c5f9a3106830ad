"""Volume ids (STOREID:VOLNAME) and the path of an image volume."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest

from pvebackup.api.errors import StorageNotFoundError, UnsupportedError, UsageError
from pvebackup.storage import (
    StoragePlugin,
    parse_storage_config,
    parse_volume_id,
    registered,
    volume_path,
)


@pytest.mark.parametrize(
    ("volid", "expected"),
    [
        ("local:100/vm-100-disk-0.qcow2", ("local", "100/vm-100-disk-0.qcow2")),
        ("backup-1:backup/ct/200/2024-01-01T00:00:00Z",
         ("backup-1", "backup/ct/200/2024-01-01T00:00:00Z")),
        ("Store.X:a:b", ("Store.X", "a:b")),
    ],
)
def test_parse_volume_id(volid: str, expected: tuple[str, str]) -> None:
    assert parse_volume_id(volid) == expected


@pytest.mark.parametrize(
    "volid", ["", "local", "local:", ":x", "1local:x", "l:x", "local-:x", "lo cal:x", "local:a\nb"]
)
def test_parse_volume_id_refuses(volid: str) -> None:
    with pytest.raises(UsageError, match="expected STOREID:VOLNAME"):
        parse_volume_id(volid)


CFG = "dir: local\n\tpath {path}\n\nnoimg: remote\n"


class NoImages(StoragePlugin):
    type: ClassVar[str] = "noimg"


def test_volume_path(tmp_path: Path) -> None:
    with registered(NoImages):
        cfg = parse_storage_config(CFG.format(path=tmp_path))
        assert volume_path(cfg, "local:100/vm-100-disk-0.raw") == (
            tmp_path / "images" / "100" / "vm-100-disk-0.raw"
        )
        with pytest.raises(StorageNotFoundError, match="'nas'"):
            volume_path(cfg, "nas:100/vm-100-disk-0.raw")
        with pytest.raises(UnsupportedError, match="noimg holds no guest images"):
            volume_path(cfg, "remote:100/x.raw")
        with pytest.raises(UsageError):
            volume_path(cfg, "local:../../etc/passwd")
