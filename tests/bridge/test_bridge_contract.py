"""The provider contract suite (pvebackup.testing) THROUGH the bridge.

The same classes of checks that tests/testing/test_contract_backup_*.py run on
backup-dir and backup-store directly run here on ``bridged-backup-*``: the
seed host calls a wrapper (bridged_provider.py) that speaks the merged API to a
real ``python3 -m pvebackup.bridge`` process, whose adapter calls the real
provider. Why a wrapper rather than a parameter of the suite: the suite drives
the seed host, which only knows the seed API; the wrapper is the inverse of the
adapter, so a run shows that seed -> merged -> seed loses nothing the suite
checks (call order is checked on the wrapper, i.e. what the host did; data,
bitmaps, aborts, listings and restores on the real provider behind the pipe).

Not claimed through the bridge: ``FAKE_SOURCE`` (an in-memory export cannot
cross a process boundary; the file-handle path is tested in test_bridge_vm.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bridged_provider import BridgedDirPlugin, BridgedStorePlugin

from pvebackup.api.types import RestoreMechanism
from pvebackup.testing import Capability, ProviderContract

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


class TestBridgedBackupDirContract(ProviderContract):
    storage_type = "bridged-backup-dir"
    plugin = BridgedDirPlugin
    capabilities = frozenset(Capability) - {
        Capability.GARBAGE_COLLECTED, Capability.FAKE_SOURCE, Capability.FILES,
    }
    ct_restore_properties = {
        RestoreMechanism.TAR: {"ct-format": "tar"},
        RestoreMechanism.DIRECTORY: {"ct-format": "directory"},
    }

    def storage_properties(self, base: Path) -> dict[str, str]:
        return {"path": str(base)}


class TestBridgedBackupStoreContract(ProviderContract):
    storage_type = "bridged-backup-store"
    plugin = BridgedStorePlugin
    capabilities = frozenset(
        {Capability.VM, Capability.INCREMENTAL, Capability.LIST, Capability.REMOVE,
         Capability.GARBAGE_COLLECTED, Capability.CHAINED, Capability.CT,
         Capability.RESTORE_TAR, Capability.ATTRIBUTES}
    )  # fmt: skip

    def storage_properties(self, base: Path) -> dict[str, str]:
        return {"path": str(base), "chunk-size": "65536"}
