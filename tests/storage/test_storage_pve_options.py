"""storage.cfg as real nodes write it: PVE's options, legacy ones, bad sections isolated."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pvebackup.api.errors import StorageConfigError, StorageNotFoundError
from pvebackup.storage import (
    parse_storage_config,
    read_storage_config,
    storage_config,
    write_storage_config,
)

NODE_CFG = """\
dir: local
\tpath /var/lib/vz
\tcontent iso,vztmpl,backup
\tmaxfiles 3

lvmthin: local-lvm
\tthinpool data
\tvgname pve
\tcontent rootdir,images

dir: chain
\tpath /srv/chain
\tsnapshot-as-volume-chain 1
\tcontent images

nfs: typo
\tpath /mnt/pve/typo
\tserver 10.0.0.1
\texport /srv
\tcontnet images

rbd: ceph
\tpool vms
\tkrbd 1
\tfsid fc4181a6-56eb-4f68-b452-8ba1f381ca2a

glusterfs: old
\tpath /mnt/pve/old
\tvolume gv0
\tserver 10.0.0.2

pbs: backup
\tserver 10.0.0.3
\tdatastore main
\tfingerprint aa:bb
"""


def test_legacy_and_current_options_are_accepted_with_warnings() -> None:
    cfg = parse_storage_config(NODE_CFG, "/etc/pve/storage.cfg", strict=False)
    assert list(cfg) == ["local", "local-lvm", "chain", "ceph", "old", "backup"]
    assert cfg.typed("local")["maxfiles"] == 3
    assert cfg.typed("chain")["snapshot-as-volume-chain"] is True
    assert cfg.typed("ceph")["krbd"] is True
    assert cfg.warnings == [
        "/etc/pve/storage.cfg:4: storage 'local': 'maxfiles' is deprecated since PVE 7 "
        "and dropped in PVE 9; use 'prune-backups keep-last=N'",
        "/etc/pve/storage.cfg:27: storage 'old': the glusterfs storage type was dropped "
        "in PVE 9",
    ]


def test_one_bad_section_never_hides_the_others() -> None:
    cfg = parse_storage_config(NODE_CFG, "/etc/pve/storage.cfg", strict=False)
    assert "typo" not in cfg and list(cfg.broken) == ["typo"]
    assert [e.line for e in cfg.errors] == [20]
    # using it names the real problem, not "does not exist"
    with pytest.raises(StorageConfigError, match=r"storage.cfg:20: .*unknown property 'contnet'"):
        storage_config(cfg, "typo")
    with pytest.raises(StorageConfigError, match="contnet"):
        cfg.typed("typo")
    with pytest.raises(StorageNotFoundError):
        storage_config(cfg, "nosuch")
    assert storage_config(cfg, "backup")["datastore"] == "main"
    # strict parsing (tools that write the file) still stops at the first error
    with pytest.raises(StorageConfigError, match=":20: "):
        parse_storage_config(NODE_CFG, "/etc/pve/storage.cfg")


@pytest.mark.parametrize(
    ("bad", "good_after"),
    [
        ("bogus-type: x\n\tpath /a\n", True),  # unknown type: its properties go with it
        ("dir: 1bad\n\tpath /a\n", True),  # invalid id
        ("dir: nopath\n\tcontent images\n", True),  # a required property missing
        ("dir: badbool\n\tpath /a\n\tshared maybe\n", True),  # a value that does not parse
        ("not a header line\n\tpath /a\n", True),
        ("\tpath /orphan\n", True),  # a property outside any section
        ("dir: dup\n\tpath /a\n\tpath /b\n", True),  # a duplicate property
    ],
)
def test_hostile_sections_are_isolated(bad: str, good_after: bool) -> None:
    text = f"dir: before\n\tpath /b\n\n{bad}\n# notes\ndir: after\n\tpath /c\n"
    cfg = parse_storage_config(text, "s.cfg", strict=False)
    assert list(cfg) == ["before", "after"]
    assert len(cfg.errors) == 1 and cfg.errors[0].line is not None
    assert str(cfg.errors[0]).startswith(f"s.cfg:{cfg.errors[0].line}: ")


def test_a_duplicate_id_keeps_the_first() -> None:
    text = "dir: aa\n\tpath /a\n\ndir: aa\n\tpath /other\n"
    cfg = parse_storage_config(text, "s.cfg", strict=False)
    assert storage_config(cfg, "aa")["path"] == "/a"
    assert "duplicate storage id" in str(cfg.errors[0]) and not cfg.broken


def test_truly_unknown_options_stay_errors() -> None:
    # an option of another type is unknown here (zfspool's 'sparse' on lvmthin)
    with pytest.raises(StorageConfigError, match="unknown property 'sparse'"):
        parse_storage_config("lvmthin: ll\n\tthinpool data\n\tvgname pve\n\tsparse 1\n")
    with pytest.raises(StorageConfigError, match="unknown property 'maxfiles'"):
        parse_storage_config("lvmthin: ll\n\tthinpool data\n\tmaxfiles 1\n")
    with pytest.raises(StorageConfigError, match="maxfiles"):
        parse_storage_config("dir: ll\n\tpath /a\n\tmaxfiles -1\n")


def test_read_logs_warnings_and_refuses_to_write_a_broken_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "storage.cfg"
    path.write_text(NODE_CFG)
    with caplog.at_level(logging.WARNING, logger="pvebackup.storage"):
        cfg = read_storage_config(path)
    text = caplog.text
    assert "maxfiles' is deprecated" in text and "contnet" in text and "left out" in text
    # writing it back would drop the broken section: refused, file untouched
    with pytest.raises(StorageConfigError, match="would be lost"):
        write_storage_config(cfg, path)
    assert path.read_text() == NODE_CFG
