"""backup-dir against the provider contract suite (pvebackup.testing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvebackup.api.types import RestoreMechanism
from pvebackup.testing import Capability, ProviderContract

pytestmark = pytest.mark.e2e


class TestBackupDirContract(ProviderContract):
    storage_type = "backup-dir"
    # FILES: ls/extract read single files through a catalog, which backup-dir lacks.
    capabilities = frozenset(Capability) - {Capability.GARBAGE_COLLECTED, Capability.FILES}
    ct_restore_properties = {
        RestoreMechanism.TAR: {"ct-format": "tar"},
        RestoreMechanism.DIRECTORY: {"ct-format": "directory"},
    }

    def storage_properties(self, base: Path) -> dict[str, str]:
        return {"path": str(base)}
