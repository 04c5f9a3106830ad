"""Key files: 0600, never overwritten, passphrase protection, clear errors, no leaks."""

from __future__ import annotations

import json
import pickle
import stat
from pathlib import Path

import pytest

from pvebackup.api.errors import KeyFileError, MissingKeyError, WrongKeyError
from pvebackup.store.keys import EncryptionKey, create_key_file, load_key_file

FAST_N = 2**10  # scrypt cost for tests; the default is 2**15


def test_plain_key_file_round_trip_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    key = create_key_file(path, None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key_file(path) == key
    doc = json.loads(path.read_text())
    assert doc["kdf"] == {"name": "none"}
    assert doc["fingerprint"] == key.fingerprint


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    path.write_text("precious")
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        create_key_file(path, None)
    assert path.read_text() == "precious"


def test_passphrase_round_trip_and_wrong_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    key = create_key_file(path, "correct horse", scrypt_n=FAST_N)
    text = path.read_text()
    assert "correct horse" not in text
    assert json.loads(text)["kdf"]["name"] == "scrypt"
    assert load_key_file(path, lambda: "correct horse") == key
    with pytest.raises(WrongKeyError, match="wrong passphrase") as info:
        load_key_file(path, lambda: "wrong horse")
    assert "wrong horse" not in str(info.value)
    with pytest.raises(MissingKeyError, match="passphrase"):
        load_key_file(path)


def test_passphrase_provider_not_called_for_plain_file(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    create_key_file(path, None)

    def provider() -> str:
        raise AssertionError("must not be asked")

    load_key_file(path, provider)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: "not json{",
        lambda d: json.dumps([1]),
        lambda d: json.dumps({**d, "format": "other"}),
        lambda d: json.dumps({**d, "version": 99}),
        lambda d: json.dumps({**d, "kdf": {"name": "rot13"}}),
        lambda d: json.dumps({**d, "key": "!!!not base64"}),
        lambda d: json.dumps({**d, "key": "AAAA"}),
        lambda d: json.dumps({**d, "fingerprint": "00:00:00:00:00:00:00:00"}),
        lambda d: json.dumps({k: v for k, v in d.items() if k != "kdf"}),
    ],
)
def test_malformed_key_files(tmp_path: Path, mutate: object) -> None:
    path = tmp_path / "k.json"
    create_key_file(path, None)
    doc = json.loads(path.read_text())
    bad = tmp_path / "bad.json"
    bad.write_text(mutate(doc))  # type: ignore[operator]
    bad.chmod(0o600)  # private: the content, not the mode, is what is wrong here
    with pytest.raises(KeyFileError):
        load_key_file(bad)


def test_hostile_scrypt_parameters_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    create_key_file(path, "pw", scrypt_n=FAST_N)
    doc = json.loads(path.read_text())
    doc["kdf"]["n"] = 2**30
    path2 = tmp_path / "k2.json"
    path2.write_text(json.dumps(doc))
    path2.chmod(0o600)
    with pytest.raises(KeyFileError, match="scrypt"):
        load_key_file(path2, lambda: "pw")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read"):
        load_key_file(tmp_path / "nope")


def test_key_material_never_shown() -> None:
    material = bytes(range(32))
    key = EncryptionKey(material)
    for text in (repr(key), str(key), f"{key}", repr([key])):
        assert material.hex() not in text
        assert key.fingerprint in text
    with pytest.raises(TypeError):
        pickle.dumps(key)


def test_derived_keys_are_distinct_and_stable() -> None:
    key = EncryptionKey(bytes(range(32)))
    derived = {key.cipher_key, key.id_key, key.signing_key, key.material}
    assert len(derived) == 4
    assert EncryptionKey(bytes(range(32))).id_key == key.id_key
    assert EncryptionKey(bytes(32)).fingerprint != key.fingerprint
    with pytest.raises(KeyFileError):
        EncryptionKey(b"short")
