"""The bitmap naming and the mode decision (no external tools)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pvebackup.api.types import BitmapMode
from pvebackup.host.qemu.bitmaps import (
    bitmap_name,
    next_bitmap_name,
    plan_bitmap,
    storage_prefix,
)
from pvebackup.kit.qemuimg import BitmapInfo, ImageInfo

if TYPE_CHECKING:
    from conftest import LogRecorder

B = "pvebackup-st-inc"
NEXT = "pvebackup-st-inc+next"


def info(*bitmaps: tuple[str, set[str]], fmt: str = "qcow2") -> ImageInfo:
    return ImageInfo(
        path=Path("/x"),
        format=fmt,
        virtual_size=1 << 20,
        bitmaps=tuple(BitmapInfo(n, 65536, frozenset(f)) for n, f in bitmaps),
    )


def plan(i: ImageInfo, log: LogRecorder, bitmap_id: str | None = "inc"):  # type: ignore[no-untyped-def]
    return plan_bitmap(i, devicename="drive-scsi0", storeid="st", bitmap_id=bitmap_id, log=log)


def test_plain_names_are_kept() -> None:
    assert bitmap_name("st", "inc") == B
    assert next_bitmap_name(B) == NEXT
    assert storage_prefix("local.backup_1") == "pvebackup-local.backup_1-"


def test_storeids_with_dashes_do_not_share_a_prefix() -> None:
    a, ab = storage_prefix("a"), storage_prefix("a-b")
    assert "-" not in ab[len("pvebackup-") : -1]
    assert not bitmap_name("a-b", "x").startswith(a)
    assert bitmap_name("a-b", "x").startswith(ab)
    assert bitmap_name("a-b", "x") != bitmap_name("a_b", "x")


def test_odd_ids_are_sanitized_distinct_and_bounded() -> None:
    one, two = bitmap_name("st", "a/b c"), bitmap_name("st", "a:b c")
    assert one != two
    for name in (one, two, bitmap_name("st", "x" * 5000)):
        assert len(name) < 300
        assert all(c.isalnum() or c in "-_." for c in name)
    # A next bitmap can never be mistaken for some id's bitmap.
    assert next_bitmap_name(bitmap_name("st", "x")) != bitmap_name("st", "x+next")


def test_raw_is_always_none(log: LogRecorder) -> None:
    p = plan(info(fmt="raw"), log)
    assert (p.mode, p.name, p.next_name, p.remove) == (BitmapMode.NONE, None, None, ())
    assert len(log.at("info")) == 1
    log.lines.clear()
    assert plan(info(fmt="raw"), log, bitmap_id=None).mode is BitmapMode.NONE
    assert log.lines == []


def test_no_bitmap_id_removes_this_storages_bitmaps(log: LogRecorder) -> None:
    i = info((B, {"auto"}), (NEXT, {"auto"}), ("pvebackup-st2-x", {"auto"}), ("other", set()))
    p = plan(i, log, bitmap_id=None)
    assert p.mode is BitmapMode.NONE
    assert p.remove == (B, NEXT)
    assert len(log.at("info")) == 2


def test_missing_bitmap_is_new(log: LogRecorder) -> None:
    p = plan(info(("pvebackup-st-other", {"auto"})), log)
    assert (p.mode, p.name, p.next_name, p.remove) == (BitmapMode.NEW, B, NEXT, ())
    assert log.lines == []


def test_leftover_next_alone_is_removed(log: LogRecorder) -> None:
    p = plan(info((NEXT, {"auto"})), log)
    assert (p.mode, p.remove) == (BitmapMode.NEW, (NEXT,))


def test_consistent_bitmap_is_reused(log: LogRecorder) -> None:
    p = plan(info((B, {"auto"})), log)
    assert (p.mode, p.name, p.next_name, p.remove) == (BitmapMode.REUSE, B, NEXT, ())
    assert log.lines == []


def test_inconsistent_bitmaps_are_recreated_with_a_warning(log: LogRecorder) -> None:
    cases = [
        (info((B, {"auto", "in-use"})), (B,), "in-use"),
        (info((B, set())), (B,), "disabled"),
        (info((B, {"auto"}), (NEXT, {"auto"})), (B, NEXT), "left over"),
    ]
    for i, remove, why in cases:
        log.lines.clear()
        p = plan(i, log)
        assert (p.mode, p.name, p.remove) == (BitmapMode.NEW, B, remove)
        [warning] = log.at("warn")
        assert why in warning and B in warning and "whole disk" in warning
