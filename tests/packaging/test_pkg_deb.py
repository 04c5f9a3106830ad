"""`make deb`'s package: built by debian/rules (as `make deb` does), its content
listed by dpkg-deb -c, installed with dpkg --root into a tmp root whose dpkg database
is this Debian host's (so Depends name real, installed Debian packages), and the
installed files used: the Perl plugins load as Proxmox VE loads them, and Debian's
python3 with the Debian dependencies runs the installed command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    shutil.which("dpkg-deb") is None or shutil.which("dpkg-gencontrol") is None,
    reason="needs dpkg-dev (make deb installs it)",
)

EXPECTED = [
    "./usr/bin/pvebackup",
    "./usr/share/perl5/PVE/Storage/Custom/PveBackupDirPlugin.pm",
    "./usr/share/perl5/PVE/Storage/Custom/PveBackupStorePlugin.pm",
    "./usr/share/perl5/PVE/BackupProvider/Plugin/PveBackup.pm",
    "./usr/share/perl5/PVE/PveBackup/Bridge.pm",
    "./usr/share/perl5/PVE/PveBackup/StoragePlugin.pm",
    "./usr/lib/python3/dist-packages/pvebackup/bridge/__main__.py",
    "./usr/lib/python3/dist-packages/pvebackup/cli/main.py",
    "./usr/share/doc/pvebackup/copyright",
    "./usr/share/doc/pvebackup/changelog.gz",
]


def _build(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    env = {
        **os.environ,
        "TMP": str(tmp_path / "stage"),
        "FILES": str(tmp_path / "files"),
        "DEB_OUTDIR": str(out),
    }
    subprocess.run(["debian/rules", "binary"], cwd=REPO, env=env, check=True,
                   capture_output=True)
    (deb,) = out.glob("pvebackup_*_all.deb")
    return deb


def _missing_depends(deb: Path) -> list[str]:
    depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], check=True,
                             capture_output=True, text=True).stdout
    names = [d.strip().split()[0] for d in depends.split(",") if d.strip()]
    missing = []
    for name in names:
        state = subprocess.run(["dpkg-query", "-W", "-f=${Status}", name],
                               capture_output=True, text=True).stdout
        if "ok installed" not in state:
            missing.append(name)
    return missing


def test_pkg_deb_builds_installs_and_runs(tmp_path: Path) -> None:
    deb = _build(tmp_path)

    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], check=True,
                             capture_output=True, text=True).stdout
    paths = {line.split()[-1] for line in listing.splitlines()}
    for path in EXPECTED:
        assert path in paths, f"{path} not in the package"
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in paths)
    assert not any("/t/" in p or p.endswith(".t") for p in paths), "tests shipped"
    (entry_points,) = [p for p in paths if p.endswith(".dist-info/entry_points.txt")]

    if os.geteuid() != 0:
        pytest.skip("dpkg -i (even with --root) needs root")
    # A root with this host's dpkg database: the Depends are checked for real.
    root = tmp_path / "root"
    (root / "var/lib/dpkg/info").mkdir(parents=True)
    (root / "var/lib/dpkg/updates").mkdir()
    shutil.copy("/var/lib/dpkg/status", root / "var/lib/dpkg/status")
    missing = _missing_depends(deb)
    for name in missing:  # not installed here, but a Debian package all the same
        assert subprocess.run(["apt-cache", "show", name], capture_output=True).returncode == 0
    force = ["--force-depends"] if missing else []
    done = subprocess.run(["dpkg", f"--root={root}", *force, "-i", str(deb)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (root / "usr/share/perl5/PVE/Storage/Custom/PveBackupDirPlugin.pm").is_file()
    assert os.access(root / "usr/bin/pvebackup", os.X_OK)
    # The storage plugins are found through these entry points (pyproject.toml).
    points = (root / entry_points.removeprefix("./")).read_text()
    assert "[pvebackup.storage_plugins]" in points and "backup-store = " in points

    # The installed Perl modules load the way PVE loads Custom/*.pm (stand-in loader).
    perl5 = root / "usr/share/perl5"
    loaded = subprocess.run(
        ["perl", f"-I{REPO}/perl/t/lib", f"-I{perl5}", "-MPVE::Storage", "-e",
         f"print join(',', PVE::Storage::load_custom_plugins('{perl5}'))"],
        capture_output=True, text=True,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert "PveBackupDirPlugin" in loaded.stdout and "PveBackupStorePlugin" in loaded.stdout

    # Debian's python3, Debian's dependencies (no venv), the installed package only.
    if missing:
        pytest.skip(f"runtime check needs {missing} installed")
    node = tmp_path / "node"
    (node / "etc/pve").mkdir(parents=True)
    (tmp_path / "bdir").mkdir()
    (node / "etc/pve/storage.cfg").write_text(
        f"backup-dir: bdir\n\tpath {tmp_path / 'bdir'}\n\tcontent backup\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root / "usr/lib/python3/dist-packages")}
    listed = subprocess.run(
        ["/usr/bin/python3", str(root / "usr/bin/pvebackup"), "--root", str(node),
         "list", "bdir", "--output", "json"],
        capture_output=True, text=True, env=env,
    )
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
    hello = json.dumps({"id": 1, "method": "hello", "params": {
        "protocol": 1, "storeid": "bdir", "plugin-type": "backup-dir",
        "scfg": {"type": "backup-dir", "path": str(tmp_path / "bdir"), "content": "backup"},
        "state-dir": str(tmp_path / "state"),
    }})
    bye = json.dumps({"id": 2, "method": "bye", "params": {}})
    helper = subprocess.run(
        ["/usr/bin/python3", "-m", "pvebackup.bridge"], input=f"{hello}\n{bye}\n",
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert helper.returncode == 0, helper.stderr
    first = json.loads(helper.stdout.splitlines()[0])
    assert first["result"]["protocol"] == 1
