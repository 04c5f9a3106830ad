"""Every file writer of the code base is kit.safefs's atomic writer, with its guarantees.

One table of the former copies (storage.cfg, key files, guest configs, host state,
the local store backend); each row is held to the same contract: the file has the
caller's mode, an injected failure (a full disk at fsync) leaves no temporary file
and the old content, and the directory is fsynced after the rename, so that the new
name survives a crash. Directory fsyncs are observed through a recording os.fsync.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pvebackup.api.errors import (
    KeyFileError,
    PveBackupError,
    StorageConfigError,
    UnsafeStorageError,
)
from pvebackup.host.guests import NodeRoot, write_config_file
from pvebackup.host.runstate import GuestRun
from pvebackup.kit import safefs
from pvebackup.kit.hoststate import HostState
from pvebackup.kit.secretfile import read_secret_file
from pvebackup.storage import parse_storage_config, write_storage_config
from pvebackup.store.backends.local import LocalBackend
from pvebackup.store.keys import EncryptionKey, load_key_file, write_key_file

SAMPLE_CFG = "dir: local\n\tpath /var/lib/vz\n\tcontent images\n"


@dataclass(frozen=True)
class Writer:
    """A former copy of the writer: how to write ``path`` and what it promises."""

    name: str
    write: Callable[[Path], None]
    new_mode: int | None  # None: 0644 less the umask
    overwrites: bool = True
    durable: bool = True

    def target(self, tmp_path: Path) -> Path:
        d = tmp_path / "d"
        d.mkdir(exist_ok=True)
        return d / "target"


def _hoststate(path: Path) -> None:
    state = HostState("p", "s", path.parent)
    state.dir = path.parent  # write straight into the test's directory
    state.path = lambda name: path  # type: ignore[method-assign]
    state.write("g", {"x": 1})


def _runstate(path: Path) -> None:
    run = GuestRun(NodeRoot(path.parent / "root"), 100, action="backup", log=lambda *_: None)
    run.state_path = path
    run._state = {"dirs": []}  # as __enter__ leaves it, without the lock
    run.dir_planned("/run/x")


def _local_backend(path: Path) -> None:
    LocalBackend(path.parent).put(path.name, b"object", overwrite=True)


WRITERS = [
    Writer(
        "storage.cfg",
        lambda p: write_storage_config(parse_storage_config(SAMPLE_CFG), p),
        0o640,
    ),
    Writer(
        "key file",
        lambda p: write_key_file(p, EncryptionKey(bytes(32)), None),
        0o600,
        overwrites=False,
    ),
    Writer("guest config", lambda p: write_config_file(p, "memory: 512\n"), None),
    Writer("host state", _hoststate, 0o600),
    Writer("local backend", _local_backend, None),
    # On a tmpfs that a reboot clears with what it names: atomic, not durable.
    Writer("run state", _runstate, 0o600, durable=False),
]


@pytest.fixture
def umask() -> Iterator[int]:
    """A strict umask while the test runs: a mode asked for must not depend on it."""
    old = os.umask(0o077)
    try:
        yield 0o077
    finally:
        os.umask(old)


class FsyncRecorder:
    """Stands in for os.fsync: records what kind of fd was synced, may fail on files."""

    def __init__(self, fail_files: bool = False) -> None:
        self.kinds: list[str] = []
        self.fail_files = fail_files
        self._real = os.fsync

    def __call__(self, fd: int) -> None:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        self.kinds.append("dir" if is_dir else "file")
        if self.fail_files and not is_dir:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._real(fd)


def full_disk(fd: int, data: object) -> int:
    """Stands in for os.write: the disk is full."""
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.name)
def test_new_file_has_the_callers_mode(writer: Writer, tmp_path: Path, umask: int) -> None:
    target = writer.target(tmp_path)
    writer.write(target)
    expected = 0o644 & ~umask if writer.new_mode is None else writer.new_mode
    assert stat.S_IMODE(target.stat().st_mode) == expected
    assert os.listdir(target.parent) == ["target"]


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.name)
def test_the_directory_is_fsynced_after_the_file(
    writer: Writer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = FsyncRecorder()
    monkeypatch.setattr(os, "fsync", recorder)
    writer.write(writer.target(tmp_path))
    # The data first, then the directory entry: a crash in between loses the new
    # name, never the content under it.
    assert recorder.kinds[-2:] == (["file", "dir"] if writer.durable else [])


@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.name)
def test_a_failure_leaves_no_temporary_file_and_the_old_content(
    writer: Writer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = writer.target(tmp_path)
    if writer.overwrites:
        target.write_bytes(b"old content\n")
    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises((OSError, PveBackupError)):
        writer.write(target)
    monkeypatch.undo()
    if writer.overwrites:
        assert target.read_bytes() == b"old content\n"
        assert os.listdir(target.parent) == ["target"]
    else:
        assert os.listdir(target.parent) == []  # no half-written key file either


def test_storage_cfg_keeps_the_mode_of_the_existing_file(tmp_path: Path, umask: int) -> None:
    target = tmp_path / "storage.cfg"
    target.write_text("")
    target.chmod(0o604)
    write_storage_config(parse_storage_config(SAMPLE_CFG), target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o604
    assert target.read_text() == SAMPLE_CFG


def test_storage_cfg_error_is_typed_and_nothing_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "storage.cfg"
    monkeypatch.setattr(os, "fsync", FsyncRecorder(fail_files=True))
    with pytest.raises(StorageConfigError, match="No space"):
        write_storage_config(parse_storage_config(SAMPLE_CFG), target)
    assert os.listdir(tmp_path) == []


def test_key_file_is_never_overwritten_nor_written_through_a_symlink(tmp_path: Path) -> None:
    existing = tmp_path / "existing.key"
    existing.write_bytes(b"precious")
    victim = tmp_path / "victim"
    victim.write_bytes(b"host file")
    link = tmp_path / "link.key"
    link.symlink_to(victim)
    for path in (existing, link):
        with pytest.raises(KeyFileError, match="refusing to overwrite"):
            write_key_file(path, EncryptionKey(bytes(32)), None)
    assert existing.read_bytes() == b"precious"
    assert victim.read_bytes() == b"host file"
    assert sorted(os.listdir(tmp_path)) == ["existing.key", "link.key", "victim"]


def test_key_file_round_trips_through_the_kit_reader(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    key = EncryptionKey(bytes(range(32)))
    write_key_file(path, key, None)
    assert load_key_file(path).fingerprint == key.fingerprint


def test_guest_config_replaces_a_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("host file\n")
    conf = tmp_path / "qemu-server" / "100.conf"
    conf.parent.mkdir()
    conf.symlink_to(victim)
    write_config_file(conf, "memory: 512\n")
    assert victim.read_text() == "host file\n"
    assert not conf.is_symlink() and conf.read_text() == "memory: 512\n"


# --- the one bounded reader ------------------------------------------------------


def _never_hangs(fn: Callable[[], object], release: Path) -> object:
    """Run ``fn`` in a thread; fail (and unblock it by opening ``release``) if it hangs."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the test below
            result.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():
        fd = os.open(release, os.O_WRONLY | os.O_NONBLOCK)  # wakes a blocked reader
        os.close(fd)
        t.join(5)
        pytest.fail(f"{fn} blocked on a FIFO")
    return result[0]


