"""backup-store against the provider contract suite (pvebackup.testing).

backup-store backs up VMs only today: the suite checks that it refuses containers
the documented way (the guest fails, the job goes on) instead of skipping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pvebackup.testing import Capability, ProviderContract, ProviderSpy

pytestmark = pytest.mark.e2e


class TestBackupStoreContract(ProviderContract):
    storage_type = "backup-store"
    # A failed backup's chunks stay until garbage collection (deduplication).
    capabilities = frozenset(
        {Capability.VM, Capability.INCREMENTAL, Capability.LIST, Capability.REMOVE,
         Capability.GARBAGE_COLLECTED, Capability.FAKE_SOURCE}
    )  # fmt: skip

    def storage_properties(self, base: Path) -> dict[str, str]:
        return {"path": str(base), "chunk-size": "65536"}

    @pytest.mark.xfail(
        strict=True,
        reason="backup-store raises NotFoundError before the first backup created the "
        "datastore; issue 9 'Same situations' (shapes lane) makes it an empty list",
    )
    def test_list_volumes_empty_storage(self, tmp_path: Path, contract_spy: ProviderSpy) -> None:
        super().test_list_volumes_empty_storage(tmp_path, contract_spy)

    @pytest.mark.xfail(
        strict=True,
        reason="the host skips restore_qemu_img_cleanup when restore_qemu_img_init "
        "failed (issue 9 'The seed's exact shapes', shapes lane)",
    )
    def test_restore_qemu_img_cleanup_after_failed_init(
        self, vm_run: Any, contract_spy: Any
    ) -> None:
        super().test_restore_qemu_img_cleanup_after_failed_init(vm_run, contract_spy)
