"""StoragePlugin base, VolumeInfo, and the module-level new_backup_provider."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import pytest

from pvebackup.api import BackupProvider, GuestType, LogFunction
from pvebackup.api.errors import PluginNotFoundError, StorageNotFoundError, UnsupportedError
from pvebackup.storage import (
    APIVER,
    COMMON_PROPERTIES,
    PropertySpec,
    StoragePlugin,
    VolumeInfo,
    new_backup_provider,
    parse_storage_config,
    registered,
    unregister,
)


class ExampleProvider(BackupProvider):
    def provider_name(self) -> str:
        return "example"


class ProviderPlugin(StoragePlugin):
    type: ClassVar[str] = "example"
    properties: ClassVar[Mapping[str, PropertySpec]] = {
        **COMMON_PROPERTIES,
        "path": PropertySpec(required=True),
    }

    def new_backup_provider(
        self, scfg: Mapping[str, str], storeid: str, log_function: LogFunction
    ) -> BackupProvider | None:
        log_function("info", f"provider for {storeid}")
        return ExampleProvider(self, scfg, storeid, log_function)


class Bare(StoragePlugin):
    type: ClassVar[str] = "bare"


def test_base_defaults() -> None:
    plugin = Bare()
    assert Bare.api_version == APIVER == 11
    assert set(Bare.properties) == {"content", "disable", "nodes", "shared"}
    assert Bare.properties["disable"].flag and not Bare.properties["nodes"].flag
    assert plugin.new_backup_provider({"type": "bare"}, "b1", lambda lv, m: None) is None
    for call in (
        lambda: plugin.list_volumes({}, "b1"),
        lambda: plugin.free_volume({}, "b1", "v"),
    ):
        with pytest.raises(UnsupportedError, match="storage type bare does not hold backups"):
            call()
    with pytest.raises(UnsupportedError, match="holds no guest images"):
        plugin.image_path({}, "1/x")
    assert "bare" in repr(plugin)


def test_provider_plugin_without_listing_says_so() -> None:
    """A plugin with a provider holds backups: the error names what it lacks."""
    plugin = ProviderPlugin()
    with pytest.raises(UnsupportedError, match="^plugin example does not implement listing$"):
        plugin.list_volumes({}, "e1")
    with pytest.raises(UnsupportedError, match="does not implement listing"):
        plugin.scan_volumes({}, "e1")
    with pytest.raises(UnsupportedError, match="^plugin example does not implement removal$"):
        plugin.free_volume({}, "e1", "v")


def test_volume_info_to_json() -> None:
    info = VolumeInfo(
        volid="bk:backup/vm/100/1700000000",
        vmid=100,
        vmtype=GuestType.QEMU,
        ctime=1700000000,
        size=4096,
        format="pvebackup-dir",
        parent="backup/vm/100/1690000000",
        virtual_size=1 << 30,
        comment="incremental",
    )
    data = info.to_json()
    assert data == {
        "volid": "bk:backup/vm/100/1700000000",
        "vmid": 100,
        "vmtype": "qemu",
        "ctime": 1700000000,
        "size": 4096,
        "virtual-size": 1 << 30,
        "format": "pvebackup-dir",
        "parent": "backup/vm/100/1690000000",
        "notes": "",
        "comment": "incremental",
        "protected": False,
        "verify": None,
    }
    assert type(data["vmtype"]) is str
    verified = dataclasses.replace(info, protected=True, verify_state="ok", verify_time=5)
    assert verified.to_json()["verify"] == {"state": "ok", "time": 5}
    json.dumps(data)
    with pytest.raises(AttributeError):
        info.size = 1  # type: ignore[misc]
    assert VolumeInfo("a:b", 1, GuestType.LXC, 0, 0, "tar").parent is None


def test_new_backup_provider_delegates_to_the_plugin(tmp_path: Path) -> None:
    lines: list[tuple[str, str]] = []

    def log(level: str, message: str) -> None:
        lines.append((level, message))

    text = f"dir: local\n\tpath {tmp_path}\n\nexample: bk\n\tpath {tmp_path}/bk\n"
    with registered(ProviderPlugin) as plugin:
        cfg = parse_storage_config(text)
        provider = new_backup_provider(cfg, "bk", log)
        assert isinstance(provider, ExampleProvider)
        assert provider.storage_plugin is plugin
        assert provider.storeid == "bk"
        assert dict(provider.scfg) == {"type": "example", "path": f"{tmp_path}/bk"}
        assert lines == [("info", "provider for bk")]
        provider.log("warn", "hello")
        assert lines[-1] == ("warn", "hello")
        # a plain storage has no provider
        assert new_backup_provider(cfg, "local", log) is None
        with pytest.raises(StorageNotFoundError) as info:
            new_backup_provider(cfg, "nope", log)
        assert "'nope'" in str(info.value) and "local, bk" in str(info.value)


def test_new_backup_provider_when_the_type_went_away(tmp_path: Path) -> None:
    with registered(ProviderPlugin):
        cfg = parse_storage_config(f"example: bk\n\tpath {tmp_path}\n")
    try:
        with pytest.raises(PluginNotFoundError, match="'example'"):
            new_backup_provider(cfg, "bk", lambda lv, m: None)
    finally:
        unregister("example")
