"""A backup-store's key and passphrase files must be private to their owner."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvebackup.api.errors import UnprotectedKeyFileError
from pvebackup.providers.store.settings import StoreSettings
from pvebackup.store.keys import create_key_file


def settings(tmp_path: Path, key_mode: int, pass_mode: int) -> tuple[StoreSettings, str]:
    key, pw = tmp_path / "store.key", tmp_path / "store.pass"
    fingerprint = create_key_file(key, "pass phrase", scrypt_n=2**10).fingerprint
    key.chmod(key_mode)
    pw.write_text("pass phrase\n")
    pw.chmod(pass_mode)
    scfg = {"type": "backup-store", "path": str(tmp_path / "store"),
            "encryption-key": str(key), "encryption-passphrase-file": str(pw)}  # fmt: skip
    return StoreSettings.from_scfg(scfg, "s1"), fingerprint


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_unprotected_passphrase_file_refused(tmp_path: Path, mode: int) -> None:
    store, _ = settings(tmp_path, 0o600, mode)
    with pytest.raises(UnprotectedKeyFileError, match=f"chmod 600 {tmp_path}/store.pass"):
        store.load_key()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_unprotected_key_file_refused(tmp_path: Path, mode: int) -> None:
    store, _ = settings(tmp_path, mode, 0o600)
    with pytest.raises(UnprotectedKeyFileError, match=f"chmod 600 {tmp_path}/store.key"):
        store.load_key()


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_files_unlock_the_key(tmp_path: Path, mode: int) -> None:
    store, fingerprint = settings(tmp_path, mode, mode)
    key = store.load_key()
    assert key is not None and key.fingerprint == fingerprint
