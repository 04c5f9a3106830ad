"""The contract suite is not vacuous: a provider with planted bugs fails it.

The example provider (examples/plainfiles) with three bugs of the kind the suite
exists for: ``backup_abort`` keeps the failed guest's data, ``backup_nbd`` ignores
the bandwidth limit, ``backup_directory`` ignores the excludes. The suite runs on
it in a child pytest (its failures must not fail this run); exactly the tests named
after those methods must fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pvebackup

ROOT = Path(__file__).resolve().parents[2]
SRC = Path(pvebackup.__file__).resolve().parents[1]

BROKEN = '''
import sys
sys.path.insert(0, {example!r})
from pvebackup_plainfiles.plugin import PlainFilesPlugin
from pvebackup_plainfiles.provider import PlainFilesProvider
from pvebackup.testing import Capability, ProviderContract


class Broken(PlainFilesProvider):
    def backup_abort(self, vmid, error):
        pass  # keeps what the failed backup wrote

    def backup_nbd(self, vmid, devicename, nbd_path, mode, bitmap_name, bandwidth_limit):
        super().backup_nbd(vmid, devicename, nbd_path, mode, bitmap_name, None)

    def backup_directory(self, vmid, directory, id_map, exclude_paths, sources, bwlimit):
        super().backup_directory(vmid, directory, id_map, [], sources, bwlimit)


class BrokenPlugin(PlainFilesPlugin):
    type = "broken-files"

    def new_backup_provider(self, scfg, storeid, log_function):
        return Broken(self, scfg, storeid, log_function)


class TestBroken(ProviderContract):
    storage_type = "broken-files"
    plugin = BrokenPlugin
    capabilities = frozenset({{Capability.VM, Capability.CT, Capability.RESTORE_TAR,
                              Capability.LIST, Capability.REMOVE}})

    def storage_properties(self, base):
        return {{"path": str(base / "b")}}
'''

PLANTED = ["test_backup_abort_failed_guest", "test_backup_nbd_bandwidth_limit",
           "test_backup_directory_roundtrip"]  # fmt: skip


@pytest.mark.e2e
def test_planted_bugs_fail_the_tests_named_after_their_methods(tmp_path: Path) -> None:
    test_file = tmp_path / "test_broken_provider.py"
    test_file.write_text(BROKEN.format(example=str(ROOT / "examples/plainfiles/src")))
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf",
         "--rootdir", str(tmp_path), "--basetemp", str(tmp_path / "t"),
         "-k", " or ".join([*PLANTED, "test_backup_nbd_full", "test_free_volume"]),
         str(test_file)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    failed = sorted(
        line.split("::")[-1].split(" ")[0]
        for line in out.stdout.splitlines()
        if line.startswith("FAILED")
    )
    assert failed == sorted(PLANTED), out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 passed" in out.stdout, out.stdout[-2000:]  # the rest of it still works
