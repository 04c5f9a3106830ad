"""Fixtures for the qemu host tests: images, a log recorder, NBD helpers."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbd
import pytest

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _private_tempdir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Keep whatever the code under test puts into the temp dir under pytest's."""
    short = tmp_path_factory.mktemp("t")
    monkeypatch.setattr(tempfile, "tempdir", str(short))
    return short


@dataclass
class LogRecorder:
    """A ``log_function`` that keeps every (level, message)."""

    lines: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, level: str, message: str) -> None:
        self.lines.append((str(level), message))

    def at(self, level: str) -> list[str]:
        return [m for lv, m in self.lines if lv == level]


@pytest.fixture
def log() -> LogRecorder:
    return LogRecorder()


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


class Images:
    """Create and inspect test images under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def create(
        self, name: str, size: int = 8 * MiB, fmt: str = "qcow2", fill: int | None = 0x11
    ) -> Path:
        path = self.root / name
        run("qemu-img", "create", "-q", "-f", fmt, str(path), str(size))
        if fill is not None:
            self.write(path, 0, size, fill, fmt=fmt)
        return path

    def write(self, path: Path, offset: int, length: int, pattern: int, fmt: str = "qcow2") -> None:
        run("qemu-io", "-f", fmt, "-c", f"write -P {pattern} {offset} {length}", str(path))

    def read(self, path: Path, fmt: str = "qcow2") -> bytes:
        raw = self.root / (path.name + ".raw")
        run("qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(path), str(raw))
        data = raw.read_bytes()
        raw.unlink()
        return data

    def bitmaps(self, path: Path) -> dict[str, frozenset[str]]:
        import json

        info = json.loads(run("qemu-img", "info", "--output", "json", str(path)))
        bms = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
        return {b["name"]: frozenset(b["flags"]) for b in bms}


@pytest.fixture
def images(tmp_path: Path) -> Images:
    d = tmp_path / "images"
    d.mkdir()
    return Images(d)


class NbdClient:
    """A libnbd handle on one export, with the few calls the tests need."""

    def __init__(self, socket_path: str, export: str, bitmap: str | None = None) -> None:
        self.h = nbd.NBD()
        self.bitmap = bitmap
        if bitmap is not None:
            self.h.add_meta_context(f"qemu:dirty-bitmap:{bitmap}")
        self.h.set_export_name(export)
        self.h.connect_unix(socket_path)

    def size(self) -> int:
        return int(self.h.get_size())

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.h.pread(length, offset))

    def write(self, offset: int, data: bytes) -> None:
        self.h.pwrite(data, offset)
        self.h.flush()

    def trim(self, offset: int, length: int) -> None:
        self.h.trim(length, offset)

    def dirty_extents(self) -> list[tuple[int, int]]:
        """(offset, length) of the dirty extents of the bitmap, merged."""
        assert self.bitmap is not None
        ctx = f"qemu:dirty-bitmap:{self.bitmap}"
        assert self.h.can_meta_context(ctx)
        size = self.size()
        out: list[tuple[int, int]] = []
        pos = 0

        def cb(meta: str, off: int, entries: list[int], err: Any) -> int:
            nonlocal pos
            if meta != ctx:
                return 0
            o = off
            for i in range(0, len(entries), 2):
                length, flags = entries[i], entries[i + 1]
                if flags & 1:
                    if out and out[-1][0] + out[-1][1] == o:
                        out[-1] = (out[-1][0], out[-1][1] + length)
                    else:
                        out.append((o, length))
                o += length
            pos = o
            return 0

        while pos < size:
            self.h.block_status(min(size - pos, 1 << 30), pos, cb)
        return out

    def close(self) -> None:
        self.h.shutdown()


@pytest.fixture
def nbd_client() -> Iterator[Callable[..., NbdClient]]:
    clients: list[NbdClient] = []

    def connect(socket_path: str, export: str, bitmap: str | None = None) -> NbdClient:
        c = NbdClient(socket_path, export, bitmap)
        clients.append(c)
        return c

    yield connect
    for c in clients:
        try:
            c.close()
        except nbd.Error:
            pass


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def assert_gone() -> Callable[[int], None]:
    def check(pid: int) -> None:
        assert pid_gone(pid), f"process {pid} still exists"

    return check
