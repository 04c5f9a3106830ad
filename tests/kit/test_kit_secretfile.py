"""read_secret_file: OpenSSH's rule for private keys, checked on the opened file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pvebackup.api.errors import KeyFileError, UnprotectedKeyFileError
from pvebackup.kit.secretfile import MAX_SECRET_FILE_SIZE, read_secret_file


def secret(tmp_path: Path, mode: int, data: bytes = b"s3cret\n") -> Path:
    path = tmp_path / "secret"
    path.write_bytes(data)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o610, 0o601, 0o777])
def test_group_or_other_access_is_refused(tmp_path: Path, mode: int) -> None:
    path = secret(tmp_path, mode)
    with pytest.raises(UnprotectedKeyFileError) as info:
        read_secret_file(path, "passphrase file")
    message = str(info.value)
    assert "UNPROTECTED PASSPHRASE FILE" in message and f"{mode:04o}" in message
    assert f"chmod 600 {path}" in message
    assert "s3cret" not in message


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_owner_only_is_read(tmp_path: Path, mode: int) -> None:
    assert read_secret_file(secret(tmp_path, mode)) == b"s3cret\n"


def test_symlink_is_judged_by_the_file_it_opens(tmp_path: Path) -> None:
    private = secret(tmp_path, 0o600)
    link = tmp_path / "link"
    link.symlink_to(private)  # a symlink itself is always 0777: its target counts
    assert read_secret_file(link) == b"s3cret\n"
    private.chmod(0o644)
    with pytest.raises(UnprotectedKeyFileError):
        read_secret_file(link)


def test_fifo_and_directory_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)  # nobody writes: a blocking open would hang forever
    with pytest.raises(KeyFileError, match="not a regular file"):
        read_secret_file(fifo)
    folder = tmp_path / "dir"
    folder.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        read_secret_file(folder)


def test_missing_and_oversized(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot read key file"):
        read_secret_file(tmp_path / "nope")
    with pytest.raises(KeyFileError, match="larger than"):
        read_secret_file(secret(tmp_path, 0o600, b"x" * (MAX_SECRET_FILE_SIZE + 1)))
