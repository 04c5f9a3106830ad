"""The plugin registry: built-in dir, register/unregister, real entry points."""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import ClassVar

import pytest

from pvebackup.api.errors import PluginError, PluginNotFoundError, PluginVersionError
from pvebackup.storage import (
    ENTRY_POINT_GROUP,
    DirPlugin,
    StoragePlugin,
    lookup,
    plugin_types,
    register,
    registered,
    unregister,
)

InstallPlugin = Callable[[str, str, str], Path]  # the install_plugin fixture

GOOD_PLUGIN = """
from pvebackup.storage import StoragePlugin

class GoodPlugin(StoragePlugin):
    type = "{type}"
    api_version = {version}
"""


def test_builtin_dir_is_there() -> None:
    plugin = lookup("dir")
    assert isinstance(plugin, DirPlugin)
    assert lookup("dir") is plugin  # one instance per type
    assert "dir" in plugin_types()


def test_unknown_type_lists_the_known_ones() -> None:
    with pytest.raises(PluginNotFoundError) as info:
        lookup("nosuch")
    assert "'nosuch'" in str(info.value)
    assert "known types: " in str(info.value) and "dir" in str(info.value)


class Mine(StoragePlugin):
    type: ClassVar[str] = "mine"


class Old(StoragePlugin):
    type: ClassVar[str] = "old"
    api_version: ClassVar[int] = 8


class TooNew(StoragePlugin):
    type: ClassVar[str] = "toonew"
    api_version: ClassVar[int] = 12


class Oldest(StoragePlugin):
    type: ClassVar[str] = "oldest"
    api_version: ClassVar[int] = 9


def test_register_lookup_unregister() -> None:
    plugin = register(Mine)
    try:
        assert lookup("mine") is plugin
        assert "mine" in plugin_types()
    finally:
        unregister("mine")
    with pytest.raises(PluginNotFoundError):
        lookup("mine")


def test_registered_context_manager_undoes_even_on_error() -> None:
    with pytest.raises(RuntimeError), registered(Mine) as plugin:
        assert lookup("mine") is plugin
        raise RuntimeError("x")
    assert "mine" not in plugin_types()


def test_register_duplicate_type_is_refused() -> None:
    class OtherDir(StoragePlugin):
        type: ClassVar[str] = "dir"

    with pytest.raises(PluginError, match="'dir' is already registered"):
        register(OtherDir)
    assert isinstance(lookup("dir"), DirPlugin)


@pytest.mark.parametrize("cls", [Old, TooNew])
def test_register_checks_the_api_version(cls: type[StoragePlugin]) -> None:
    with pytest.raises(PluginVersionError, match=cls.type):
        register(cls)
    assert cls.type not in plugin_types()


def test_register_accepts_the_oldest_version() -> None:
    with registered(Oldest) as plugin:
        assert plugin.api_version == 9


def test_register_refuses_what_is_not_a_plugin() -> None:
    class NoType(StoragePlugin):
        pass

    with pytest.raises(PluginError, match="does not set 'type'"):
        register(NoType)
    with pytest.raises(PluginError, match="not a StoragePlugin subclass"):
        register(object)  # type: ignore[arg-type]


def test_entry_point_plugin_is_found_and_loaded_once(install_plugin: InstallPlugin) -> None:
    install_plugin(
        "epgood_mod",
        GOOD_PLUGIN.format(type="epgood", version=10),
        "epgood = epgood_mod:GoodPlugin",
    )
    assert "epgood" in plugin_types()
    plugin = lookup("epgood")
    assert type(plugin).__name__ == "GoodPlugin"
    assert plugin.api_version == 10
    assert lookup("epgood") is plugin


def test_entry_points_are_loaded_lazily(install_plugin: InstallPlugin) -> None:
    # a module that would fail on import is not imported until its type is asked for
    install_plugin("eplazy_mod", "raise ImportError('never imported')\n",
                   "eplazy = eplazy_mod:Plugin")
    assert "eplazy" in plugin_types()
    assert isinstance(lookup("dir"), DirPlugin)
    with pytest.raises(PluginError, match="never imported"):
        lookup("eplazy")


