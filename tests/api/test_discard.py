"""Discard ranges aligned for QEMU's copy-before-write filter."""

from __future__ import annotations

import pytest

from pvebackup.api.discard import DISCARD_ALIGNMENT as A
from pvebackup.api.discard import discard_range

SIZE = 100 * A + 4096  # a disk whose end is not aligned


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [
        (0, A, (0, A)),  # aligned already
        (0, 4096, None),  # a raw disk's first 4 KiB extent: nothing whole inside
        (4096, 2 * A, (A, A)),  # edges trimmed off
        (A - 1, A + 2, (A, A)),
        (3 * A, 5 * A, (3 * A, 5 * A)),
        (99 * A, A + 4096, (99 * A, A + 4096)),  # may end at the disk's end
        (100 * A + 1, 4095, None),  # the unaligned tail alone
        (98 * A, 10 * A, (98 * A, 2 * A + 4096)),  # clipped to the disk
    ],
)
def test_discard_range(offset: int, length: int, expected: tuple[int, int] | None) -> None:
    assert discard_range(offset, length, SIZE) == expected


def test_every_result_is_inside_and_aligned() -> None:
    for offset in range(0, 3 * A, 4096):
        for length in (4096, A, A + 4096, 3 * A):
            part = discard_range(offset, length, SIZE)
            if part is None:
                continue
            start, n = part
            assert offset <= start and start + n <= offset + length
            assert start % A == 0 and (n % A == 0 or start + n == SIZE)
