"""Fuzzing key files: success or a typed error (KeyFileError, MissingKeyError,
WrongKeyError), never another exception; a key file that is huge, a FIFO or a
directory is refused without reading it whole or blocking."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import FUZZ, hostile_json_bytes, peak_memory, typed_or_ok
from pvebackup.api.errors import CryptoError, KeyFileError
from pvebackup.store.keys import EncryptionKey, load_key_file, write_key_file

KEY = EncryptionKey(bytes(range(32)))


def _doc(tmp: Path, passphrase: str | None) -> dict[str, object]:
    path = tmp / f"k-{passphrase is not None}.key"
    if not path.exists():
        write_key_file(path, KEY, passphrase, scrypt_n=2**4)
    doc: dict[str, object] = json.loads(path.read_bytes())
    return doc


@FUZZ
@given(st.booleans(), st.data())
def test_key_file_parser_is_typed(tmp_path: Path, wrapped: bool, data: st.DataObject) -> None:
    doc = _doc(tmp_path, "secret" if wrapped else None)
    raw = data.draw(hostile_json_bytes(doc))
    path = tmp_path / "fuzz.key"
    path.write_bytes(raw)
    os.chmod(path, 0o600)
    # A passphrase is offered only for scrypt parameters we allow anyway; a forged
    # file cannot make this costlier than _SCRYPT limits (checked before scrypt).
    result = typed_or_ok(lambda: load_key_file(path, lambda: "secret"))
    assert isinstance(result, EncryptionKey | CryptoError)
    if isinstance(result, EncryptionKey):
        assert result == KEY  # nothing but the real key may come out of it


def test_huge_key_file_is_not_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "huge.key"
    with open(path, "wb") as f:  # sparse: 1 GiB that costs no disk
        f.truncate(1 << 30)
    os.chmod(path, 0o600)
    peak = peak_memory(lambda: load_key_file(path))
    assert peak < 1 << 20
    with pytest.raises(KeyFileError, match="larger than"):
        load_key_file(path)


def test_key_file_that_is_a_fifo_or_directory_is_refused_without_blocking(
    tmp_path: Path,
) -> None:
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            load_key_file(fifo)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():  # unblock the reader so that the thread ends, then fail
        with open(fifo, "wb"):
            pass
        t.join(5)
        pytest.fail("reading a FIFO key file blocked")
    assert isinstance(outcome[0], KeyFileError)
    (tmp_path / "dir.key").mkdir()
    with pytest.raises(KeyFileError):
        load_key_file(tmp_path / "dir.key")
