"""Test kit for provider authors: the contract suite every provider must pass.

``pvebackup.testing`` needs pytest and the real tools of a Proxmox VE node
(qemu-img, qemu-storage-daemon, rsync, tar). See docs/provider-api.md,
"Testing a provider".
"""

import pytest

# The suite's asserts are in this package, not in the author's test module: have
# pytest rewrite them too, so a failure shows the values, not a bare AssertionError.
pytest.register_assert_rewrite("pvebackup.testing.contract")

from pvebackup.testing.contract import VOLNAME_PATTERN, Capability, ProviderContract  # noqa: E402
from pvebackup.testing.node import STOREID, ContractNode  # noqa: E402
from pvebackup.testing.spy import Call, ProviderSpy  # noqa: E402

__all__ = [
    "STOREID",
    "VOLNAME_PATTERN",
    "Call",
    "Capability",
    "ContractNode",
    "ProviderContract",
    "ProviderSpy",
]
