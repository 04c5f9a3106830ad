"""ProviderSpy: records the host's calls only, in order, with results and errors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import pytest

from pvebackup.api import BackupProvider, LogFunction
from pvebackup.api.errors import PluginError, VolumeNotFoundError
from pvebackup.storage import StoragePlugin, registry
from pvebackup.testing import Call, ProviderSpy


class SelfCallingProvider(BackupProvider):
    def restore_qemu_img_init(self, volname: str, storeid: str, devicename: str) -> str:
        self.restore_qemu_img_cleanup(volname, storeid, devicename)  # its own call
        return "/dev/null"

    def restore_qemu_img_cleanup(self, volname: str, storeid: str, devicename: str) -> None:
        pass

    def restore_get_mechanism(self, volname: str, storeid: str) -> tuple[str, str]:  # type: ignore[override]
        raise VolumeNotFoundError(volname)


class SpyPlugin(StoragePlugin):
    type: ClassVar[str] = "spy-test"

    def new_backup_provider(
        self, scfg: Mapping[str, str], storeid: str, log_function: LogFunction
    ) -> BackupProvider:
        return SelfCallingProvider(self, scfg, storeid, log_function)


def test_spy_records_outer_calls_errors_and_runs_hooks() -> None:
    spy = ProviderSpy()
    with registry.registered(SpyPlugin) as plugin, spy.watching("spy-test"):
        provider = plugin.new_backup_provider({}, "s", lambda level, msg: None)
        assert provider is not None
        assert provider.restore_qemu_img_init("v", "s", "d") == "/dev/null"
        with pytest.raises(VolumeNotFoundError):
            provider.restore_get_mechanism("v", "s")

        def fail(call: Call) -> None:
            raise PluginError(f"after {call.name}")

        spy.after["restore_qemu_img_cleanup"] = fail
        with pytest.raises(PluginError, match="after restore_qemu_img_cleanup"):
            provider.restore_qemu_img_cleanup("v", "s", "d")
    # the provider's own cleanup call inside init is not a call of the host
    assert spy.names() == [
        "restore_qemu_img_init",
        "restore_get_mechanism",
        "restore_qemu_img_cleanup",
    ]
    assert spy.calls[0].result == "/dev/null" and spy.calls[0].args == ("v", "s", "d")
    assert isinstance(spy.calls[1].error, VolumeNotFoundError)
    # unwrapped again: a new provider is not watched
    assert "new_backup_provider" not in vars(plugin)
