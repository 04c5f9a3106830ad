"""The disk size a provider reports for a restore comes from the backup: checked
before it sizes a volume (issue 8, class 7)."""

from __future__ import annotations

import pytest

from pvebackup.api.errors import IntegrityError
from pvebackup.host.restoresource import device_size as _device_size


@pytest.mark.parametrize(
    "entry",
    [{"size": "1G"}, {"size": -1}, {"size": 0}, {"size": 2**64}, {"size": True},
     {"size": 1.5}, {"size": None}, {}, [], "4096"],
)  # fmt: skip
def test_hostile_device_sizes_are_integrity_errors(entry: object) -> None:
    with pytest.raises(IntegrityError, match="drive-scsi0"):
        _device_size(entry, "drive-scsi0")


def test_a_real_size_passes() -> None:
    assert _device_size({"size": 4 << 30}, "drive-scsi0") == 4 << 30
