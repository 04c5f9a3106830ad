"""The seed's exact shapes at the host/provider boundary (issue 9).

Each test is named after the seed method whose shape or call rule it pins.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from recording_provider import RecordingProvider, call_names, read_calls
from sample_node import MiB, Node, sh

from pvebackup.api.errors import AbortedError, PluginError, UnsupportedError
from pvebackup.api.types import GuestType
from pvebackup.host import job as job_module
from pvebackup.host.job import run_backup_job
from pvebackup.host.restore import run_restore

pytestmark = pytest.mark.e2e


def _bitmaps(path: Path) -> list[str]:
    info = json.loads(sh("qemu-img", "info", "--output=json", "-U", str(path)))
    return sorted(b["name"] for b in info.get("format-specific", {}).get("data", {}).get(
        "bitmaps", []
    ))


def test_backup_directory_receives_the_seeds_id_map_lists(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    node.add_ct(101, mp=False, extra="unprivileged: 1\nlxc.idmap: u 0 100000 1000\n"
                "lxc.idmap: u 1000 1000 1\nlxc.idmap: u 1001 101001 64535\n"
                "lxc.idmap: g 0 100000 65536\n")
    seen: list[Any] = []
    original = RecordingProvider.backup_directory

    def capture(self: RecordingProvider, vmid: int, directory: str, id_map: Any,
                *rest: Any) -> None:
        seen.append(id_map)
        original(self, vmid, directory, id_map, *rest)

    monkeypatch.setattr(RecordingProvider, "backup_directory", capture)
    assert not run_backup_job(node.root, "rec", [101], terminal=None).failed
    (id_map,) = seen
    # Exactly the seed's shape: a list of 4-element lists of strings.
    assert type(id_map) is list and all(type(e) is list for e in id_map)
    assert all(type(f) is str for e in id_map for f in e)
    assert id_map == [
        ["u", "0", "100000", "1000"],
        ["u", "1000", "1000", "1"],
        ["u", "1001", "101001", "64535"],
        ["g", "0", "100000", "65536"],
    ]
    kind, ct, host, count = id_map[1]  # unpackable as the seed's Perl code does
    assert (kind, ct, host, count) == ("u", "1000", "1000", "1")
    assert id_map[0][2] == "100000"  # indexable


def test_backup_get_mechanism_returning_none_fails_the_guest(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    node.add_vm(100, {"scsi0": 1 * MiB})
    node.add_vm(102, {"scsi0": 1 * MiB})

    def undef(self: RecordingProvider, vmid: int, vmtype: GuestType) -> Any:
        self._record("backup_get_mechanism", vmid, str(vmtype))
        return None if vmid == 100 else ("nbd", None)

    monkeypatch.setattr(RecordingProvider, "backup_get_mechanism", undef)
    result = run_backup_job(node.root, "rec", [100, 102], terminal=None)
    (failed,) = result.failed
    assert failed.vmid == 100
    assert "does not support backing up qemu guests" in (failed.error or "")
    assert "TypeError" not in (failed.error or "")
    aborts = [c for c in read_calls(node.backup_dir) if c[0] == "backup_abort"]
    assert [a[1] for a in aborts] == [100]
    assert [c[1] for c in read_calls(node.backup_dir) if c[0] == "backup_end"] == [102]


@pytest.mark.parametrize("answer", [("nbd",), "nbd", (42, None), ("nbd", 7)])
def test_backup_get_mechanism_malformed_answer_is_a_plugin_error(
    node: Node, monkeypatch: pytest.MonkeyPatch, answer: object
) -> None:
    node.add_vm(100, {"scsi0": 1 * MiB})
    monkeypatch.setattr(RecordingProvider, "backup_get_mechanism", lambda *a: answer)
    (failed,) = run_backup_job(node.root, "rec", [100], terminal=None).failed
    assert "backup_get_mechanism returned" in (failed.error or "")
    assert "backup_abort" in call_names(node.backup_dir)


def test_backup_end_then_signal_does_not_call_backup_abort(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    disks = node.add_vm(100, {"scsi0": 1 * MiB})
    real_crash_point = job_module.crash_point

    def signal_after_end(name: str) -> None:
        real_crash_point(name)
        if name == "backup-after-end":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises AbortedError here

    monkeypatch.setattr(job_module, "crash_point", signal_after_end)
    with pytest.raises(AbortedError):
        run_backup_job(node.root, "rec", [100], terminal=None)
    names = call_names(node.backup_dir)
    assert "backup_end" in names
    assert "backup_abort" not in names
    assert names[names.index("backup_end") + 1] == "backup_handle_log_file"
    assert names[-1] == "job_abort"
    assert (node.backup_dir / "qemu-100-000" / "meta.json").exists()  # still committed
    # The bitmap was not advanced (no commit): mode new dropped it, the next
    # backup reads the whole disk again, never a gap.
    assert _bitmaps(disks[0]) == []
    log = (node.root.log_dir / "qemu-100.log").read_text()
    assert "backup committed, then interrupted" in log


def test_restore_tar_cleanup_runs_after_a_failed_restore_tar_init(node: Node) -> None:
    node.add_ct(101)
    assert not run_backup_job(node.root, "rec", [101], terminal=None).failed
    node.set_provider_options(**{"fail-restore": "tar"})
    with pytest.raises(Exception, match="injected restore failure for tar"):
        run_restore(node.root, "rec:lxc-101-000", 201, terminal=None)
    names = call_names(node.backup_dir)
    assert names[-2:] == ["restore_tar_init", "restore_tar_cleanup"]
    assert not (node.images / "201").exists()


def test_restore_qemu_img_cleanup_runs_after_a_failed_restore_qemu_img_init(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    node.add_vm(100, {"scsi0": 1 * MiB})
    assert not run_backup_job(node.root, "rec", [100], terminal=None).failed
    node.set_provider_options(**{"fail-restore": "drive-scsi0"})

    def cleanup_fails_too(self: RecordingProvider, volname: str, storeid: str,
                          dev: str) -> None:
        self._record("restore_qemu_img_cleanup", volname, storeid, dev)
        raise RuntimeError("nothing to clean")

    monkeypatch.setattr(RecordingProvider, "restore_qemu_img_cleanup", cleanup_fails_too)
    # The init's error is the one raised; the cleanup's failure is only logged.
    with pytest.raises(Exception, match="injected restore failure for drive-scsi0"):
        run_restore(node.root, "rec:qemu-100-000", 200, terminal=None)
    assert call_names(node.backup_dir)[-2:] == ["restore_qemu_img_init",
                                                 "restore_qemu_img_cleanup"]


def test_restore_directory_cleanup_runs_after_a_failed_restore_directory_init(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    node.add_ct(101, mp=False)
    node.set_provider_options(**{"restore-mechanism": "directory"})
    assert not run_backup_job(node.root, "rec", [101], terminal=None).failed

    def returns_nothing(self: RecordingProvider, volname: str, storeid: str) -> Any:
        self._record("restore_directory_init", volname, storeid)
        return None  # a broken provider: not a path

    monkeypatch.setattr(RecordingProvider, "restore_directory_init", returns_nothing)
    with pytest.raises(PluginError, match="restore_directory_init returned None"):
        run_restore(node.root, "rec:lxc-101-000", 201, terminal=None)
    assert call_names(node.backup_dir)[-2:] == ["restore_directory_init",
                                                 "restore_directory_cleanup"]


@pytest.mark.parametrize(
    ("answer", "error", "needle"),
    [
        (("vma", "qemu"), UnsupportedError, "unknown restore mechanism 'vma'"),
        (("tar", "openvz"), UnsupportedError, "unknown guest type 'openvz'"),
        (None, PluginError, "not \\(mechanism, vmtype\\)"),
        (("tar",), PluginError, "not \\(mechanism, vmtype\\)"),
    ],
)
def test_restore_get_mechanism_unknown_answer_is_a_typed_error(
    node: Node, monkeypatch: pytest.MonkeyPatch, answer: object,
    error: type[Exception], needle: str,
) -> None:
    node.add_ct(101, mp=False)
    assert not run_backup_job(node.root, "rec", [101], terminal=None).failed
    monkeypatch.setattr(RecordingProvider, "restore_get_mechanism", lambda *a: answer)
    with pytest.raises(error, match=needle):
        run_restore(node.root, "rec:lxc-101-000", 201, terminal=None)
    assert node.root.guest_type(201) is None


def test_restore_qemu_img_cleanup_runs_after_a_failed_init_in_a_live_restore(
    node: Node,
) -> None:
    node.add_vm(100, {"scsi0": 1 * MiB})
    assert not run_backup_job(node.root, "rec", [100], terminal=None).failed
    node.set_provider_options(**{"fail-restore": "drive-scsi0"})
    with pytest.raises(Exception, match="injected restore failure for drive-scsi0"):
        run_restore(node.root, "rec:qemu-100-000", 200, live=True,
                    start_command=["/bin/false"], terminal=None)
    assert call_names(node.backup_dir)[-2:] == ["restore_qemu_img_init",
                                                 "restore_qemu_img_cleanup"]
    assert not (node.images / "200").exists()
