"""The example provider (examples/plainfiles) against the provider contract suite.

It is not installed: its source directory goes on sys.path and the plugin is
registered in-process (``plugin = PlainFilesPlugin``), so the test needs no network
and no pip. Real use installs it (``pip install ./examples/plainfiles``) and the
entry point finds it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples/plainfiles"
sys.path.insert(0, str(EXAMPLE / "src"))

from pvebackup_plainfiles.plugin import PlainFilesPlugin  # noqa: E402

from pvebackup.testing import Capability, ProviderContract  # noqa: E402

pytestmark = pytest.mark.e2e


# [snippet:contract]
class TestPlainFilesContract(ProviderContract):
    storage_type = "plain-files"
    plugin = PlainFilesPlugin
    capabilities = frozenset(
        {Capability.VM, Capability.CT, Capability.RESTORE_TAR, Capability.LIST,
         Capability.REMOVE}
    )  # fmt: skip

    def storage_properties(self, base: Path) -> dict[str, str]:
        return {"path": str(base / "backups")}
    # [end]
