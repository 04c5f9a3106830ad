"""``LocalBackend.sync``: exactly what was changed without fsync, syncfs only past a bound."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pvebackup.store.backends import local
from pvebackup.store.backends.local import LocalBackend


class _Recorder:
    """Records the (dev, inode) of every fsync and every syncfs call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fsynced: list[tuple[int, int]] = []
        self.syncfs = 0
        real = os.fsync

        def fsync(fd: int) -> None:
            st = os.fstat(fd)
            self.fsynced.append((st.st_dev, st.st_ino))
            real(fd)

        def syncfs(fd: int) -> int:
            self.syncfs += 1
            return 0

        monkeypatch.setattr(local.os, "fsync", fsync)
        monkeypatch.setattr(local, "_syncfs", syncfs)

    def saw(self, path: Path) -> bool:
        st = os.lstat(path)
        return (st.st_dev, st.st_ino) in self.fsynced


def test_sync_fsyncs_the_file_and_every_new_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = LocalBackend(tmp_path)
    rec = _Recorder(monkeypatch)
    b.put("snapshots/vm/100/t1/disk.fidx", b"x" * 100, overwrite=True, durable=False)
    assert rec.fsynced == []  # nothing flushed before sync
    b.sync()
    assert rec.syncfs == 0
    for rel in ("snapshots/vm/100/t1/disk.fidx", "snapshots/vm/100/t1", "snapshots/vm/100",
                "snapshots/vm", "snapshots", ""):
        assert rec.saw(tmp_path / rel), rel
    rec.fsynced.clear()
    b.sync()  # nothing changed since: nothing to flush
    assert rec.fsynced == [] and rec.syncfs == 0


def test_sync_after_delete_flushes_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = LocalBackend(tmp_path)
    b.put("snapshots/a/manifest", b"m", overwrite=False)
    rec = _Recorder(monkeypatch)
    b.delete("snapshots/a/manifest")
    b.sync()
    assert rec.saw(tmp_path / "snapshots/a") and rec.syncfs == 0


def test_past_the_bound_sync_flushes_the_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "SYNC_TRACKED", 4)
    b = LocalBackend(tmp_path)
    rec = _Recorder(monkeypatch)
    for i in range(5):
        b.put(f"files/f{i}", b"x", overwrite=True, durable=False)
    b.sync()
    assert rec.syncfs == 1 and rec.fsynced == []
    b.put("files/g", b"x", overwrite=True, durable=False)
    b.sync()  # the bound is per batch: back to exact fsyncs
    assert rec.syncfs == 1 and rec.saw(tmp_path / "files/g")


def test_sync_does_not_open_a_fifo_planted_at_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hostile store: a FIFO swapped in for a file we wrote must neither block
    # sync (an open without O_NONBLOCK would wait for a writer) nor be fsynced.
    b = LocalBackend(tmp_path)
    b.put("files/f", b"x", overwrite=True, durable=False)
    os.unlink(tmp_path / "files/f")
    os.mkfifo(tmp_path / "files/f")
    rec = _Recorder(monkeypatch)
    t = threading.Thread(target=b.sync, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive()
    assert not rec.saw(tmp_path / "files/f") and rec.saw(tmp_path / "files")


def test_sync_of_a_put_deleted_since_skips_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = LocalBackend(tmp_path)
    b.put("files/f", b"x", overwrite=True, durable=False)
    b.delete("files/f")
    rec = _Recorder(monkeypatch)
    b.sync()
    assert rec.saw(tmp_path / "files") and rec.syncfs == 0
