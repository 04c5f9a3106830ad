"""Thin wrappers over ``qemu-img``: image info, create, persistent bitmaps.

Every failure becomes an :class:`ExternalToolError` carrying qemu-img's stderr.
The image format is always passed explicitly when known: probing a raw image
whose guest wrote a qcow2 header would otherwise open the wrong thing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pvebackup.api.errors import ExternalToolError
from pvebackup.kit import proc

__all__ = [
    "BitmapInfo",
    "ImageInfo",
    "bitmap_add",
    "bitmap_remove",
    "create_image",
    "image_info",
    "run_qemu_img",
]

_QEMU_IMG = "qemu-img"


@dataclass(frozen=True, slots=True)
class BitmapInfo:
    """A persistent dirty bitmap stored in a qcow2 image.

    ``flags`` as qemu-img reports them: ``auto`` (enabled: writes are recorded),
    ``in-use`` (a writer had the image open and did not close it cleanly, so the
    bitmap may miss writes and must not be trusted).
    """

    name: str
    granularity: int
    flags: frozenset[str]

    @property
    def in_use(self) -> bool:
        """The bitmap was not stored cleanly: it is inconsistent."""
        return "in-use" in self.flags

    @property
    def enabled(self) -> bool:
        """Writes to the image are recorded in the bitmap."""
        return "auto" in self.flags


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What ``qemu-img info`` says about one image."""

    path: Path
    format: str
    virtual_size: int
    bitmaps: tuple[BitmapInfo, ...]

    def bitmap(self, name: str) -> BitmapInfo | None:
        """The bitmap called ``name``, or None."""
        for bm in self.bitmaps:
            if bm.name == name:
                return bm
        return None


def run_qemu_img(args: Sequence[str], *, what: str) -> str:
    """Run ``qemu-img ARGS`` and return its stdout.

    :raises ExternalToolError: it cannot be run or exits non-zero; the message
        starts with ``what`` and ends with qemu-img's stderr.
    """
    try:
        res = proc.run([_QEMU_IMG, *args])
    except ExternalToolError as exc:
        raise ExternalToolError(f"{what}: {exc}") from exc
    if res.returncode != 0:
        raise ExternalToolError(f"{what}: {res.err or f'exit {res.returncode}'}")
    return res.out


def image_info(path: Path, *, fmt: str | None = None, force_share: bool = False) -> ImageInfo:
    """``qemu-img info --output json`` of ``path`` (not of its backing chain).

    :param fmt: the expected format; probing is used only when None.
    :param force_share: read even while another process holds the write lock
        (the answer may then be stale).
    """
    args = ["info", "--output", "json"]
    if fmt is not None:
        args += ["-f", fmt]
    if force_share:
        args.append("-U")
    out = run_qemu_img([*args, str(path)], what=f"qemu-img info {path}")
    try:
        data: dict[str, Any] = json.loads(out)
        specific = data.get("format-specific", {}).get("data", {})
        bitmaps = tuple(
            BitmapInfo(
                name=str(b["name"]),
                granularity=int(b.get("granularity", 0)),
                flags=frozenset(str(f) for f in b.get("flags", [])),
            )
            for b in specific.get("bitmaps", [])
        )
        return ImageInfo(
            path=path,
            format=str(data["format"]),
            virtual_size=int(data["virtual-size"]),
            bitmaps=bitmaps,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ExternalToolError(f"qemu-img info {path}: unexpected output: {exc}") from exc


def create_image(path: Path, size: int, *, fmt: str = "qcow2") -> None:
    """Create a new image of ``size`` bytes (fails if qemu-img fails)."""
    run_qemu_img(["create", "-q", "-f", fmt, str(path), str(size)], what=f"create {path}")


def bitmap_add(path: Path, name: str, *, enabled: bool = True) -> None:
    """Add an (empty) persistent bitmap to a qcow2 image."""
    args = ["bitmap", "-f", "qcow2", "--add"]
    if not enabled:
        args.append("--disable")
    run_qemu_img([*args, str(path), name], what=f"add bitmap {name} to {path}")


def bitmap_remove(path: Path, name: str) -> None:
    """Remove a persistent bitmap from a qcow2 image (also an in-use one)."""
    run_qemu_img(
        ["bitmap", "-f", "qcow2", "--remove", str(path), name],
        what=f"remove bitmap {name} from {path}",
    )