@pytest.mark.parametrize(
    ("source", "entry", "exc", "words"),
    [
        ("raise RuntimeError('kaboom')\n", "epbroken = epbroken_mod:GoodPlugin",
         PluginError, ["'epbroken'", "failed to load", "RuntimeError: kaboom"]),
        (GOOD_PLUGIN.format(type="epbroken", version=8), "epbroken = epbroken_mod:GoodPlugin",
         PluginVersionError, ["epbroken", "version 8", "9..11", "too old"]),
        (GOOD_PLUGIN.format(type="epbroken", version=12), "epbroken = epbroken_mod:GoodPlugin",
         PluginVersionError, ["epbroken", "version 12", "9..11", "newer"]),
        (GOOD_PLUGIN.format(type="other", version=11), "epbroken = epbroken_mod:GoodPlugin",
         PluginError, ["entry point name must equal the type"]),
        ("X = 1\n", "epbroken = epbroken_mod:X",
         PluginError, ["not a StoragePlugin subclass", "epbroken = epbroken_mod:X"]),
        ("\n", "epbroken = epbroken_mod:Missing",
         PluginError, ["failed to load", "AttributeError"]),
        (GOOD_PLUGIN.format(type="epbroken", version=11)
         + "    def __init__(self):\n        raise OSError('no socket')\n",
         "epbroken = epbroken_mod:GoodPlugin",
         PluginError, ["failed to initialise", "OSError: no socket"]),
    ],
)
def test_broken_entry_point_is_refused_others_still_work(
    install_plugin: InstallPlugin,
    caplog: pytest.LogCaptureFixture,
    source: str,
    entry: str,
    exc: type[PluginError],
    words: list[str],
) -> None:
    install_plugin("epbroken_mod", source, entry)
    install_plugin("epfine_mod", GOOD_PLUGIN.format(type="epfine", version=11),
                   "epfine = epfine_mod:GoodPlugin")
    with caplog.at_level(logging.ERROR, logger="pvebackup.storage.registry"):
        with pytest.raises(exc) as info:
            lookup("epbroken")
    for word in words:
        assert word in str(info.value)
    assert any("epbroken" in r.getMessage() for r in caplog.records)
    # refused again (same error) without re-importing, and the rest keeps working
    with pytest.raises(exc):
        lookup("epbroken")
    assert lookup("epfine").type == "epfine"
    assert isinstance(lookup("dir"), DirPlugin)


def test_type_offered_by_two_distributions_is_refused(install_plugin: InstallPlugin) -> None:
    install_plugin("eptwin_a", GOOD_PLUGIN.format(type="eptwin", version=11),
                   "eptwin = eptwin_a:GoodPlugin")
    install_plugin("eptwin_b", GOOD_PLUGIN.format(type="eptwin", version=11),
                   "eptwin = eptwin_b:GoodPlugin")
    with pytest.raises(PluginError, match="several entry points"):
        lookup("eptwin")


def test_entry_point_cannot_replace_a_registered_type(
    install_plugin: InstallPlugin, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="pvebackup.storage.registry"):
        install_plugin("epdir_mod", GOOD_PLUGIN.format(type="dir", version=11),
                       "dir = epdir_mod:GoodPlugin")
        plugin_types()
    assert isinstance(lookup("dir"), DirPlugin)
    assert any("ignoring entry point dir" in r.getMessage() for r in caplog.records)


def test_register_refuses_a_type_an_entry_point_provides(install_plugin: InstallPlugin) -> None:
    install_plugin("eptaken_mod", GOOD_PLUGIN.format(type="eptaken", version=11),
                   "eptaken = eptaken_mod:GoodPlugin")

    class Taken(StoragePlugin):
        type: ClassVar[str] = "eptaken"

    with pytest.raises(PluginError, match="already registered"):
        register(Taken)


def test_group_name() -> None:
    assert ENTRY_POINT_GROUP == "pvebackup.storage_plugins"


def test_every_installed_entry_point_loads() -> None:
    # the project's own plugins (pyproject.toml) come through the same group
    names = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    for name in sorted(names - {"dir"}):
        plugin = lookup(name)
        assert plugin.type == name
        assert name in plugin_types()
