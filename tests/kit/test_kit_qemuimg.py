"""The one qemu-img runner (pvebackup.kit.qemuimg) against the real qemu-img."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pvebackup.api.errors import ExternalToolError, NotFoundError
from pvebackup.host.qemu.daemon import StorageDaemon
from pvebackup.kit import qemuimg
from pvebackup.kit.qemuimg import BitmapInfo, bitmap_add, bitmap_remove, create, info

pytestmark = pytest.mark.e2e
MiB = 1 << 20


def qemu_io(path: Path, fmt: str, command: str) -> None:
    subprocess.run(["qemu-io", "-f", fmt, "-c", command, str(path)], check=True,
                   capture_output=True)


def test_create_and_info(tmp_path: Path) -> None:
    q, r = tmp_path / "a.qcow2", tmp_path / "b.raw"
    create(q, 3 * MiB)
    create(r, MiB, fmt="raw")
    qi, ri = info(q, fmt="qcow2"), info(r)
    assert (qi.path, qi.format, qi.virtual_size, qi.bitmaps) == (q, "qcow2", 3 * MiB, ())
    assert (ri.format, ri.virtual_size, ri.bitmaps) == ("raw", MiB, ())


def test_create_with_backing_records_name_and_format(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    create(base, MiB)
    create(top, MiB, backing="base.qcow2", backing_fmt="qcow2")
    data = qemuimg.info_json(top, fmt="qcow2")
    assert (data["backing-filename"], data["backing-filename-format"]) == ("base.qcow2", "qcow2")
    with pytest.raises(ValueError, match="never probed"):
        create(top, MiB, backing="base.qcow2")


def test_bitmaps_add_flags_remove(tmp_path: Path) -> None:
    q = tmp_path / "a.qcow2"
    create(q, MiB)
    bitmap_add(q, "on")
    bitmap_add(q, "off", enabled=False)
    i = info(q)
    on, off = i.bitmap("on"), i.bitmap("off")
    assert on is not None and on.enabled and not on.in_use and on.granularity == 65536
    assert off is not None and not off.enabled
    assert i.bitmap("nope") is None
    bitmap_remove(q, "on")
    assert [b.name for b in info(q).bitmaps] == ["off"]
    assert BitmapInfo("x", 1, frozenset({"in-use"})).in_use


def test_missing_image_is_not_found_with_qemu_img_message(tmp_path: Path) -> None:
    missing = tmp_path / "missing.qcow2"
    for call in (
        lambda: info(missing),
        lambda: qemuimg.check(missing, fmt="qcow2"),
        lambda: bitmap_remove(missing, "x"),
        lambda: qemuimg.convert(str(missing), tmp_path / "out.raw", source_fmt="qcow2",
                                target_fmt="raw"),
    ):
        with pytest.raises(NotFoundError, match="missing.qcow2.*No such file"):
            call()


def test_failures_carry_stderr_and_exit_code(tmp_path: Path) -> None:
    r = tmp_path / "b.raw"
    create(r, MiB, fmt="raw")
    with pytest.raises(ExternalToolError, match="not in qcow2 format") as caught:
        info(r, fmt="qcow2")
    assert caught.value.returncode == 1 and "qcow2" in caught.value.stderr
    q = tmp_path / "a.qcow2"
    create(q, MiB)
    with pytest.raises(ExternalToolError, match="remove bitmap nope"):
        bitmap_remove(q, "nope")


def test_locked_image_needs_force_share(tmp_path: Path) -> None:
    q = tmp_path / "a.qcow2"
    create(q, MiB)
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
            info(q)
        assert info(q, force_share=True).virtual_size == MiB


def test_missing_tool_and_bad_output(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(qemuimg, "QEMU_IMG", str(tmp_path / "no-such-qemu-img"))
    with pytest.raises(ExternalToolError, match="cannot run") as caught:
        info(tmp_path / "x")
    assert caught.value.returncode is None
    monkeypatch.undo()
    monkeypatch.setattr(qemuimg, "run", lambda args, what, timeout=None: '{"format": "raw"}')
    with pytest.raises(ExternalToolError, match="unexpected output"):
        info(tmp_path / "x")
    monkeypatch.setattr(qemuimg, "run", lambda args, what, timeout=None: "[1]")
    with pytest.raises(ExternalToolError, match="unexpected output"):
        qemuimg.info_json(tmp_path / "x")


def test_convert_reports_progress_and_copies(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.raw", tmp_path / "dst.qcow2"
    create(src, 32 * MiB, fmt="raw")
    qemu_io(src, "raw", "write -P 7 1M 20M")
    create(dst, 32 * MiB)
    seen: list[float] = []
    qemuimg.convert(str(src), dst, source_fmt="raw", target_fmt="qcow2", target_exists=True,
                    target_is_zero=True, progress=seen.append)
    assert seen[-1] == 100.0 and seen == sorted(seen) and len(seen) >= 2
    assert subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(src),
                           str(dst)]).returncode == 0


def test_throttled_passes_one_value_per_interval_and_always_100() -> None:
    now = [0.0]
    seen: list[float] = []
    report = qemuimg.throttled(seen.append, 5.0, clock=lambda: now[0])
    report(1.0)
    now[0] = 5.0
    report(2.0)
    report(3.0)
    report(100.0)
    report(100.0)  # qemu-img repeats it, and the caller reports its end
    assert seen == [2.0, 100.0]


def test_check_reports_corruption_and_leaks_as_answers(tmp_path: Path) -> None:
    q = tmp_path / "a.qcow2"
    create(q, 4 * MiB)
    qemu_io(q, "qcow2", "write -P 1 0 1M")
    assert qemuimg.check(q, fmt="qcow2").clean
    # A hostile header: the refcount table offset points past the end of the file.
    data = bytearray(q.read_bytes())
    data[48:56] = (1 << 40).to_bytes(8, "big")
    q.write_bytes(bytes(data))
    damaged = qemuimg.check(q, fmt="qcow2")  # exit 2: an answer, not a failure
    assert damaged.corruptions > 0 and not damaged.clean
    r = tmp_path / "b.raw"
    create(r, MiB, fmt="raw")
    with pytest.raises(ExternalToolError, match="qemu-img check"):
        qemuimg.check(r, fmt="raw")  # raw has no checks (exit 63)


def test_compare_tells_same_from_different_and_raises_on_errors(tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.raw"
    create(a, MiB)
    create(b, MiB, fmt="raw")
    assert qemuimg.compare(a, b, fmt_a="qcow2", fmt_b="raw")
    qemu_io(b, "raw", "write -P 1 4096 512")
    assert not qemuimg.compare(a, b, fmt_a="qcow2", fmt_b="raw")
    with pytest.raises(NotFoundError):
        qemuimg.compare(a, tmp_path / "gone", fmt_a="qcow2", fmt_b="raw")
    with pytest.raises(ExternalToolError, match="qemu-img compare"):
        qemuimg.compare(b, a, fmt_a="qcow2", fmt_b="qcow2")  # b is no qcow2
