"""qemu-img wrappers against the real qemu-img."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvebackup.api.errors import ExternalToolError
from pvebackup.host.qemu import images
from pvebackup.host.qemu.daemon import StorageDaemon
from pvebackup.host.qemu.images import (
    BitmapInfo,
    bitmap_add,
    bitmap_remove,
    create_image,
    image_info,
)

pytestmark = pytest.mark.e2e


def test_create_and_info(tmp_path: Path) -> None:
    q, r = tmp_path / "a.qcow2", tmp_path / "b.raw"
    create_image(q, 3 << 20)
    create_image(r, 1 << 20, fmt="raw")
    qi, ri = image_info(q, fmt="qcow2"), image_info(r)
    assert (qi.path, qi.format, qi.virtual_size, qi.bitmaps) == (q, "qcow2", 3 << 20, ())
    assert (ri.format, ri.virtual_size, ri.bitmaps) == ("raw", 1 << 20, ())


def test_bitmaps_add_flags_remove(tmp_path: Path) -> None:
    q = tmp_path / "a.qcow2"
    create_image(q, 1 << 20)
    bitmap_add(q, "on")
    bitmap_add(q, "off", enabled=False)
    i = image_info(q)
    on, off = i.bitmap("on"), i.bitmap("off")
    assert on is not None and on.enabled and not on.in_use and on.granularity == 65536
    assert off is not None and not off.enabled
    assert i.bitmap("nope") is None
    bitmap_remove(q, "on")
    assert [b.name for b in image_info(q).bitmaps] == ["off"]
    assert BitmapInfo("x", 1, frozenset({"in-use"})).in_use


def test_failures_carry_stderr(tmp_path: Path) -> None:
    with pytest.raises(ExternalToolError, match="qemu-img info .*missing.qcow2: .*No such file"):
        image_info(tmp_path / "missing.qcow2")
    r = tmp_path / "b.raw"
    create_image(r, 1 << 20, fmt="raw")
    with pytest.raises(ExternalToolError, match="not in qcow2 format"):
        image_info(r, fmt="qcow2")
    with pytest.raises(ExternalToolError, match="remove bitmap nope"):
        q = tmp_path / "a.qcow2"
        create_image(q, 1 << 20)
        bitmap_remove(q, "nope")


def test_locked_image_needs_force_share(tmp_path: Path) -> None:
    q = tmp_path / "a.qcow2"
    create_image(q, 1 << 20)
    # A daemon holding the image open read-write: QMP answers blockdev-add only
    # once the image is open and locked, so there is no race with qemu-img.
    with StorageDaemon() as daemon:
        daemon.execute(
            "blockdev-add",
            **{
                "node-name": "held",
                "driver": "qcow2",
                "file": {"driver": "file", "filename": str(q)},
            },
        )
        with pytest.raises(ExternalToolError, match="lock"):
            image_info(q)
        assert image_info(q, force_share=True).virtual_size == 1 << 20


def test_missing_tool_and_bad_output(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(images, "_QEMU_IMG", str(tmp_path / "no-such-qemu-img"))
    with pytest.raises(ExternalToolError, match="cannot run"):
        image_info(tmp_path / "x")
    monkeypatch.setattr(images, "run_qemu_img", lambda args, what: '{"format": "raw"}')
    with pytest.raises(ExternalToolError, match="unexpected output"):
        image_info(tmp_path / "x")