def test_host_state_fifo_is_damage_not_a_hang(tmp_path: Path) -> None:
    state = HostState("p", "s", tmp_path)
    state.dir.mkdir(parents=True)
    os.mkfifo(state.path("g"))
    loaded = _never_hangs(lambda: state.read("g"), state.path("g"))
    assert getattr(loaded, "problem", None) == f"state file {state.path('g')} is not a regular file"


def test_host_state_reads_at_most_the_limit_plus_one(tmp_path: Path) -> None:
    state = HostState("p", "s", tmp_path)
    state.write("g", {"x": 1})
    state.path("g").write_bytes(b"{" + b" " * (1 << 20) + b"}")
    assert state.read("g").problem == f"state file {state.path('g')} is too big"


def test_read_fd_stops_at_limit_plus_one_on_a_stream(tmp_path: Path) -> None:
    # A pipe has no size to check up front (like a file that grows while read):
    # the reader must stop by itself, one byte past the limit.
    r, w = os.pipe()
    try:
        os.write(w, b"x" * 20)
        os.close(w)
        w = -1
        with pytest.raises(OSError) as info:
            safefs.read_fd(r, limit=10)
        assert info.value.errno == errno.EFBIG
        assert os.read(r, 100) == b"x" * 9  # 11 bytes taken, not more
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_read_file_path_follows_symlinks_only_when_asked(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.write_bytes(b"data")
    link = tmp_path / "link"
    link.symlink_to(real)
    assert safefs.read_file_path(link) == b"data"
    with pytest.raises(UnsafeStorageError, match="symlink"):
        safefs.read_file_path(link, follow_symlinks=False)
    with pytest.raises(IsADirectoryError):
        safefs.read_file_path(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused = _never_hangs(lambda: safefs.read_file_path(fifo), fifo)
    assert isinstance(refused, UnsafeStorageError)


def test_secret_file_through_a_symlink_is_read_and_checked_on_its_target(
    tmp_path: Path,
) -> None:
    real = tmp_path / "real"
    real.write_bytes(b"pass\n")
    real.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(real)
    assert read_secret_file(link) == b"pass\n"
    real.chmod(0o644)
    with pytest.raises(KeyFileError, match="UNPROTECTED"):
        read_secret_file(link)


def test_a_device_in_storage_is_refused_without_being_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Opening a tape rewinds it; opening a FIFO wakes its writer: an lstat
    # refuses both before any open.
    storage = tmp_path / "storage"
    storage.mkdir()
    os.mkfifo(storage / "fifo")
    opened: list[str] = []
    real_open = os.open

    def recording_open(path: str, *args: object, **kwargs: object) -> int:
        opened.append(os.fsdecode(path))
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    with safefs.owned_fd(safefs.open_root(storage)) as root:
        monkeypatch.setattr(os, "open", recording_open)
        with pytest.raises(UnsafeStorageError, match="FIFO"):
            safefs.read_file_at(root, "fifo")
        monkeypatch.undo()
    assert "fifo" not in opened
