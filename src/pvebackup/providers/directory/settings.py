"""A ``backup-dir`` storage's properties, declared and parsed in one place.

The plugin declares :data:`PROPERTIES`; storage.cfg parsing checks every value
against them when the file is read; the provider and the plugin get the typed
values from :meth:`BackupDirSettings.from_scfg` (the seed hands ``scfg`` over as
strings, so this is the one call that turns them into values).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pvebackup.storage.basepath import BASE_PATH_PROPERTIES, CREATE_SUBDIRS, BasePath
from pvebackup.storage.plugin import COMMON_PROPERTIES, PRUNE_PROPERTIES
from pvebackup.storage.properties import PropertyKind, PropertySpec, parse_properties

__all__ = ["CT_FORMATS", "DEFAULT_MAX_CHAIN_LENGTH", "PROPERTIES", "BackupDirSettings"]

DEFAULT_MAX_CHAIN_LENGTH = 6
"""Daily backups: a full one a week. See docs/design.md ("Chains and retention")."""

CT_FORMATS = ("tar", "directory")
"""How containers are stored: a zstd tar (``root.tar.zst``) or a directory tree."""

PROPERTIES: Mapping[str, PropertySpec] = {
    **COMMON_PROPERTIES,
    **PRUNE_PROPERTIES,
    "path": PropertySpec(
        PropertyKind.PATH, required=True, description="directory the backups are kept in"
    ),
    "bitmap": PropertySpec(
        PropertyKind.BOOL,
        default=True,
        description="incremental VM backups with dirty bitmaps (default yes)",
    ),
    "ct-format": PropertySpec(
        PropertyKind.ENUM,
        choices=CT_FORMATS,
        default="tar",
        description="how containers are stored: tar (zstd tar, default) or directory",
    ),
    "max-chain-length": PropertySpec(
        PropertyKind.INT,
        default=DEFAULT_MAX_CHAIN_LENGTH,
        minimum=0,
        maximum=1000,
        description="most incremental VM backups on top of a full one; the next backup "
        "is full and starts a new chain, so retention can remove the old chain "
        f"(default {DEFAULT_MAX_CHAIN_LENGTH}; 0: no limit)",
    ),
    **BASE_PATH_PROPERTIES,
    **CREATE_SUBDIRS,
}
"""Every property a ``backup-dir`` section may have."""


@dataclass(frozen=True, slots=True)
class BackupDirSettings:
    """The typed properties of one ``backup-dir`` storage."""

    path: Path
    base: BasePath
    use_bitmap: bool
    ct_format: str
    max_chain_length: int = DEFAULT_MAX_CHAIN_LENGTH
    """0: unlimited."""

    @classmethod
    def from_scfg(cls, scfg: Mapping[str, str], storeid: str) -> BackupDirSettings:
        """:raises StorageConfigError: a value that does not parse, no ``path``
        (only for a scfg made in code: storage.cfg was checked when read)."""
        props = parse_properties(PROPERTIES, scfg, storeid)
        ct_format = props.text("ct-format")
        assert ct_format is not None  # it has a default
        return cls(
            path=props.path("path"),
            # Our backup type: a missing path is refused unless the operator asked
            # for it to be created (an unmounted disk must not fill /).
            base=BasePath.from_properties(props, create_default=False),
            use_bitmap=props.flag("bitmap"),
            ct_format=ct_format,
            max_chain_length=props.number("max-chain-length") or 0,
        )
