"""backup-store against the provider contract suite (pvebackup.testing).

backup-store backs up VMs and containers (restored through the ``tar`` mechanism, or
``directory`` with ``ct-restore directory``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pvebackup.api.types import RestoreMechanism
from pvebackup.testing import Capability, ProviderContract

pytestmark = pytest.mark.e2e


class TestBackupStoreContract(ProviderContract):
    storage_type = "backup-store"
    # A failed backup's chunks stay until garbage collection (deduplication); an
    # incremental names its base as parent although each snapshot restores alone.
    capabilities = frozenset(
        {Capability.VM, Capability.INCREMENTAL, Capability.LIST, Capability.REMOVE,
         Capability.GARBAGE_COLLECTED, Capability.FAKE_SOURCE, Capability.CHAINED,
         Capability.CT, Capability.RESTORE_TAR, Capability.RESTORE_DIRECTORY,
         Capability.ATTRIBUTES, Capability.FILES}
    )  # fmt: skip
    ct_restore_properties = {
        RestoreMechanism.TAR: {"ct-restore": "tar"},
        RestoreMechanism.DIRECTORY: {"ct-restore": "directory"},
    }

    def storage_properties(self, base: Path) -> dict[str, str]:
        return {"path": str(base), "chunk-size": "65536"}
