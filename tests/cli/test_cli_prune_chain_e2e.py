"""``backup-dir`` chains under prune: every removal pattern over full + 4 incrementals
leaves each kept backup restorable and bit-identical; ``max-chain-length`` starts a
new full chain so that retention can remove the old chain whole.

Real backups (qemu-nbd, qemu-img) of a 4 MiB disk, made once per test; each pattern
prunes a copy of the storage.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pvebackup.api.types import GuestType
from pvebackup.cli import cmd_prune
from pvebackup.cli.main import main
from pvebackup.host.guests import NodeRoot
from pvebackup.host.job import run_backup_job
from pvebackup.kit.prune import KeepOptions, Mark
from pvebackup.providers.directory.volumes import VolumeLayout

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
DAY = 86400
real_time = time.time
T0 = int(datetime(2024, 3, 10, 12, tzinfo=UTC).timestamp())


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def make_root(tmp_path: Path, extra: str = "") -> NodeRoot:
    path = tmp_path / "node"
    root = NodeRoot(path)
    for sub in ("qemu-server", "lxc"):
        (root.pve_dir / sub).mkdir(parents=True, exist_ok=True)
    (path / "bdir").mkdir()
    root.storage_cfg.write_text(
        f"dir: local\n\tpath {path}/vz\n\tcontent images,rootdir\n\n"
        f"backup-dir: bdir\n\tpath {path}/bdir\n{extra}"
    )
    images = path / "vz/images/100"
    images.mkdir(parents=True)
    disk = images / "vm-100-disk-0.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(4 * MiB))
    root.config_path(100, GuestType.QEMU).write_text(
        f"name: vm\nmemory: 512\nscsi0: local:100/{disk.name},size=4M\n"
    )
    return root


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("PVEBACKUP_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("TZ", "UTC")
    return tmp_path


def backups(root: NodeRoot, days: int) -> list[tuple[str, Path, str | None]]:
    """One backup a day, a different byte each time: (volid, disk copy, parent)."""
    disk = root.root / "vz/images/100/vm-100-disk-0.qcow2"
    out = []
    for day in range(days):
        sh("qemu-io", "-f", "qcow2", "-c", f"write -P {0x40 + day} {day * 64}k 4k", str(disk))
        shift = T0 + day * DAY - real_time()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(time, "time", lambda shift=shift: real_time() + shift)
            result = run_backup_job(root, "bdir", [100], terminal=None)
        guest = result.guests[0]
        assert guest.ok and guest.target is not None, guest.error
        copy = root.root / f"at-{day}.qcow2"
        sh("cp", str(disk), str(copy))
        out.append((guest.target, copy, None))
    layout = VolumeLayout(root.root / "bdir")
    return [
        (volid, copy, layout.read_index_checked(volid.split(":", 1)[1])[0].parent)
        for volid, copy, _ in out
    ]


def identical(root: NodeRoot, volid: str, expected: Path) -> bool:
    """Restorable (verify opens the chain exactly as a restore does) and bit-identical."""
    volname = volid.split(":", 1)[1]
    if main(["--root", str(root.root), "verify", volid]) != 0:
        return False
    top = next((root.root / "bdir" / volname).glob("*.qcow2"))
    return subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", str(expected), str(top)]
    ).returncode == 0


@pytest.mark.slow
def test_every_prune_pattern_over_a_chain_keeps_each_kept_backup_identical(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    made = make_root(env / "made", "\tmax-chain-length 0\n")
    taken = backups(made, 5)
    assert [p is None for _, _, p in taken] == [True, False, False, False, False]
    for n in range(1, 2**5):
        chosen = {taken[i][0] for i in range(5) if n >> i & 1}
        work = env / f"p{n}"
        shutil.copytree(made.root, work, symlinks=True)
        (work / "etc/pve/storage.cfg").write_text(
            (made.root / "etc/pve/storage.cfg").read_text().replace(str(made.root), str(work))
        )
        root = NodeRoot(work)
        # The pattern: prune's rule marks exactly these for removal.
        monkeypatch.setattr(
            cmd_prune, "mark_prune",
            lambda cands, opts, now, chosen=chosen: {
                c.key: Mark.REMOVE if c.key in chosen else Mark.KEEP for c in cands
            },
        )
        _, results = cmd_prune.prune_storage(root, "bdir", KeepOptions(last=1))
        left = {r.volume.volid for r in results if not r.removed}
        # A base goes only with every child above it, else it stays, saying why.
        for i, (volid, _copy, _parent) in enumerate(taken):
            newest_kept_above = any(t[0] not in chosen for t in taken[i:])
            assert (volid in left) == newest_kept_above, (n, volid)
        for volid, copy, _ in taken:
            if volid in left:
                assert identical(root, volid, copy), (n, volid)
        capsys.readouterr()


def test_max_chain_length_starts_a_new_chain_that_retention_can_free(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_root(env, "\tmax-chain-length 2\n")
    taken = backups(root, 5)
    # full, +1, +2 | full, +1
    parents = [p for _, _, p in taken]
    assert [p is None for p in parents] == [True, False, False, True, False]
    assert parents[1] == taken[0][0].split(":", 1)[1]
    assert parents[4] == taken[3][0].split(":", 1)[1]
    _, results = cmd_prune.prune_storage(root, "bdir", KeepOptions(last=2))
    removed = {r.volume.volid for r in results if r.removed}
    assert removed == {v for v, _, _ in taken[:3]}  # the whole old chain
    for volid, copy, _ in taken[3:]:
        assert identical(root, volid, copy)
