"""Typed storage properties: each kind, file:line errors, typed values for consumers."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvebackup.api.errors import StorageConfigError
from pvebackup.providers.directory.settings import BackupDirSettings
from pvebackup.providers.store.settings import StoreSettings
from pvebackup.storage import (
    PropertyKind,
    PropertySpec,
    parse_properties,
    parse_storage_config,
)
from pvebackup.storage.properties import parse_boolean

K = PropertyKind


@pytest.mark.parametrize(
    ("text", "value"),
    [(t, True) for t in ("1", "yes", "YES", "on", "true", "True")]
    + [(t, False) for t in ("0", "no", "off", "false", "FALSE")],
)
def test_bool_accepts_pve_spellings(text: str, value: bool) -> None:
    assert PropertySpec(K.BOOL).parse(text) is value
    assert parse_boolean(text) is value


@pytest.mark.parametrize(
    ("spec", "text", "value"),
    [
        (PropertySpec(K.INT, minimum=-1), "-1", -1),
        (PropertySpec(K.INT, minimum=0, maximum=10), "10", 10),
        (PropertySpec(K.SIZE), "4M", 4 << 20),
        (PropertySpec(K.SIZE, maximum=1 << 30), "1G", 1 << 30),
        (PropertySpec(K.ENUM, choices=("tar", "directory")), "directory", "directory"),
        (PropertySpec(K.PATH), "/srv/x", Path("/srv/x")),
        (PropertySpec(), " anything goes ", " anything goes "),
    ],
)
def test_each_kind_parses_to_its_type(spec: PropertySpec, text: str, value: object) -> None:
    parsed = spec.parse(text)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize(
    ("spec", "text", "needle"),
    [
        (PropertySpec(K.BOOL), "maybe", "yes/no"),
        (PropertySpec(K.BOOL), "", "yes/no"),
        (PropertySpec(K.INT), "1_000", "whole number"),
        (PropertySpec(K.INT), "١", "whole number"),  # int() would take it
        (PropertySpec(K.INT), " 5", "whole number"),
        (PropertySpec(K.INT, minimum=-1), "-2", "at least -1"),
        (PropertySpec(K.INT, maximum=10), "11", "at most 10"),
        (PropertySpec(K.SIZE, minimum=64 << 10), "1K", "at least 64.0 KiB"),
        (PropertySpec(K.SIZE, maximum=16 << 20), "1G", "at most 16.0 MiB"),
        (PropertySpec(K.SIZE), "4MB", "no size"),
        (PropertySpec(K.ENUM, choices=("tar", "directory")), "TAR", "one of tar, directory"),
        (PropertySpec(K.PATH), "relative/x", "not an absolute path"),
        (PropertySpec(K.PATH), "/a\0b", "NUL"),
    ],
)
def test_bad_values_say_why(spec: PropertySpec, text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        spec.parse(text)


def test_flag_is_the_older_spelling_of_bool() -> None:
    assert PropertySpec(flag=True).kind is K.BOOL
    assert PropertySpec("size").kind is K.SIZE  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="PropertyKind"):
        PropertySpec(True)  # type: ignore[arg-type]  # the old positional "required"
    assert PropertySpec(K.BOOL).flag and not PropertySpec(K.SIZE).flag
    assert PropertySpec(flag=True) == PropertySpec(K.BOOL)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": K.ENUM},  # enum without choices
        {"choices": ("a",)},  # choices on a string
        {"kind": K.BOOL, "minimum": 0},  # range on a bool
        {"kind": K.PATH, "flag": True},  # flag on a path
        {"required": True, "default": "x"},
    ],
)
def test_declaration_mistakes_fail_when_the_plugin_is_defined(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PropertySpec(**kwargs)  # type: ignore[arg-type]


BAD_VALUES = [
    # (section, bad property line, words in the message)
    ("backup-dir: bk\n\tpath /srv/b\n", "\tbitmap maybe", ["'bitmap'", "yes/no"]),
    ("backup-dir: bk\n\tpath /srv/b\n", "\tct-format zip", ["'ct-format'", "tar, directory"]),
    ("backup-dir: bk\n\tpath /srv/b\n", "\tis_mountpoint mnt", ["is_mountpoint", "absolute"]),
    ("backup-store: st\n\tpath /srv/s\n", "\tchunk-size 3M", ["chunk-size", "power of two"]),
    ("backup-store: st\n\tpath /srv/s\n", "\tchunk-size 4MB", ["chunk-size", "4M or 4MiB"]),
    ("backup-store: st\n\tpath /srv/s\n", "\tchunk-size 32M", ["at most 16.0 MiB"]),
    ("backup-store: st\n\tpath /srv/s\n", "\tencryption-key k.key", ["not an absolute"]),
    ("dir: dd\n\tpath /srv/d\n", "\tpreallocation bogus", ["off, metadata, falloc, full"]),
    ("dir: dd\n\tpath /srv/d\n", "\tmax-protected-backups -5", ["at least -1"]),
    ("dir: dd\n\tpath /srv/d\n", "\tdisable perhaps", ["'disable'", "yes/no"]),
]


@pytest.mark.parametrize(("section", "line", "words"), BAD_VALUES)
def test_bad_value_is_refused_when_read_naming_its_line(
    section: str, line: str, words: list[str]
) -> None:
    # a comment first, so that the property's own line (4) differs from the header's
    text = f"# storage.cfg\n{section}{line}\n\tcontent backup\n"
    with pytest.raises(StorageConfigError) as info:
        parse_storage_config(text, "/etc/pve/storage.cfg")
    assert str(info.value).startswith("/etc/pve/storage.cfg:4: "), info.value
    for word in words:
        assert word in str(info.value)


def test_consumers_get_typed_values_from_storage_cfg() -> None:
    cfg = parse_storage_config(
        "backup-dir: bk\n\tpath /srv/b\n\tbitmap off\n\tcreate-base-path yes\n"
        "\tis_mountpoint /mnt\n\n"
        "backup-store: st\n\tpath /srv/s\n\tchunk-size 256K\n\tmkdir 0\n\n"
        "dir: dd\n\tpath /srv/d\n\tmax-protected-backups 3\n\tshared\n"
    )
    b = cfg.typed("bk")
    assert b.flag("bitmap") is False and b.text("ct-format") == "tar"  # the default
    assert b.path("path") == Path("/srv/b") and b["is_mountpoint"] == Path("/mnt")
    settings = BackupDirSettings.from_scfg(cfg["bk"].scfg(), "bk")
    assert not settings.use_bitmap and settings.ct_format == "tar"
    assert settings.base.create_base_path and settings.base.mountpoint == Path("/mnt")

    s = cfg.typed("st")
    assert s.number("chunk-size") == 256 << 10 and s.flag("mkdir", None) is False
    assert s.flag("create-base-path", None) is None  # unset stays distinguishable
    assert StoreSettings.from_scfg(cfg["st"].scfg(), "st").chunk_size == 256 << 10

    d = cfg.typed("dd")
    assert d.number("max-protected-backups") == 3 and d.flag("shared") is True
    assert d.flag("disable") is False and not cfg.disabled("dd")
    with pytest.raises(TypeError, match="'shared' is bool, not int"):
        d.number("shared")


def test_typed_values_follow_edits() -> None:
    cfg = parse_storage_config("backup-dir: bk\n\tpath /srv/b\n")
    assert cfg.typed("bk").flag("bitmap") is True
    cfg["bk"].properties["bitmap"] = "no"
    assert cfg.typed("bk").flag("bitmap") is False
    cfg["bk"].properties["bitmap"] = "sometimes"
    with pytest.raises(StorageConfigError, match="'bitmap'"):
        cfg.typed("bk")


def test_pve_types_know_their_properties() -> None:
    # Proxmox VE types we only recognise: their declared options, flags parsed.
    cfg = parse_storage_config("zfspool: local-zfs\n\tpool rpool/data\n\tsparse\n"
                               "\tdisable yes\n")
    props = cfg.typed("local-zfs")
    assert props["pool"] == "rpool/data" and props["sparse"] is True
    assert props["disable"] is True and cfg.disabled("local-zfs")
    # sparse is a zfspool option, not an lvmthin one: a typo-class error there
    with pytest.raises(StorageConfigError, match="unknown property 'sparse'"):
        parse_storage_config("lvmthin: local-lvm\n\tthinpool data\n\tsparse\n")


def test_parse_properties_for_a_scfg_made_in_code() -> None:
    specs = {"path": PropertySpec(K.PATH, required=True), "n": PropertySpec(K.INT)}
    with pytest.raises(StorageConfigError, match="storage 'x': needs 'path'"):
        parse_properties(specs, {"type": "t", "n": "1"}, "x")
    with pytest.raises(StorageConfigError, match="unknown property 'other'"):
        parse_properties(specs, {"path": "/p", "other": "1"}, "x")
    with pytest.raises(StorageConfigError, match="storage 'x': property 'n': must be a whole"):
        parse_properties(specs, {"path": "/p", "n": "one"}, "x")
