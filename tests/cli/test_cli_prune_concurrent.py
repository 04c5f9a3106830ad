"""Prune and remove beside a running backup in another process (store lock protocol).

Two real second processes: a writer on the store that pins its base (as a
``backup-store`` backup does from ``backup_get_mechanism`` to ``backup_end``, also
from another host, which shares no lock with us), and a holder of the host's
per-guest lock (a backup or restore of that guest on this node).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import pvebackup
from pvebackup.api.types import GuestType
from pvebackup.cli.main import main
from pvebackup.store.backends.local import LocalBackend
from pvebackup.store.datastore import Datastore
from pvebackup.store.snapshot import SnapshotId
from pvebackup.store.verify import verify_store

CS = 64 * 1024
T0 = 1795685400

WRITER = """
import sys
from pvebackup.api.types import GuestType
from pvebackup.store.backends.local import LocalBackend
from pvebackup.store.datastore import Datastore
from pvebackup.store.snapshot import SnapshotId

path, base_t, new_t = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = Datastore.open(LocalBackend(path))
base = SnapshotId(GuestType.QEMU, 100, base_t)
store.pin_snapshot(base)
print("ready", flush=True)
sys.stdin.readline()
# An incremental: the base's index is read now, its chunks reused.
snap = store.open_snapshot(base)
with store.new_snapshot(SnapshotId(GuestType.QEMU, 100, new_t), chunk_size=65536) as w:
    for dev in snap.devices:
        idx = snap.open_index(dev)
        with w.index_writer(dev, idx.size) as iw:
            for i in range(len(idx)):
                store.read_chunk(idx.digest(i), idx.extent(i)[1])
                iw.set(i, idx.digest(i))
store.unpin_snapshot(base)
store.close()
print("done", flush=True)
"""

LOCKER = """
import sys
from pvebackup.host.guests import NodeRoot
from pvebackup.host.runstate import GuestRun

with GuestRun(NodeRoot(sys.argv[1]), int(sys.argv[2]), action="backup", log=print):
    print("ready", flush=True)
    sys.stdin.readline()
print("done", flush=True)
"""


@contextmanager
def second_process(script: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    env = dict(os.environ, PYTHONPATH=str(Path(pvebackup.__file__).parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()  # by its PID; we started it
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def finish(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "done\n"
    assert proc.wait(timeout=60) == 0


def _node(tmp_path: Path) -> tuple[Path, Path]:
    path = tmp_path / "st"
    Datastore.create(LocalBackend(path), chunk_size=CS)
    for vmid, t in [(100, T0), (100, T0 + 60), (100, T0 + 120), (101, T0), (101, T0 + 60)]:
        store = Datastore.open(LocalBackend(path))
        with store.new_snapshot(SnapshotId(GuestType.QEMU, vmid, t), chunk_size=CS) as w:
            with w.index_writer("drive-scsi0", 2 * CS) as iw:
                for i in range(2):
                    iw.set(i, store.insert_chunk(os.urandom(CS)).digest)
        store.close()
    root = tmp_path / "node"
    (root / "etc" / "pve").mkdir(parents=True)
    (root / "etc" / "pve" / "storage.cfg").write_text(f"backup-store: st\n\tpath {path}\n")
    return root, path


def _vol(vmid: int, t: int) -> str:
    return SnapshotId(GuestType.QEMU, vmid, t).volname


def _names(path: Path) -> set[str]:
    return {s.volname for s in Datastore.open(LocalBackend(path)).list_snapshots()}


def test_prune_and_remove_leave_a_running_backups_base(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, path = _node(tmp_path)
    base = _vol(100, T0 + 60)  # a backup in another process builds on it
    with second_process(WRITER, str(path), str(T0 + 60), str(T0 + 180)) as writer:
        assert main(["--root", str(root), "remove", f"st:{base}"]) == 7
        assert "base of a running backup" in capsys.readouterr().err
        capsys.readouterr()
        code = main(["--root", str(root), "prune", "st", "--keep-last", "1", "--output", "json"])
        report = json.loads(capsys.readouterr().out)
        assert code == 0
        marks = {v["volid"]: v for v in report["volumes"]}
        assert marks[f"st:{base}"]["removed"] is False
        assert "base of a running backup" in marks[f"st:{base}"]["reason"]
        assert _names(path) == {_vol(100, T0 + 60), _vol(100, T0 + 120), _vol(101, T0 + 60)}
        finish(writer)  # reads the base's index and chunks, commits
    assert _vol(100, T0 + 180) in _names(path)
    assert verify_store(Datastore.open(LocalBackend(path))).ok
    # Ended: the pin went with the session, the base is an ordinary backup again.
    assert main(["--root", str(root), "remove", f"st:{base}"]) == 0


def test_a_killed_writers_pin_dies_with_its_session(tmp_path: Path) -> None:
    root, path = _node(tmp_path)
    base = SnapshotId(GuestType.QEMU, 100, T0)
    with second_process(WRITER, str(path), str(T0), str(T0 + 180)) as writer:
        store = Datastore.open(LocalBackend(path))
        assert base.prefix in store.pinned_snapshots()
        writer.kill()
    # Its session object stays until it expires: the pin holds until then (a hung
    # writer cannot be told from a slow one), and no longer.
    assert base.prefix in store.pinned_snapshots()
    assert base.prefix not in store.pinned_snapshots(now=T0 * 2.0)


def test_prune_never_races_a_backup_of_the_same_guest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, path = _node(tmp_path)
    with second_process(LOCKER, str(root), "100") as locker:
        capsys.readouterr()
        code = main(["--root", str(root), "prune", "st", "--keep-last", "1", "--output", "json"])
        report = json.loads(capsys.readouterr().out)
        assert code == 7  # LockedError: not everything could be pruned
        marks = {v["volid"]: v for v in report["volumes"]}
        for t in (T0, T0 + 60):
            m = marks[f"st:{_vol(100, t)}"]
            assert m["removed"] is False and f"locked by PID {locker.pid}" in m["reason"]
        assert marks[f"st:{_vol(101, T0)}"]["removed"] is True  # other guests go on
        assert main(["--root", str(root), "remove", f"st:{_vol(100, T0)}"]) == 7
        assert _names(path) == {_vol(100, t) for t in (T0, T0 + 60, T0 + 120)} | {
            _vol(101, T0 + 60)
        }
        finish(locker)
    assert main(["--root", str(root), "prune", "st", "--keep-last", "1"]) == 0
    assert _names(path) == {_vol(100, T0 + 120), _vol(101, T0 + 60)}


@pytest.mark.parametrize("doc", [
    {"heartbeat": 4e12, "ttl": 3600},  # far in the future
    {"heartbeat": None, "ttl": 1e12},  # now, but alive for ever
], ids=["future-heartbeat", "huge-ttl"])
def test_a_planted_session_cannot_pin_a_snapshot_for_ever(
    tmp_path: Path, doc: dict[str, float | None]
) -> None:
    root, path = _node(tmp_path)
    base = SnapshotId(GuestType.QEMU, 100, T0)
    # Hostile input: someone with write access plants a session pinning a snapshot.
    session = {"session": "ab" * 16, "started": 0.0, "pins": [base.prefix],
               "heartbeat": doc["heartbeat"] or time.time(), "ttl": doc["ttl"]}
    (path / "sessions").mkdir(exist_ok=True)
    (path / "sessions" / ("ab" * 16)).write_text(json.dumps(session))
    assert base.prefix not in Datastore.open(LocalBackend(path)).pinned_snapshots()
    assert main(["--root", str(root), "remove", f"st:{base.volname}"]) == 0
