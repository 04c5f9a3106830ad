"""Fuzzing storage.cfg: success or ``StorageConfigError`` naming the file, never
another exception; what parses writes back to what parses the same."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import FUZZ, typed_or_ok
from pvebackup.api.errors import StorageConfigError
from pvebackup.storage import parse_storage_config, read_storage_config
from pvebackup.storage.config import NAME_MAX, StorageConfig, path_problem

VALID = """\
# node storage
dir: local
\tpath /var/lib/vz
\tcontent images,rootdir
\tshared

backup-dir: bk
\tpath /srv/backups
\tbitmap 0
\tct-format directory

backup-store: st
\tpath /srv/store
\tencryption-key /etc/pvebackup/st.key
\tchunk-size 256K
"""

_HOSTILE_TEXT = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        ["", " ", "\t", ":", "dir:", "x" * 300, "/" + "y" * 256, "/" + "/".join(["z" * 250] * 20),
         "\x00", "/a\x00b", "\udcff", "é", "\r", "\x0b", "\u2028", "relative/path", "#"]
    ),
)  # fmt: skip


@st.composite
def _mutated_config(draw: st.DrawFn) -> str:
    lines = VALID.splitlines()
    how = draw(st.sampled_from(["value", "value", "line", "insert", "delete", "raw"]))
    if how == "raw":
        return draw(st.text(max_size=300))
    i = draw(st.integers(0, len(lines) - 1))
    if how == "delete":
        del lines[i]
    elif how == "insert":
        lines.insert(i, draw(_HOSTILE_TEXT))
    elif how == "line":
        lines[i] = draw(_HOSTILE_TEXT)
    else:  # keep the key, replace the value: reaches the property checks
        head = lines[i].split(" ", 1)[0] if lines[i].startswith("\t") else lines[i]
        lines[i] = f"{head} {draw(_HOSTILE_TEXT)}" if lines[i].startswith("\t") else (
            f"{lines[i].split(':')[0]}: {draw(_HOSTILE_TEXT)}"
        )
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n\n"]))


@FUZZ
@given(_mutated_config())
def test_storage_cfg_parses_or_gives_a_config_error(text: str) -> None:
    result = typed_or_ok(lambda: parse_storage_config(text, "storage.cfg"))
    assert isinstance(result, StorageConfig | StorageConfigError)
    if isinstance(result, StorageConfigError):
        assert str(result).startswith("storage.cfg")
        return
    again = parse_storage_config(result.to_text(), "storage.cfg")
    assert {k: v.scfg() for k, v in again.items()} == {k: v.scfg() for k, v in result.items()}
    for section in result.values():  # every accepted path is usable
        for key in ("path", "encryption-key"):
            if key in section.properties:
                assert path_problem(section.properties[key]) is None


@FUZZ
@given(st.binary(max_size=300))
def test_storage_cfg_file_of_any_bytes_gives_a_config_error(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "storage.cfg"
    path.write_bytes(raw)
    result = typed_or_ok(lambda: read_storage_config(path))
    assert isinstance(result, StorageConfig | StorageConfigError)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("/srv/" + "x" * (NAME_MAX + 1), "NAME_MAX"),
        ("/" + "/".join(["y" * 200] * 20), "too long"),
        ("srv/backups", "absolute"),
        ("/srv/a\x00b", "NUL"),
    ],
)
def test_storage_path_limits(value: str, problem: str) -> None:
    text = f"backup-dir: bk\n\tpath {value}\n"
    with pytest.raises(StorageConfigError, match=problem) as info:
        parse_storage_config(text, "storage.cfg")
    assert info.value.line == 2
    assert path_problem("/srv/" + "x" * NAME_MAX) is None


def test_storage_cfg_that_is_a_directory_gives_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "storage.cfg").mkdir()
    with pytest.raises(StorageConfigError, match="cannot read"):
        read_storage_config(tmp_path / "storage.cfg")
