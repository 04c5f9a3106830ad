"""Deterministic benchmark inputs: mixed-data disk images and the scattered change.

An image is a sequence of 4 MiB data regions, alternately incompressible (random
bytes) and text-like (words from a small vocabulary, ~3x with ``zstd -1``). Region
``i`` depends only on the seed and ``i``, so the dense 1 GiB image and the 64 GiB
sparse image hold exactly the same data: dense places region ``i`` at ``i * 4 MiB``,
sparse at ``i * stride`` with holes between.

The "1% change" is ``count`` 64 KiB writes of a constant byte at seeded, 4 KiB
aligned offsets inside the data regions, applied in one ``qemu-io`` run so that
persistent dirty bitmaps in the qcow2 image record them. The same (region, offset
inside region) pairs are used for both images.
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "GiB",
    "KiB",
    "MiB",
    "REGION",
    "Layout",
    "Write",
    "apply_change",
    "change_writes",
    "make_image",
    "region_bytes",
    "write_raw",
]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
REGION = 4 * MiB
WRITE_SIZE = 64 * KiB
WRITE_ALIGN = 4 * KiB
TEXT_VOCABULARY = 256
WORDS_PER_LINE = 12


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the data regions of an image lie.

    ``data_size`` bytes of data in ``data_size // REGION`` regions spread evenly over
    ``virtual_size`` bytes (equal sizes: a dense image without holes).
    """

    data_size: int
    virtual_size: int

    def __post_init__(self) -> None:
        if self.data_size <= 0 or self.data_size % REGION:
            raise ValueError(f"data size must be a positive multiple of {REGION}")
        if self.virtual_size < self.data_size or self.virtual_size % self.data_size:
            raise ValueError("virtual size must be a multiple of the data size")

    @property
    def regions(self) -> int:
        return self.data_size // REGION

    @property
    def stride(self) -> int:
        return self.virtual_size // self.regions

    def region_offset(self, index: int) -> int:
        return index * self.stride


@dataclass(frozen=True, slots=True)
class Write:
    """One write of the scattered change: ``WRITE_SIZE`` bytes of ``pattern``."""

    region: int
    inner: int  # offset inside the region
    pattern: int

    def offset(self, layout: Layout) -> int:
        return layout.region_offset(self.region) + self.inner


def _vocabulary(seed: int) -> list[bytes]:
    rng = random.Random(f"{seed}:vocabulary")
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [
        "".join(rng.choice(letters) for _ in range(rng.randint(2, 10))).encode()
        for _ in range(TEXT_VOCABULARY)
    ]


def _text(rng: random.Random, vocabulary: list[bytes], size: int) -> bytes:
    # Average word plus separator is ~7 bytes; draw a few more than needed.
    words = rng.choices(vocabulary, k=size // 6 + WORDS_PER_LINE)
    lines = (
        b" ".join(words[i : i + WORDS_PER_LINE])
        for i in range(0, len(words), WORDS_PER_LINE)
    )
    data = b"\n".join(lines)
    if len(data) < size:  # cannot happen with the draw above, but never be short
        data += b"\n" * (size - len(data))
    return data[:size]


def region_bytes(seed: int, index: int, vocabulary: list[bytes] | None = None) -> bytes:
    """Data region ``index``: random when ``index`` is even, text-like when odd."""
    rng = random.Random(f"{seed}:region:{index}")
    if index % 2 == 0:
        return rng.randbytes(REGION)
    return _text(rng, vocabulary if vocabulary is not None else _vocabulary(seed), REGION)


def iter_regions(layout: Layout, seed: int) -> Iterator[tuple[int, bytes]]:
    """``(offset, data)`` of every region of ``layout``."""
    vocabulary = _vocabulary(seed)
    for i in range(layout.regions):
        yield layout.region_offset(i), region_bytes(seed, i, vocabulary)


def write_raw(path: Path, layout: Layout, seed: int) -> None:
    """Write a (sparse where there are holes) raw image of ``layout``."""
    with path.open("wb") as f:
        f.truncate(layout.virtual_size)
        for offset, data in iter_regions(layout, seed):
            f.seek(offset)
            f.write(data)


def make_image(raw: Path, qcow2: Path) -> None:
    """Convert ``raw`` to qcow2 (holes stay unallocated)."""
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
        check=True,
    )


def change_writes(layout: Layout, seed: int, count: int) -> list[Write]:
    """``count`` seeded 64 KiB writes, each inside one data region."""
    rng = random.Random(f"{seed}:change")
    slots = (REGION - WRITE_SIZE) // WRITE_ALIGN + 1
    return [
        Write(
            region=rng.randrange(layout.regions),
            inner=rng.randrange(slots) * WRITE_ALIGN,
            pattern=rng.randint(1, 255),
        )
        for _ in range(count)
    ]


def qemu_io_commands(layout: Layout, writes: list[Write]) -> list[str]:
    """The ``qemu-io -c`` arguments applying ``writes`` to an image of ``layout``."""
    args: list[str] = []
    for w in writes:
        args += ["-c", f"write -q -P {w.pattern} {w.offset(layout)} {WRITE_SIZE}"]
    return args


def apply_change(image: Path, layout: Layout, writes: list[Write]) -> None:
    """Apply ``writes`` to the qcow2 ``image`` in one ``qemu-io`` process."""
    subprocess.run(
        ["qemu-io", "-f", "qcow2", *qemu_io_commands(layout, writes), str(image)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
