"""storage.cfg: parsing, validation errors with file:line, round trip, atomic write."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from pvebackup.api.errors import (
    ConfigError,
    PluginError,
    StorageConfigError,
    StorageNotFoundError,
    UnsupportedError,
)
from pvebackup.storage import (
    COMMON_PROPERTIES,
    PropertySpec,
    StoragePlugin,
    parse_storage_config,
    read_storage_config,
    registered,
    registry,
    storage_config,
    valid_storeid,
    write_storage_config,
)

SAMPLE = """\
# storage.cfg written by hand
# second header comment

dir: local
\tpath /var/lib/vz
\tcontent iso,vztmpl,backup
\tshared

# the fast disk
dir: fast-1
\t# where it is mounted
\tpath /mnt/fast
\tdisable
\tnodes pve1,pve2
\t# trailing comment inside the section

dir: Spaced.ID
    path   /srv/spaced  
    shared 0
# end of file comment
"""


class ProvPlugin(StoragePlugin):
    type: ClassVar[str] = "testprov"
    properties: ClassVar[dict[str, PropertySpec]] = {
        **COMMON_PROPERTIES,
        "server": PropertySpec(required=True),
        "datastore": PropertySpec(required=True),
        "fingerprint": PropertySpec(),
    }


@pytest.fixture
def testprov() -> Iterator[None]:
    with registered(ProvPlugin):
        yield


def test_parse_sections_properties_and_flags() -> None:
    cfg = parse_storage_config(SAMPLE)
    assert list(cfg) == ["local", "fast-1", "Spaced.ID"]
    assert cfg["local"].type == "dir"
    assert cfg["local"].properties == {
        "path": "/var/lib/vz",
        "content": "iso,vztmpl,backup",
        "shared": "1",
    }
    assert cfg["fast-1"].properties == {
        "path": "/mnt/fast",
        "disable": "1",
        "nodes": "pve1,pve2",
    }
    # any leading whitespace, inner whitespace kept, trailing whitespace dropped
    assert cfg["Spaced.ID"].properties == {"path": "/srv/spaced", "shared": "0"}
    assert cfg["fast-1"].line == 10


def test_round_trip_is_byte_exact() -> None:
    assert parse_storage_config(SAMPLE).to_text() == SAMPLE


def test_round_trip_of_empty_and_comment_only_files() -> None:
    assert parse_storage_config("").to_text() == ""
    only = "# nothing configured\n\n"
    assert parse_storage_config(only).to_text() == only


def test_edits_keep_comments_and_untouched_lines() -> None:
    cfg = parse_storage_config(SAMPLE)
    cfg["local"].properties["content"] = "images"
    cfg["local"].properties["disable"] = "1"
    del cfg["fast-1"].properties["path"]
    cfg["fast-1"].properties["path"] = "/mnt/new"
    text = cfg.to_text()
    assert "\tcontent images\n\tshared\n\tdisable\n" in text
    # the comment that stood before 'path' stays, also when path moved
    assert "\t# where it is mounted\n" in text
    assert "\tpath /mnt/new\n" in text
    assert "    path   /srv/spaced  \n" in text  # untouched spelling kept
    assert text.startswith("# storage.cfg written by hand\n# second header comment\n\n")
    assert text.endswith("# end of file comment\n")
    again = parse_storage_config(text)
    assert again["fast-1"].properties["path"] == "/mnt/new"
    assert again["local"].properties["disable"] == "1"


def test_add_and_remove() -> None:
    cfg = parse_storage_config("dir: local\n\tpath /a\n")
    section = cfg.add("dir", "store2", {"path": "/b", "shared": "1"})
    assert section.scfg() == {"type": "dir", "path": "/b", "shared": "1"}
    assert cfg.to_text() == "dir: local\n\tpath /a\n\ndir: store2\n\tpath /b\n\tshared\n"
    cfg.remove("local")
    assert cfg.to_text() == "dir: store2\n\tpath /b\n\tshared\n"
    with pytest.raises(StorageNotFoundError, match="'local'"):
        cfg.remove("local")


@pytest.mark.parametrize(
    ("plugin_type", "storeid", "props", "needle"),
    [
        ("dir", "x", {"path": "/a"}, "invalid storage id 'x'"),
        ("dir", "local", {"path": "/a"}, "duplicate storage id 'local'"),
        ("nosuch", "other", {}, "unsupported type 'nosuch'"),
        ("dir", "other", {}, "lacks required property path"),
        ("dir", "other", {"path": "/a", "colour": "red"}, "unknown property 'colour'"),
    ],
)
def test_add_validates_like_parsing(
    plugin_type: str, storeid: str, props: dict[str, str], needle: str
) -> None:
    cfg = parse_storage_config("dir: local\n\tpath /a\n", "/etc/pve/storage.cfg")
    with pytest.raises(StorageConfigError, match=needle) as info:
        cfg.add(plugin_type, storeid, props)
    assert str(info.value).startswith("/etc/pve/storage.cfg: ")
    assert list(cfg) == ["local"]


def test_header_without_blank_line_starts_a_new_section() -> None:
    text = "dir: a1\n\tpath /a\n# about b\ndir: b1\n\tpath /b\n"
    cfg = parse_storage_config(text)
    assert cfg["a1"].properties == {"path": "/a"}
    assert cfg["b1"].properties == {"path": "/b"}
    assert cfg.to_text() == "dir: a1\n\tpath /a\n\n# about b\ndir: b1\n\tpath /b\n"


BAD_INPUT = [
    # (text, line, words in the message)
    ("dir: local\n\tpath /a\n\nzfz: tank\n\tpool rpool\n", 4, ["unsupported type 'zfz'"]),
    (
        "dir: local\n\tpath /a\n\ndir: local\n\tpath /b\n",
        4,
        ["duplicate storage id 'local'", "first defined on line 1"],
    ),
    ("\tpath /a\n", 1, ["outside a section"]),
    ("dir: local\n\tpath /a\n\n\tcontent images\n", 4, ["outside a section"]),
    ("dir: 1local\n\tpath /a\n", 1, ["invalid storage id '1local'"]),
    ("dir: local-\n\tpath /a\n", 1, ["invalid storage id 'local-'"]),
    ("dir: l\n\tpath /a\n", 1, ["invalid storage id 'l'"]),
    ("dir: lo/cal\n\tpath /a\n", 1, ["invalid storage id 'lo/cal'"]),
    (
        "dir: local\n\tpath /a\n\tcolour red\n",
        3,
        ["unknown property 'colour'", "type 'dir'", "known:", "path"],
    ),
    ("# c\ndir: local\n\tcontent images\n", 2, ["lacks required property path"]),
    ("dir: local\n\tpath /a\n\tpath /b\n", 3, ["duplicate property 'path'"]),
    ("dir: local\n\tpath\n", 2, ["property 'path' needs a value"]),
    ("dir: local\n\tpath /a\n\tshared maybe\n", 3, ["property 'shared'", "'maybe'", "yes/no"]),
    ("dir local\n\tpath /a\n", 1, ["expected a section header"]),
    ("dir: local extra\n\tpath /a\n", 1, ["expected a section header"]),
    ("dir:\n", 1, ["expected a section header"]),
]


@pytest.mark.parametrize(("text", "line", "words"), BAD_INPUT)
def test_bad_input_names_file_and_line(text: str, line: int, words: list[str]) -> None:
    with pytest.raises(StorageConfigError) as info:
        parse_storage_config(text, "/etc/pve/storage.cfg")
    err = info.value
    assert str(err).startswith(f"/etc/pve/storage.cfg:{line}: ")
    assert (err.path, err.line) == ("/etc/pve/storage.cfg", line)
    for word in words:
        assert word in str(err)
    assert isinstance(err, ConfigError) and err.exit_code == 2


PVE_NODE_CFG = """\
dir: local
\tpath /var/lib/vz
\tcontent iso,vztmpl,backup

