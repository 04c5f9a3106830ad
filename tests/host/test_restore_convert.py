"""``qemu-img convert`` as the restore runs it: progress, failures, interruption."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pvebackup.api.errors import ExternalToolError, NotFoundError, PluginError
from pvebackup.host import restoresource as restore

pytestmark = pytest.mark.e2e
MiB = 1024 * 1024


def image(path: Path, size: int, fill: str | None = None, fmt: str = "qcow2") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True)
    if fill:
        subprocess.run(
            ["qemu-io", "-f", fmt, "-c", fill, str(path)], check=True, capture_output=True
        )
    return path


def same(a: Path, fmt_a: str, b: Path) -> bool:
    cmd = ["qemu-img", "compare", "-q", "-f", fmt_a, "-F", "qcow2", str(a), str(b)]
    return subprocess.run(cmd).returncode == 0


def test_progress_is_reported_and_ends_at_100(tmp_path: Path) -> None:
    src = image(tmp_path / "src.raw", 64 * MiB, "write -P 9 0 48M", fmt="raw")
    dst = image(tmp_path / "dst.qcow2", 64 * MiB)
    seen: list[float] = []
    restore.qemu_img_convert(str(src), dst, seen.append, interval=0)
    assert len(seen) >= 2 and seen[-1] == 100.0
    assert seen == sorted(seen) and all(0 <= p <= 100 for p in seen)
    assert same(src, "raw", dst)


def test_failure_carries_qemu_img_message(tmp_path: Path) -> None:
    dst = image(tmp_path / "dst.qcow2", MiB)
    # A missing source is "not found" (exit 3), still with qemu-img's words.
    with pytest.raises(NotFoundError, match="Could not open"):
        restore.qemu_img_convert(str(tmp_path / "missing.qcow2"), dst)
    with pytest.raises(ExternalToolError, match="qemu-img convert .*: qemu-img: .*") as caught:
        restore.qemu_img_convert(str(dst), tmp_path)  # a directory is no qcow2 target
    assert not isinstance(caught.value, NotFoundError) and caught.value.stderr


def test_interruption_kills_qemu_img(tmp_path: Path) -> None:
    src = image(tmp_path / "src.raw", 64 * MiB, "write -P 9 0 48M", fmt="raw")
    dst = image(tmp_path / "dst.qcow2", 64 * MiB)

    def interrupted(percent: float) -> None:
        raise KeyboardInterrupt  # what a signal does to the main thread

    with pytest.raises(KeyboardInterrupt):
        restore.qemu_img_convert(str(src), dst, interrupted, interval=0)
    left = subprocess.run(["pgrep", "-f", f"qemu-img convert.*{dst}"], capture_output=True)
    assert left.returncode == 1  # nothing running


def test_plain_path_is_read_as_raw_never_probed(tmp_path: Path) -> None:
    """A guest disk whose first bytes are a qcow2 header naming a host file as its
    backing file: probing would follow it; read as raw, the bytes are just data."""
    secret = tmp_path / "host-secret"
    secret.write_bytes(b"HOST-SECRET-" * 1000)
    src = tmp_path / "disk.img"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw",
         str(src), "1M"],
        check=True,
    )
    dst = image(tmp_path / "dst.qcow2", MiB)
    restore.qemu_img_convert(str(src), dst)
    raw = tmp_path / "out.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(dst), str(raw)], check=True
    )
    data = raw.read_bytes()
    assert data.startswith(b"QFI\xfb")  # the header itself, as data
    assert b"HOST-SECRET" not in data


def test_json_source_uses_its_driver_as_the_format(tmp_path: Path) -> None:
    src = image(tmp_path / "src.qcow2", 4 * MiB, "write -P 7 1M 1M")
    dst = image(tmp_path / "dst.qcow2", 4 * MiB)
    spec = {"driver": "qcow2", "file": {"driver": "file", "filename": str(src)}}
    source = "json:" + json.dumps(spec)
    assert restore.source_format(source) == "qcow2"
    restore.qemu_img_convert(source, dst)
    assert same(src, "qcow2", dst)


@pytest.mark.parametrize(
    "source",
    ['json:{"file": {"driver": "file", "filename": "/x"}}', "json:{", 'json:{"driver": "a,b"}'],
)
def test_json_source_without_a_plain_driver_is_refused(tmp_path: Path, source: str) -> None:
    dst = image(tmp_path / "dst.qcow2", MiB)
    with pytest.raises(PluginError, match="json:"):
        restore.qemu_img_convert(source, dst)
