"""Key file operations: show, change the passphrase, paper key; hostile key files."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import stat
from pathlib import Path

import pytest

from pvebackup.api.errors import (
    KeyFileError,
    LockedError,
    MissingKeyError,
    UnprotectedKeyFileError,
    WrongKeyError,
)
from pvebackup.store.keys import (
    PAPERKEY_BEGIN,
    change_key_passphrase,
    create_key_file,
    import_paperkey,
    key_file_info,
    load_key_file,
    paperkey_text,
)

FAST_N = 2**10


def protected(tmp_path: Path, name: str = "k.key", pw: str = "old pw") -> Path:
    path = tmp_path / name
    create_key_file(path, pw, scrypt_n=FAST_N)
    return path


def edit(path: Path, **changes: object) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def test_info_of_a_protected_key_needs_no_passphrase(tmp_path: Path) -> None:
    path = protected(tmp_path)
    key = load_key_file(path, lambda: "old pw")
    info = key_file_info(path)
    assert info.fingerprint == key.fingerprint
    assert info.kdf == "scrypt" and info.kdf_params == {"n": FAST_N, "r": 8, "p": 1}
    assert not info.verified
    assert info.created == json.loads(path.read_text())["created"]


def test_info_of_a_plain_key_checks_its_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    key = create_key_file(path, None)
    assert key_file_info(path).verified
    other = create_key_file(tmp_path / "other.key", None)
    edit(path, fingerprint=other.fingerprint)  # a lying fingerprint
    with pytest.raises(KeyFileError, match="fingerprint does not match"):
        key_file_info(path)
    assert key.fingerprint != other.fingerprint


def test_info_refuses_an_unprotected_key_file(tmp_path: Path) -> None:
    path = protected(tmp_path)
    path.chmod(0o640)
    with pytest.raises(UnprotectedKeyFileError):
        key_file_info(path)


@pytest.mark.parametrize(
    "changes",
    [
        {"created": "2024\x1b[2Jcleared"},  # terminal control in a field we print
        {"created": 17},
        {"fingerprint": "aa:bb\n"},
        {"fingerprint": None},
        {"kdf": {"name": "rot13"}},
        {"kdf": {"name": "scrypt", "n": 2**30, "r": 8, "p": 1, "salt": ""}},
    ],
)
def test_info_refuses_hostile_fields(tmp_path: Path, changes: dict[str, object]) -> None:
    path = protected(tmp_path)
    edit(path, **changes)
    path.chmod(0o600)
    with pytest.raises(KeyFileError):
        key_file_info(path)


def test_change_passphrase_keeps_key_fingerprint_created_and_mode(tmp_path: Path) -> None:
    path = protected(tmp_path)
    before = json.loads(path.read_text())
    key = load_key_file(path, lambda: "old pw")
    old = os.umask(0)  # the file must be 0600 whatever the umask
    try:
        assert change_key_passphrase(path, lambda: "old pw", "new pw", scrypt_n=FAST_N) == key
    finally:
        os.umask(old)
    after = json.loads(path.read_text())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert after["fingerprint"] == before["fingerprint"] and after["created"] == before["created"]
    assert after["kdf"]["salt"] != before["kdf"]["salt"] and after["key"] != before["key"]
    assert load_key_file(path, lambda: "new pw") == key
    with pytest.raises(WrongKeyError):
        load_key_file(path, lambda: "old pw")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_change_to_plain_and_back(tmp_path: Path) -> None:
    path = protected(tmp_path)
    key = change_key_passphrase(path, lambda: "old pw", None)
    assert key_file_info(path).kdf == "none" and load_key_file(path) == key
    change_key_passphrase(path, None, "again", scrypt_n=FAST_N)
    assert load_key_file(path, lambda: "again") == key


def test_wrong_current_passphrase_changes_nothing(tmp_path: Path) -> None:
    path = protected(tmp_path)
    before = path.read_bytes()
    with pytest.raises(WrongKeyError):
        change_key_passphrase(path, lambda: "guess", "new pw", scrypt_n=FAST_N)
    with pytest.raises(MissingKeyError):
        change_key_passphrase(path, None, "new pw", scrypt_n=FAST_N)
    assert path.read_bytes() == before


def test_change_refuses_an_unprotected_key_file(tmp_path: Path) -> None:
    path = protected(tmp_path)
    path.chmod(0o604)
    with pytest.raises(UnprotectedKeyFileError):
        change_key_passphrase(path, lambda: "old pw", "new pw", scrypt_n=FAST_N)
    assert stat.S_IMODE(path.stat().st_mode) == 0o604


def test_change_rewrites_a_symlinked_key_at_its_target(tmp_path: Path) -> None:
    real = protected(tmp_path, "real.key")
    link = tmp_path / "link.key"
    link.symlink_to(real)
    key = change_key_passphrase(link, lambda: "old pw", "new pw", scrypt_n=FAST_N)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert load_key_file(real, lambda: "new pw") == key


def test_change_is_exclusive_while_another_holds_the_file(tmp_path: Path) -> None:
    path = protected(tmp_path)
    before = path.read_bytes()
    with open(path, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(LockedError, match="another process"):
            change_key_passphrase(path, lambda: "old pw", "new pw", scrypt_n=FAST_N)
    assert path.read_bytes() == before


def test_change_refuses_when_the_file_is_replaced_meanwhile(tmp_path: Path) -> None:
    path = protected(tmp_path)
    newer = protected(tmp_path, "newer.key", pw="someone else's")
    newer_bytes = newer.read_bytes()

    def swap_then_answer() -> str:
        # Another admin replaces the key file while we are unwrapping the old one.
        os.replace(newer, path)
        return "old pw"

    with pytest.raises(LockedError, match="replaced meanwhile"):
        change_key_passphrase(path, swap_then_answer, "new pw", scrypt_n=FAST_N)
    assert path.read_bytes() == newer_bytes  # their key is not overwritten with ours


def test_paperkey_round_trip_protected(tmp_path: Path) -> None:
    path = protected(tmp_path)
    key = load_key_file(path, lambda: "old pw")
    text = paperkey_text(path)
    assert key.fingerprint in text and PAPERKEY_BEGIN in text
    assert base64.b64encode(key.material).decode() not in text  # still wrapped
    scanned = "typed in from paper\n\n" + text.replace("\n", "  \n") + "\nsigned: me\n"
    target = tmp_path / "again.key"
    assert import_paperkey(scanned, target, lambda: "old pw") == key
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert target.read_bytes() == path.read_bytes()


def test_paperkey_import_needs_the_passphrase_and_finds_typos(tmp_path: Path) -> None:
    path = protected(tmp_path)
    text = paperkey_text(path)
    target = tmp_path / "again.key"
    with pytest.raises(MissingKeyError):
        import_paperkey(text, target, None)
    doc = json.loads(path.read_text())
    blob = doc["key"]
    typo = blob[:10] + ("A" if blob[10] != "A" else "B") + blob[11:]
    with pytest.raises(WrongKeyError):
        import_paperkey(text.replace(blob, typo), target, lambda: "old pw")
    assert not target.exists()


def test_paperkey_plain_typo_fails_the_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    key = create_key_file(path, None)
    b64 = base64.b64encode(key.material).decode()
    typo = ("B" if b64[0] != "B" else "C") + b64[1:]
    with pytest.raises(KeyFileError, match="fingerprint"):
        import_paperkey(paperkey_text(path).replace(b64, typo), tmp_path / "t.key", None)
    assert not (tmp_path / "t.key").exists()


def test_paperkey_import_refuses_garbage_and_existing_files(tmp_path: Path) -> None:
    path = protected(tmp_path)
    with pytest.raises(KeyFileError, match="not a paper key"):
        import_paperkey("just some text", tmp_path / "x.key", None)
    with pytest.raises(KeyFileError, match="no valid JSON"):
        import_paperkey(
            f"{PAPERKEY_BEGIN}\n{{\n-----END PVEBACKUP KEY-----\n", tmp_path / "x.key", None
        )
    existing = tmp_path / "existing.key"
    existing.write_text("precious")
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        import_paperkey(paperkey_text(path), existing, lambda: "old pw")
    assert existing.read_text() == "precious"
