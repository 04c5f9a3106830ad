"""The storage properties of ``plain-files`` and their typed values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pvebackup.storage import COMMON_PROPERTIES, PropertyKind, PropertySpec, parse_properties

# [snippet:properties]
PROPERTIES: Mapping[str, PropertySpec] = {
    **COMMON_PROPERTIES,
    "path": PropertySpec(PropertyKind.PATH, required=True, description="backup directory"),
    "store-logs": PropertySpec(PropertyKind.BOOL, default=True, description="keep task logs"),
}


@dataclass(frozen=True)
class Settings:
    path: Path
    store_logs: bool

    @classmethod
    def of(cls, scfg: Mapping[str, str], storeid: str) -> Settings:
        # scfg arrives as the seed's strings; parse them once, by the declarations.
        props = parse_properties(PROPERTIES, scfg, storeid)
        return cls(path=props.path("path"), store_logs=props.flag("store-logs"))
# [end]
