"""Which plugin handles which storage ``type``: built-ins plus entry points.

``dir`` is registered here directly. Every other plugin, the project's own
providers included, is a Python entry point in the group
``pvebackup.storage_plugins`` whose *name is the storage type* and whose object is
a :class:`StoragePlugin` subclass::

    [project.entry-points."pvebackup.storage_plugins"]
    backup-dir = "pvebackup.providers.directory:DirectoryBackupPlugin"

This keeps ``storage`` from importing ``providers`` (the layers point down) and
gives third-party plugins the same standing as ours.

Entry points are listed once, on first use, and each is imported only when its
type is looked up, so a broken plugin costs nothing until someone asks for it.
A plugin that fails to import, is not a ``StoragePlugin`` subclass, declares a
different ``type`` than its entry point name, or has an api version outside the
accepted range is refused: its lookup raises a :class:`PluginError` saying why
(and the failure is logged once), while every other type keeps working.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import EntryPoint, entry_points

from pvebackup.api.errors import PluginError, PluginNotFoundError
from pvebackup.storage.btrfs import BtrfsPlugin
from pvebackup.storage.dir import DirPlugin
from pvebackup.storage.lvm import LvmPlugin, LvmThinPlugin
from pvebackup.storage.netfs import CifsPlugin, NfsPlugin
from pvebackup.storage.plugin import StoragePlugin
from pvebackup.storage.pve import other_pve_plugins
from pvebackup.storage.rbd import RbdPlugin
from pvebackup.storage.version import check_api_version
from pvebackup.storage.zfspool import ZfsPoolPlugin

__all__ = [
    "ENTRY_POINT_GROUP",
    "lookup",
    "plugin_types",
    "refresh",
    "register",
    "registered",
    "unregister",
]

ENTRY_POINT_GROUP = "pvebackup.storage_plugins"

_log = logging.getLogger(__name__)

_GUEST_VOLUME_TYPES: tuple[type[StoragePlugin], ...] = (
    DirPlugin, NfsPlugin, CifsPlugin, BtrfsPlugin, LvmPlugin, LvmThinPlugin, ZfsPoolPlugin,
    RbdPlugin,
)  # fmt: skip
_BUILTIN: tuple[type[StoragePlugin], ...] = (
    *_GUEST_VOLUME_TYPES,
    *(p for p in other_pve_plugins() if p.type not in {g.type for g in _GUEST_VOLUME_TYPES}),
)


class _Registry:
    """The process-wide table. Guarded by a lock: lookups may come from threads."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.plugins: dict[str, StoragePlugin] = {}
        self.entry_points: dict[str, list[EntryPoint]] | None = None
        self.refused: dict[str, PluginError] = {}
        self.loaded: set[str] = set()  # types whose plugin came from an entry point

    def discover(self) -> dict[str, list[EntryPoint]]:
        if self.entry_points is None:
            found: dict[str, list[EntryPoint]] = {}
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                if ep.name in self.plugins:
                    _log.warning(
                        "ignoring entry point %s = %s: storage type '%s' is registered",
                        ep.name, ep.value, ep.name,
                    )
                    continue
                found.setdefault(ep.name, []).append(ep)
            self.entry_points = found
        return self.entry_points


_registry = _Registry()


def _describe(cls: type[StoragePlugin]) -> str:
    return f"'{getattr(cls, 'type', '?')}' ({cls.__module__}.{cls.__qualname__})"


def _checked_instance(cls: object, expected_type: str | None) -> StoragePlugin:
    if not isinstance(cls, type) or not issubclass(cls, StoragePlugin):
        raise PluginError(f"{cls!r} is not a StoragePlugin subclass")
    plugin_type = getattr(cls, "type", None)
    if not isinstance(plugin_type, str) or not plugin_type:
        raise PluginError(f"storage plugin {cls.__qualname__} does not set 'type'")
    if expected_type is not None and plugin_type != expected_type:
        raise PluginError(
            f"storage plugin {_describe(cls)} is registered under entry point "
            f"'{expected_type}'; the entry point name must equal the type"
        )
    check_api_version(_describe(cls), cls.api_version)
    return cls()


