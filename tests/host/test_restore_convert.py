"""``qemu-img convert`` as the restore runs it: progress, failures, interruption."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pvebackup.api.errors import ExternalToolError
from pvebackup.host import restore

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024


def image(path: Path, size: int, fill: str | None = None) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    if fill:
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", fill, str(path)], check=True, capture_output=True
        )
    return path


def test_progress_is_reported_and_ends_at_100(tmp_path: Path) -> None:
    src = image(tmp_path / "src.qcow2", 64 * MiB, "write -P 9 0 48M")
    dst = image(tmp_path / "dst.qcow2", 64 * MiB)
    seen: list[float] = []
    restore._qemu_img_convert(str(src), dst, seen.append, interval=0)
    assert len(seen) >= 2 and seen[-1] == 100.0
    assert seen == sorted(seen) and all(0 <= p <= 100 for p in seen)
    assert subprocess.run(["qemu-img", "compare", "-q", str(src), str(dst)]).returncode == 0


def test_failure_carries_qemu_img_message(tmp_path: Path) -> None:
    dst = image(tmp_path / "dst.qcow2", MiB)
    with pytest.raises(ExternalToolError, match="Could not open"):
        restore._qemu_img_convert(str(tmp_path / "missing.qcow2"), dst)


def test_interruption_kills_qemu_img(tmp_path: Path) -> None:
    src = image(tmp_path / "src.qcow2", 64 * MiB, "write -P 9 0 48M")
    dst = image(tmp_path / "dst.qcow2", 64 * MiB)

    def interrupted(percent: float) -> None:
        raise KeyboardInterrupt  # what a signal does to the main thread

    with pytest.raises(KeyboardInterrupt):
        restore._qemu_img_convert(str(src), dst, interrupted, interval=0)
    left = subprocess.run(["pgrep", "-f", f"qemu-img convert.*{dst}"], capture_output=True)
    assert left.returncode == 1  # nothing running
