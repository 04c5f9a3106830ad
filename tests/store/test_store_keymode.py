"""Key files readable by group or others are refused (OpenSSH's rule), readable ones load."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvebackup.api.errors import UnprotectedKeyFileError
from pvebackup.store.keys import create_key_file, load_key_file


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_unprotected_key_file_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "store.key"
    create_key_file(path, None)
    path.chmod(mode)
    with pytest.raises(UnprotectedKeyFileError, match=f"chmod 600 {path}"):
        load_key_file(path)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_key_file_loads(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "store.key"
    key = create_key_file(path, None)
    path.chmod(mode)
    assert load_key_file(path).fingerprint == key.fingerprint