def _load_entry_point(plugin_type: str, eps: list[EntryPoint]) -> StoragePlugin:
    if len(eps) > 1:
        values = ", ".join(ep.value for ep in eps)
        raise PluginError(
            f"storage type '{plugin_type}' is provided by several entry points: {values}"
        )
    ep = eps[0]
    try:
        obj = ep.load()
    except Exception as exc:  # any import-time failure of foreign code
        raise PluginError(
            f"storage plugin '{plugin_type}' ({ep.value}) failed to load: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    try:
        return _checked_instance(obj, plugin_type)
    except PluginError as exc:
        raise type(exc)(f"{exc} (entry point {plugin_type} = {ep.value})") from exc
    except Exception as exc:  # the plugin's own __init__ failed
        raise PluginError(
            f"storage plugin '{plugin_type}' ({ep.value}) failed to initialise: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def lookup(plugin_type: str) -> StoragePlugin:
    """The plugin instance for storage ``plugin_type`` (one instance per type).

    :raises PluginNotFoundError: no plugin has that type; the message lists the
        known types.
    :raises PluginError: the type's plugin exists but was refused (failed to
        load, bad api version (:class:`PluginVersionError`), type mismatch).
    """
    with _registry.lock:
        plugin = _registry.plugins.get(plugin_type)
        if plugin is not None:
            return plugin
        refused = _registry.refused.get(plugin_type)
        if refused is not None:
            raise refused
        eps = _registry.discover().get(plugin_type)
        if eps is None:
            raise PluginNotFoundError(
                f"no storage plugin for type '{plugin_type}'; known types: "
                + ", ".join(plugin_types())
            )
        try:
            plugin = _load_entry_point(plugin_type, eps)
        except PluginError as exc:
            _log.error("%s", exc)
            _registry.refused[plugin_type] = exc
            raise
        _registry.plugins[plugin_type] = plugin
        _registry.loaded.add(plugin_type)
        return plugin


def register(plugin_cls: type[StoragePlugin]) -> StoragePlugin:
    """Register a plugin class directly (built-ins, tests, embedding programs).

    :returns: the plugin instance that :func:`lookup` will return.
    :raises PluginVersionError: its ``api_version`` is not accepted.
    :raises PluginError: not a ``StoragePlugin`` subclass, or its type is taken
        (by a registered plugin or by an entry point).
    """
    plugin = _checked_instance(plugin_cls, None)
    with _registry.lock:
        if plugin.type in _registry.plugins or plugin.type in _registry.discover():
            raise PluginError(
                f"storage type '{plugin.type}' is already registered; "
                f"refusing {_describe(plugin_cls)}"
            )
        _registry.plugins[plugin.type] = plugin
    return plugin


def unregister(plugin_type: str) -> None:
    """Forget the plugin of ``plugin_type`` (for tests); unknown types are ignored."""
    with _registry.lock:
        _registry.plugins.pop(plugin_type, None)
        _registry.refused.pop(plugin_type, None)
        _registry.loaded.discard(plugin_type)


@contextmanager
def registered(plugin_cls: type[StoragePlugin]) -> Iterator[StoragePlugin]:
    """``with registered(MyPlugin) as plugin:`` registers for the block only."""
    plugin = register(plugin_cls)
    try:
        yield plugin
    finally:
        unregister(plugin.type)


def refresh() -> None:
    """Forget everything found through entry points; the next use scans again.

    Directly registered plugins (and the built-ins) stay.
    """
    with _registry.lock:
        for name in _registry.loaded:
            _registry.plugins.pop(name, None)
        _registry.loaded.clear()
        _registry.entry_points = None
        _registry.refused.clear()


def plugin_types() -> list[str]:
    """Every known storage type, sorted: registered ones and entry point names.

    A type listed here may still be refused by :func:`lookup` when its entry point
    fails to load.
    """
    with _registry.lock:
        return sorted(set(_registry.plugins) | set(_registry.discover()))


for _cls in _BUILTIN:
    # direct insert: registering through register() would list entry points at import
    _registry.plugins[_cls.type] = _checked_instance(_cls, None)
