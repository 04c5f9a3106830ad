"""The backup provider API: what a third-party provider needs, and nothing else of ours.

``from pvebackup.api import BackupProvider, BackupMechanism, ...``
"""

from pvebackup.api import errors
from pvebackup.api.excludes import ExcludeMatcher
from pvebackup.api.idmap import IdMapper
from pvebackup.api.provider import BackupProvider
from pvebackup.api.types import (
    BackupMechanism,
    BitmapMode,
    DeviceInfo,
    DeviceInfoEntry,
    GuestType,
    IdMapEntry,
    LogFunction,
    LogLevel,
    RestoreMechanism,
    SeedIdMap,
    SeedIdMapEntry,
)

__all__ = [
    "BackupMechanism",
    "BackupProvider",
    "BitmapMode",
    "DeviceInfo",
    "DeviceInfoEntry",
    "ExcludeMatcher",
    "GuestType",
    "IdMapEntry",
    "IdMapper",
    "LogFunction",
    "LogLevel",
    "RestoreMechanism",
    "SeedIdMap",
    "SeedIdMapEntry",
    "errors",
]