lvmthin: local-lvm
\tthinpool data
\tvgname pve
\tcontent rootdir,images

nfs: nas
\texport /volume1/pve
\tpath /mnt/pve/nas
\tserver 192.0.2.10
\tcontent backup,iso
\toptions vers=4.2
\tprune-backups keep-daily=7,keep-last=3

pbs: pbs1
\tdatastore main
\tserver pbs.example
\tcontent backup
\tfingerprint aa:bb:cc
\tusername backup@pbs
\tnamespace site1

zfspool: tank
\tpool rpool/data
\tsparse
\tcontent images,rootdir
"""


def test_a_real_nodes_storage_cfg_parses_and_round_trips() -> None:
    """The installer's lvmthin and the usual NFS/PBS/ZFS sections are recognised."""
    cfg = parse_storage_config(PVE_NODE_CFG)
    assert list(cfg) == ["local", "local-lvm", "nas", "pbs1", "tank"]
    assert storage_config(cfg, "tank")["sparse"] == "1"
    assert storage_config(cfg, "nas")["prune-backups"] == "keep-daily=7,keep-last=3"
    assert cfg.to_text() == PVE_NODE_CFG
    lvm = registry.lookup("lvmthin")
    assert (
        lvm.new_backup_provider(
            storage_config(cfg, "local-lvm"), "local-lvm", lambda level, msg: None
        )
        is None
    )
    # The installer's local-lvm resolves as `pvesm path` does; PBS holds no disks.
    assert str(lvm.image_path(storage_config(cfg, "local-lvm"), "vm-100-disk-0")) == (
        "/dev/pve/vm-100-disk-0"
    )
    with pytest.raises(UnsupportedError, match="lvmthin, zfspool and rbd storages only"):
        registry.lookup("pbs").image_path(storage_config(cfg, "pbs1"), "vm-100-disk-0")


