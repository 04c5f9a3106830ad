"""BackupProvider matches the seed one to one; unimplemented methods say whose they are."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from pvebackup.api import BackupProvider, IdMapEntry
from pvebackup.api.errors import PluginError, ProviderNotImplementedError

# Copied from the seed (PVE::BackupProvider::Plugin): every sub and its arguments
# after $self / $class, in order. `new` is the constructor.
SEED_METHODS: dict[str, list[str]] = {
    "new": ["storage_plugin", "scfg", "storeid", "log_function"],
    "provider_name": [],
    "job_start": ["start_time"],
    "job_end": [],
    "job_abort": ["error"],
    "backup_start": ["vmid", "vmtype"],
    "backup_end": ["vmid"],
    "backup_abort": ["vmid", "error"],
    "backup_get_mechanism": ["vmid", "vmtype"],
    "backup_get_target": ["vmid", "vmtype"],
    "backup_get_task_size": ["vmid"],
    "backup_guest_config": ["vmid", "filename"],
    "backup_firewall_config": ["vmid", "filename"],
    "backup_handle_log_file": ["vmid", "filename"],
    "backup_nbd": [
        "vmid", "devicename", "nbd_path", "bitmap_mode", "bitmap_name", "bandwidth_limit",
    ],
    "backup_directory": [
        "vmid", "directory", "id_map", "exclude_paths", "sources", "bandwidth_limit",
    ],
    "restore_get_mechanism": ["volname", "storeid"],
    "extract_guest_config": ["volname", "storeid"],
    "extract_firewall_config": ["volname", "storeid"],
    "restore_qemu_get_device_info": ["volname", "storeid"],
    "restore_qemu_img_init": ["volname", "storeid", "devicename"],
    "restore_qemu_img_cleanup": ["volname", "storeid", "devicename"],
    "restore_tar_init": ["volname", "storeid"],
    "restore_tar_cleanup": ["volname", "storeid"],
    "restore_directory_init": ["volname", "storeid"],
    "restore_directory_cleanup": ["volname", "storeid"],
}

# Helpers of ours beyond the seed, allowed on the public surface.
EXTRA_PUBLIC = {"log", "restore_file_reader"}
"""``restore_file_reader``: the one optional capability beyond the seed (default: refuse)."""

# Sample arguments per name, so every method can be called.
SAMPLE_ARGS: dict[str, Any] = {
    "start_time": 1700000000,
    "error": "boom",
    "vmid": 100,
    "vmtype": "qemu",
    "filename": "/tmp/x.conf",
    "devicename": "drive-scsi0",
    "nbd_path": "/run/x.sock",
    "bitmap_mode": "none",
    "bitmap_name": None,
    "bandwidth_limit": None,
    "directory": "/tmp/ct",
    "id_map": [],
    "exclude_paths": [],
    "sources": ["."],
    "volname": "backup/vm/100/1",
    "storeid": "bk",
}


def _params(func: Any) -> list[str]:
    params = list(inspect.signature(func).parameters.values())
    assert params[0].name == "self"
    for p in params[1:]:
        assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, (func, p)
    return [p.name for p in params[1:]]


@pytest.mark.parametrize("name", sorted(SEED_METHODS))
def test_method_exists_with_the_seeds_argument_names(name: str) -> None:
    attr = "__init__" if name == "new" else name
    func = getattr(BackupProvider, attr)
    assert callable(func)
    assert _params(func) == SEED_METHODS[name]
    assert func.__doc__ and len(func.__doc__.strip()) > 20


def test_no_public_method_beyond_the_seed() -> None:
    public = {n for n in dir(BackupProvider) if not n.startswith("_")}
    assert public - EXTRA_PUBLIC == set(SEED_METHODS) - {"new"}


def make(cls: type[BackupProvider]) -> BackupProvider:
    return cls(object(), {"type": "x"}, "bk", lambda level, message: None)


class Nameless(BackupProvider):
    pass


class Named(BackupProvider):
    def provider_name(self) -> str:
        return "acme-backup"


CALLABLE = sorted(set(SEED_METHODS) - {"new", "provider_name"})


@pytest.mark.parametrize("name", CALLABLE)
def test_unimplemented_methods_name_method_and_provider(name: str) -> None:
    provider = make(Named)
    args = [SAMPLE_ARGS[a] for a in SEED_METHODS[name]]
    with pytest.raises(ProviderNotImplementedError) as info:
        getattr(provider, name)(*args)
    assert str(info.value) == f"{name}() is not implemented by acme-backup"
    assert isinstance(info.value, PluginError)
    assert isinstance(info.value, NotImplementedError)
    assert info.value.exit_code == 4


@pytest.mark.parametrize("name", CALLABLE)
def test_without_provider_name_the_class_is_named(name: str) -> None:
    provider = make(Nameless)
    args = [SAMPLE_ARGS[a] for a in SEED_METHODS[name]]
    with pytest.raises(ProviderNotImplementedError, match=f"{name}\\(\\) .* by Nameless$"):
        getattr(provider, name)(*args)


def test_provider_name_unimplemented() -> None:
    with pytest.raises(ProviderNotImplementedError, match="provider_name.*Nameless"):
        make(Nameless).provider_name()


def test_constructor_keeps_its_arguments_and_log_goes_through() -> None:
    lines: list[tuple[str, str]] = []
    plugin = object()
    provider = Named(plugin, {"type": "x", "path": "/p"}, "bk", lambda lv, m: lines.append((lv, m)))
    assert provider.storage_plugin is plugin
    assert provider.scfg == {"type": "x", "path": "/p"}
    assert provider.storeid == "bk"
    provider.log("err", "failed")
    assert lines == [("err", "failed")]


def test_id_map_entry_as_list_is_the_seeds_form() -> None:
    entry = IdMapEntry("u", 0, 100000, 65536)
    assert entry.as_list() == ["u", "0", "100000", "65536"]
    assert IdMapEntry("g", 5, 6, 1).as_list() == ["g", "5", "6", "1"]
