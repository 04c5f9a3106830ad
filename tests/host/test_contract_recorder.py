"""The test recorder (recording_provider.py) against the provider contract suite."""

from __future__ import annotations

from pathlib import Path

import pytest
from recording_provider import RecordingPlugin

from pvebackup.api.types import RestoreMechanism
from pvebackup.testing import Capability, ProviderContract

pytestmark = pytest.mark.e2e


class TestRecorderContract(ProviderContract):
    storage_type = "test-recording"
    plugin = RecordingPlugin
    # Each image stands alone (no parent); failed backups are removed at once; it
    # reads exports with its own libnbd handle (no source_factory); no notes or
    # protection, no single files (the base class's defaults).
    capabilities = frozenset(Capability) - {
        Capability.CHAINED, Capability.GARBAGE_COLLECTED, Capability.FAKE_SOURCE,
        Capability.ATTRIBUTES, Capability.FILES}  # fmt: skip
    ct_restore_properties = {
        RestoreMechanism.TAR: {"restore-mechanism": "tar"},
        RestoreMechanism.DIRECTORY: {"restore-mechanism": "directory"},
    }

    def storage_properties(self, base: Path) -> dict[str, str]:
        return {"path": str(base)}
