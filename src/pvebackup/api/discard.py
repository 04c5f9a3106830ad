"""Discards on the backup export, aligned so that QEMU accepts them.

The seed asks providers to discard what they have backed up, so that the
fleecing image on the host shrinks. QEMU 7.2's copy-before-write filter resets
its bitmaps for such a discard without rounding: a discard that is not aligned
to its cluster size (64 KiB; more only if the fleecing image has bigger
clusters, which the host never makes) fails an assertion and kills the whole
export. Seen here with a raw disk whose only data extent was its first 4 KiB.

So a provider discards only the whole 64 KiB blocks inside a range it has
stored (the end of the disk counts as aligned). The unaligned edges stay in the
fleecing image until the export is torn down: that costs space, never data.
"""

from __future__ import annotations

__all__ = ["DISCARD_ALIGNMENT", "discard_range"]

DISCARD_ALIGNMENT = 64 * 1024
"""Discards on the export start and end on multiples of this (or at the disk's end)."""


def discard_range(
    offset: int, length: int, size: int, alignment: int = DISCARD_ALIGNMENT
) -> tuple[int, int] | None:
    """The part of ``[offset, offset + length)`` that may be discarded.

    :param size: the export's size; a range ending there may end unaligned.
    :returns: ``(offset, length)`` of the aligned inner part, or ``None`` when no
        whole block lies inside the range.
    """
    start = -(-offset // alignment) * alignment
    end = min(offset + length, size)
    if end != size:
        end -= end % alignment
    if end <= start:
        return None
    return start, end - start
