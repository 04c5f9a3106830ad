"""The storage API version and the rule deciding which plugins are accepted.

Proxmox VE versions its storage plugin API like a libtool library: ``APIVER`` is
the current interface (libtool's *current*) and ``APIAGE`` is how many earlier
versions it is still backward compatible with (libtool's *age*). A plugin built
against version ``v`` works iff ``APIVER - APIAGE <= v <= APIVER``:

- older than ``APIVER - APIAGE``: it relies on an interface that was removed;
- newer than ``APIVER``: it expects methods this host does not have yet.

Version 11 is the one that introduced ``new_backup_provider``; the age went from 1
to 2 with it, so plugins written for 9 and 10 keep working.
"""

from __future__ import annotations

from pvebackup.api.errors import PluginVersionError

__all__ = ["APIAGE", "APIVER", "check_api_version", "min_api_version"]

APIVER = 11
"""Storage API version. Increment it on changes of the storage plugin interface."""

APIAGE = 2
"""Number of earlier versions the current one is backward compatible with."""


def min_api_version() -> int:
    """The oldest plugin api version still accepted (``APIVER - APIAGE``)."""
    return APIVER - APIAGE


def check_api_version(plugin_name: str, version: int) -> None:
    """Accept a plugin declaring storage api ``version``, or refuse it.

    :param plugin_name: how to name the plugin in the message (type and class).
    :param version: the plugin's declared ``api_version``.
    :raises PluginVersionError: ``version`` is outside
        ``APIVER - APIAGE .. APIVER``; the message names the plugin, its version
        and the accepted range, and says whether it is too old or too new.
    """
    low = min_api_version()
    accepted = f"accepted: {low}..{APIVER} (APIVER {APIVER}, APIAGE {APIAGE})"
    # bool is an int subclass; a plugin declaring True is a bug, not version 1.
    if not isinstance(version, int) or isinstance(version, bool):
        raise PluginVersionError(
            f"storage plugin {plugin_name}: api_version must be an int, "
            f"not {version!r}; {accepted}"
        )
    if version > APIVER:
        raise PluginVersionError(
            f"storage plugin {plugin_name} has api version {version}, newer than "
            f"this pvebackup supports; {accepted}. Upgrade pvebackup."
        )
    if version < low:
        raise PluginVersionError(
            f"storage plugin {plugin_name} has api version {version}, too old; "
            f"{accepted}. Upgrade the plugin."
        )
