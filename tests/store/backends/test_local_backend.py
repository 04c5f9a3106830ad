"""What only the local directory backend does: files, temp names, errno mapping."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pvebackup.api.errors import PermanentBackendError, TransientBackendError
from pvebackup.store.backends.local import LocalBackend


def test_layout_on_disk_and_no_temp_leftovers(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path)
    b.put("chunks/ab12/ab12cd", b"data", overwrite=False)
    b.put("chunks/ab12/ab12cd", b"data", overwrite=False)
    b.put("chunks/ab12/ab12cd", b"new", overwrite=True)
    assert (tmp_path / "chunks" / "ab12" / "ab12cd").read_bytes() == b"new"
    assert os.listdir(tmp_path / "chunks" / "ab12") == ["ab12cd"]


def test_temp_files_are_never_listed(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path)
    b.put("d/real", b"x", overwrite=False)
    (tmp_path / "d" / ".tmp-real.abc").write_bytes(b"partial")
    assert list(b.list()) == ["d/real"]


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = LocalBackend(tmp_path)

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(PermanentBackendError, match="No space left"):
        b.put("d/k", b"x", overwrite=False)
    monkeypatch.undo()
    assert not b.exists("d/k")
    assert os.listdir(tmp_path / "d") == []


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (errno.ENOSPC, PermanentBackendError),
        (errno.EACCES, PermanentBackendError),
        (errno.EROFS, PermanentBackendError),
        (errno.EIO, PermanentBackendError),
        (errno.EINTR, TransientBackendError),
        (errno.EAGAIN, TransientBackendError),
    ],
)
def test_errno_mapping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, error: type[Exception]
) -> None:
    b = LocalBackend(tmp_path)
    b.put("k", b"x", overwrite=False)

    def fail(fd: int, n: int) -> bytes:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "read", fail)  # what get() calls after opening the object
    try:
        with pytest.raises(error):
            b.get("k")
    finally:
        monkeypatch.undo()


def test_durable_put_creates_parents(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "new" / "store")
    assert b.put("a/b/c/d", b"x", overwrite=False, durable=True)
    assert b.get("a/b/c/d") == b"x"