def test_unknown_type_lists_known_types() -> None:
    with pytest.raises(StorageConfigError, match="known types: .*dir"):
        parse_storage_config("pbss: backup\n\tserver x\n")


@pytest.mark.usefixtures("testprov")
def test_properties_and_required_ones_come_from_the_plugin() -> None:
    text = "testprov: remote\n\tserver 10.0.0.1\n\tdatastore main\n\tshared\n"
    cfg = parse_storage_config(text)
    assert storage_config(cfg, "remote") == {
        "type": "testprov",
        "server": "10.0.0.1",
        "datastore": "main",
        "shared": "1",
    }
    with pytest.raises(StorageConfigError) as info:
        parse_storage_config("\n\ntestprov: remote\n\tserver 10.0.0.1\n", "s.cfg")
    assert str(info.value).startswith("s.cfg:3: ")
    assert "lacks required property datastore" in str(info.value)


def test_a_refused_plugin_type_is_a_config_error_with_the_reason() -> None:
    def lookup(plugin_type: str) -> StoragePlugin:
        raise PluginError(f"storage plugin '{plugin_type}' failed to load: boom")

    with pytest.raises(StorageConfigError) as info:
        parse_storage_config("broken: st1\n\tpath /a\n", "f.cfg", lookup=lookup)
    assert str(info.value).startswith("f.cfg:1: ")
    assert "failed to load: boom" in str(info.value)
    assert isinstance(info.value.__cause__, PluginError)


def test_storage_config_returns_a_copy_with_type() -> None:
    cfg = parse_storage_config(SAMPLE)
    scfg = storage_config(cfg, "local")
    assert scfg["type"] == "dir" and scfg["path"] == "/var/lib/vz"
    scfg["path"] = "/elsewhere"
    assert cfg["local"].properties["path"] == "/var/lib/vz"


def test_storage_config_unknown_id_names_it_and_the_known_ones() -> None:
    cfg = parse_storage_config(SAMPLE, "/etc/pve/storage.cfg")
    with pytest.raises(StorageNotFoundError) as info:
        storage_config(cfg, "nas")
    msg = str(info.value)
    assert "'nas'" in msg and "local, fast-1, Spaced.ID" in msg
    assert "/etc/pve/storage.cfg" in msg
    assert info.value.exit_code == 3


@pytest.mark.parametrize(
    ("storeid", "ok"),
    [
        ("local", True),
        ("a1", True),
        ("Local-LVM_2.x", True),
        ("a", False),
        ("1a", False),
        ("a-", False),
        ("a b", False),
        ("", False),
        ("a:b", False),
    ],
)
def test_valid_storeid(storeid: str, ok: bool) -> None:
    assert valid_storeid(storeid) is ok


def test_read_and_write_files(tmp_path: Path) -> None:
    path = tmp_path / "storage.cfg"
    path.write_text(SAMPLE)
    path.chmod(0o600)
    cfg = read_storage_config(path)
    assert cfg.path == str(path)
    cfg["local"].properties["content"] = "images"
    write_storage_config(cfg, path)
    assert read_storage_config(path)["local"].properties["content"] == "images"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # mode kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["storage.cfg"]  # no temp left


def test_write_new_file_gets_0640(tmp_path: Path) -> None:
    cfg = parse_storage_config(SAMPLE)
    target = tmp_path / "new.cfg"
    write_storage_config(cfg, target)
    assert target.read_text() == SAMPLE
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_write_failure_is_a_config_error_and_leaves_the_file(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root ignores directory permissions: make rename impossible instead
        target = tmp_path / "dir-in-the-way"
        (target / "x").mkdir(parents=True)
    else:  # pragma: no cover - tests run as root here
        target = tmp_path / "ro" / "storage.cfg"
        target.parent.mkdir()
        target.parent.chmod(0o500)
    with pytest.raises(StorageConfigError, match="cannot write"):
        write_storage_config(parse_storage_config(SAMPLE), target)
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == []


def test_read_errors(tmp_path: Path) -> None:
    with pytest.raises(StorageConfigError, match="missing.cfg: cannot read"):
        read_storage_config(tmp_path / "missing.cfg")
    bad = tmp_path / "bad.cfg"
    bad.write_bytes(b"dir: local\n\tpath /\xff\n")
    with pytest.raises(StorageConfigError, match="bad.cfg: not UTF-8"):
        read_storage_config(bad)
    bad.write_text("dir: local\n\tpath /a\n\tbogus 1\n")
    with pytest.raises(StorageConfigError, match=r"bad\.cfg:3: "):
        read_storage_config(bad, strict=True)
    # a node's file is read leniently; using the broken storage gives its error
    cfg = read_storage_config(bad)
    assert list(cfg) == [] and list(cfg.broken) == ["local"]
    with pytest.raises(StorageConfigError, match=r"bad\.cfg:3: .*unknown property 'bogus'"):
        storage_config(cfg, "local")
