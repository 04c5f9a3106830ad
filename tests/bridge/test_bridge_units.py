"""Unit tests of the bridge's parts, in-process with a fake seed provider."""

from __future__ import annotations

import io
import json
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest

from pvebackup.api.errors import (
    GuestConfigError,
    NbdError,
    PluginError,
    ProviderNotImplementedError,
    UsageError,
)
from pvebackup.api.provider import BackupProvider
from pvebackup.api.types import BackupMechanism, GuestType, LogFunction
from pvebackup.bridge.adapter import MergedAdapter, archive_name
from pvebackup.bridge.attach import AttachListener
from pvebackup.bridge.ctconfig import container_id_map
from pvebackup.bridge.framing import Oversized, read_line
from pvebackup.bridge.params import Params
from pvebackup.bridge.rawexport import needs_export
from pvebackup.bridge.server import Server
from pvebackup.kit.fdsource import FdSource
from pvebackup.kit.hoststate import HostState
from pvebackup.kit.passphrase import set_process_passphrase
from pvebackup.storage import COMMON_PROPERTIES, PropertySpec, StoragePlugin, registry

SECRET = "hunter2-but-longer-9d1c"


class FakeProvider(BackupProvider):
    """Records seed calls; ``bitmap`` is what backup_get_mechanism answers."""

    bitmap: ClassVar[str | None] = "chain-a"
    leak: ClassVar[bool] = False

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.calls: list[tuple[Any, ...]] = []

    def provider_name(self) -> str:
        return "fake"

    def job_start(self, start_time: int) -> None:
        if self.leak:
            self.log("info", f"the passphrase is {SECRET}")
            raise PluginError(f"cannot unlock with {SECRET}")
        self.calls.append(("job_start", start_time))

    def job_end(self) -> None:
        self.calls.append(("job_end",))

    def job_abort(self, error: str) -> None:
        self.calls.append(("job_abort", error))

    def backup_start(self, vmid: int, vmtype: GuestType) -> None:
        self.calls.append(("backup_start", vmid))

    def backup_get_mechanism(self, vmid: int, vmtype: GuestType) -> Any:
        self.calls.append(("backup_get_mechanism", vmid))
        return (BackupMechanism.NBD, self.bitmap)

    def backup_get_target(self, vmid: int, vmtype: GuestType) -> str:
        self.calls.append(("backup_get_target", vmid))
        return f"vm/{vmid}/x"

    def backup_end(self, vmid: int) -> None:
        self.calls.append(("backup_end", vmid))

    def backup_abort(self, vmid: int, error: str) -> None:
        self.calls.append(("backup_abort", vmid, error))

    def backup_get_task_size(self, vmid: int) -> int:
        return 42


class FakePlugin(StoragePlugin):
    type: ClassVar[str] = "bridge-fake"
    properties: ClassVar[Mapping[str, PropertySpec]] = COMMON_PROPERTIES

    def new_backup_provider(
        self, scfg: Mapping[str, str], storeid: str, log_function: LogFunction
    ) -> BackupProvider | None:
        return FakeProvider(self, scfg, storeid, log_function)


@pytest.fixture
def fake_plugin() -> Iterator[None]:
    with registry.registered(FakePlugin):
        yield
    FakeProvider.leak = False
    set_process_passphrase(None)


def _serve(requests: list[dict[str, Any]], tmp_path: Path) -> tuple[list[dict[str, Any]], str]:
    stdin = io.BytesIO(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
    stdout, stderr = io.BytesIO(), io.StringIO()
    Server(stdin, stdout, stderr).run()
    lines = [json.loads(line) for line in stdout.getvalue().splitlines()]
    return lines, stdout.getvalue().decode() + stderr.getvalue()


def _hello(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {"id": 0, "method": "hello", "params": {
        "protocol": 1, "storeid": "f", "plugin-type": "bridge-fake", "scfg": {},
        "state-dir": str(tmp_path / "state"), **extra}}  # fmt: skip


def test_secrets_never_leave_the_helper(tmp_path: Path, fake_plugin: None) -> None:
    """A provider that logs and raises the passphrase: only *** goes out."""
    FakeProvider.leak = True
    lines, text = _serve(
        [_hello(tmp_path, secrets={"passphrase": SECRET}),
         {"id": 1, "method": "job_init", "params": {"start_time": 1}},
         {"id": 2, "method": "bye"}],
        tmp_path,
    )  # fmt: skip
    assert SECRET not in text
    assert {"level": "info", "message": "the passphrase is ***"} in [
        m["log"] for m in lines if "log" in m
    ]
    (error,) = [m["error"] for m in lines if m.get("id") == 1]
    assert error["message"] == "cannot unlock with ***" and error["type"] == "PluginError"


def test_an_unexpected_exception_is_a_plugin_error_with_a_traceback_on_stderr(
    tmp_path: Path, fake_plugin: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(self: FakeProvider, start_time: int) -> None:
        raise KeyError(SECRET)

    monkeypatch.setattr(FakeProvider, "job_start", boom)
    lines, text = _serve(
        [_hello(tmp_path, secrets={"passphrase": SECRET}),
         {"id": 1, "method": "job_init", "params": {"start_time": 1}}],
        tmp_path,
    )  # fmt: skip
    (error,) = [m["error"] for m in lines if m.get("id") == 1]
    assert error["type"] == "PluginError" and error["exit"] == 4
    assert "KeyError" in error["message"]
    assert "Traceback" in text and SECRET not in text


def test_not_implemented_keeps_its_class(tmp_path: Path, fake_plugin: None) -> None:
    lines, _ = _serve(
        [_hello(tmp_path), {"id": 1, "method": "restore_vm_init", "params": {"volname": "v"}}],
        tmp_path,
    )
    (error,) = [m["error"] for m in lines if m.get("id") == 1]
    assert error["type"] == ProviderNotImplementedError.__name__ and error["exit"] == 4


_ADAPTERS: list[MergedAdapter] = []


@pytest.fixture(autouse=True)
def _close_adapters(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    # the adapters' private copies go below tmp_path, and are removed at the end
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield
    while _ADAPTERS:
        _ADAPTERS.pop().close()


def _adapter(tmp_path: Path) -> tuple[MergedAdapter, FakeProvider, list[str]]:
    logs: list[str] = []
    provider = FakeProvider(FakePlugin(), {}, "f", lambda level, msg: logs.append(msg))
    state = HostState("bridge", "f", tmp_path / "state")
    adapter = MergedAdapter(provider, "f", lambda level, msg: logs.append(msg), state=state)
    _ADAPTERS.append(adapter)
    return adapter, provider, logs


def _guest(adapter: MergedAdapter, success: bool, mode: str = "new") -> dict[str, str]:
    call = adapter.methods()
    call["backup_init"](Params("backup_init", {"vmid": 100, "vmtype": "qemu", "start_time": 1}))
    answer: dict[str, str] = call["backup_vm_query_incremental"](
        Params("q", {"vmid": 100, "volumes": {"drive-scsi0": {"size": 1}}})
    )
    adapter.guests[100].bitmap_used = mode != "none"
    call["backup_cleanup"](Params("c", {"vmid": 100, "vmtype": "qemu", "success": success}))
    return answer


def test_incremental_only_on_the_bitmap_of_a_successful_backup(tmp_path: Path) -> None:
    adapter, provider, logs = _adapter(tmp_path)
    assert _guest(adapter, True) == {"drive-scsi0": "new"}  # nothing recorded yet
    assert _guest(adapter, True) == {"drive-scsi0": "use"}
    assert _guest(adapter, False) == {"drive-scsi0": "use"}  # failed: record dropped
    assert _guest(adapter, True) == {"drive-scsi0": "new"}
    FakeProvider.bitmap = "chain-b"  # the provider starts a new chain: recreate
    try:
        assert _guest(adapter, True) == {"drive-scsi0": "new"}
        assert _guest(adapter, True) == {"drive-scsi0": "use"}
        FakeProvider.bitmap = None
        assert _guest(adapter, True) == {}
    finally:
        FakeProvider.bitmap = "chain-a"
    # the seed order inside backup_init
    assert [c[0] for c in provider.calls[:3]] == [
        "backup_start", "backup_get_mechanism", "backup_get_target",
    ]


def test_a_tampered_bitmap_record_means_new(tmp_path: Path) -> None:
    """Hostile host state (a symlink, garbage): never ``use``, a warning instead."""
    adapter, _, logs = _adapter(tmp_path)
    _guest(adapter, True)
    record = adapter.state.path("bitmap-100")
    record.write_text("{not json")
    assert _guest(adapter, True) == {"drive-scsi0": "new"}
    assert any("damaged" in m for m in logs)
    record.unlink()
    (tmp_path / "elsewhere.json").write_text(json.dumps({"bitmap-id": "chain-a"}))
    record.symlink_to(tmp_path / "elsewhere.json")
    assert _guest(adapter, True) == {"drive-scsi0": "new"}


def test_failing_backup_end_is_followed_by_backup_abort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter, provider, _ = _adapter(tmp_path)

    def fail(vmid: int) -> None:
        raise PluginError("commit failed")

    monkeypatch.setattr(provider, "backup_end", fail)
    with pytest.raises(PluginError):
        _guest(adapter, True)
    assert provider.calls[-1] == ("backup_abort", 100, "backup_end failed: commit failed")


def test_job_cleanup_after_failed_job_init_aborts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter, provider, _ = _adapter(tmp_path)
    monkeypatch.setattr(FakeProvider, "leak", True)
    with pytest.raises(PluginError):
        adapter.m_job_init(Params("job_init", {"start_time": 1}))
    adapter.m_job_cleanup(Params("job_cleanup", {}))
    adapter.m_job_cleanup(Params("job_cleanup", {}))  # vzdump may call it twice
    assert [c[0] for c in provider.calls] == ["job_abort"]


@pytest.mark.parametrize(
    ("params", "why"),
    [
        ({"vmid": True, "vmtype": "qemu"}, "'vmid' must be an integer"),
        ({"vmid": -1, "vmtype": "qemu"}, "out of range"),
        ({"vmid": 2**70, "vmtype": "qemu"}, "out of range"),
        ({"vmid": 100, "vmtype": "openvz"}, "must be qemu or lxc"),
        ({"vmid": "1e3", "vmtype": "qemu"}, "must be an integer"),
    ],
)
def test_hostile_params_are_usage_errors(
    tmp_path: Path, params: dict[str, Any], why: str
) -> None:
    adapter, _, _ = _adapter(tmp_path)
    with pytest.raises(UsageError, match=why):
        adapter.m_backup_init(Params("backup_init", params))


@pytest.mark.parametrize(
    "volume",
    [
        {"size": 4096, "bitmap-mode": "reuse", "file-handle-path": "/dev/null",
         "dirty-regions": [[0, 8192]]},
        {"size": 4096, "bitmap-mode": "reuse", "file-handle-path": "/dev/null",
         "dirty-regions": [[-1, 5]]},
        {"size": 4096, "bitmap-mode": "reuse", "file-handle-path": "/dev/null",
         "dirty-regions": "all"},
        {"size": 4096, "bitmap-mode": "sometimes", "nbd-path": "/x"},
        {"size": 4096, "bitmap-mode": "reuse", "nbd-path": "/x"},
        {"size": 4096, "bitmap-mode": "none"},
    ],
)
def test_backup_vm_refuses_bad_volumes(tmp_path: Path, volume: dict[str, Any]) -> None:
    adapter, provider, _ = _adapter(tmp_path)
    assert adapter.tmpdir().parent == tmp_path
    adapter.m_backup_init(Params("b", {"vmid": 100, "vmtype": "qemu"}))
    provider.backup_guest_config = lambda vmid, filename: None  # type: ignore[method-assign]
    with pytest.raises(UsageError):
        adapter.m_backup_vm(Params("backup_vm", {
            "vmid": 100, "guest_config": "", "info": {}, "volumes": {"drive-scsi0": volume}}))


@pytest.mark.parametrize("dev", ["../etc", "a/b", "", "-x", "x" * 200, "drive\nscsi0"])
def test_device_names_are_checked(tmp_path: Path, dev: str) -> None:
    adapter, _, _ = _adapter(tmp_path)
    adapter.m_backup_init(Params("b", {"vmid": 100, "vmtype": "qemu"}))
    with pytest.raises(UsageError, match="invalid device name"):
        adapter.m_backup_vm_query_incremental(
            Params("q", {"vmid": 100, "volumes": {dev: {"size": 1}}})
        )


def test_config_copies_are_private(tmp_path: Path) -> None:
    adapter, _, _ = _adapter(tmp_path)
    path = Path(adapter._write_copy(100, "qemu-server.conf", "memory: 1\n"))
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    finally:
        adapter.close()
    assert not path.exists()


def test_container_id_map() -> None:
    assert container_id_map("hostname: a\n", 1) == []
    unpriv = container_id_map("unprivileged: 1\n[snap]\nlxc.idmap: u 0 5 1\n", 1)
    assert [e.as_list() for e in unpriv] == [
        ["u", "0", "100000", "65536"], ["g", "0", "100000", "65536"],
    ]
    explicit = container_id_map("unprivileged: 1\nlxc.idmap: u 0 200000 1000\n"
                                "lxc.idmap: g 0 200000 1000\n", 1)  # fmt: skip
    assert explicit[0].host_start == 200000
    with pytest.raises(GuestConfigError, match="pct.conf of 1:2:"):
        container_id_map("unprivileged: 1\nlxc.idmap: u 0 -5 1\n", 1)


def test_read_line_bounds_memory() -> None:
    stream = io.BytesIO(b"a" * 100 + b"\nnext\nlast")
    assert read_line(stream, 10) == Oversized(101)
    assert read_line(stream, 10) == b"next"
    assert read_line(stream, 10) == b"last"
    assert read_line(stream, 10) is None


def test_fd_source_reads_only_the_dirty_regions_and_punches_holes(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    path.write_bytes(os.urandom(1 << 20))
    fd = os.open(path, os.O_RDWR)
    try:
        source = FdSource(fd, 1 << 20, [(65536, 65536)])
        buf = bytearray(4096)
        source.wait(source.submit_read(memoryview(buf), 65536))
        assert bytes(buf) == path.read_bytes()[65536 : 65536 + 4096]
        with pytest.raises(NbdError, match="outside"):
            source.submit_read(memoryview(buf), 0)
        with pytest.raises(NbdError, match="outside"):
            source.submit_read(memoryview(bytearray(8192)), 65536 * 2 - 4096)
        before = os.stat(path).st_blocks
        source.trim(65536, 65536)
        assert os.stat(path).st_blocks < before
        assert path.read_bytes()[65536 : 2 * 65536] == bytes(65536)
        with pytest.raises(NbdError):
            FdSource(fd, 4096, [(0, 8192)])  # regions past the end
        short = FdSource(fd, 2 << 20)  # claims more than the file holds
        with pytest.raises(NbdError, match="short read"):
            short.wait(short.submit_read(memoryview(bytearray(4096)), (1 << 20)))
    finally:
        os.close(fd)


def test_needs_export() -> None:
    assert not needs_export("/var/lib/x.raw")
    assert not needs_export("nbd+unix:///d?socket=/s")
    assert not needs_export('json:{"driver":"raw","file":{"driver":"file","filename":"/x"}}')
    assert needs_export('json:{"driver":"qcow2","file":{"driver":"file","filename":"/x"}}')
    with pytest.raises(PluginError):
        needs_export("json:{broken")
    with pytest.raises(PluginError):
        needs_export("json:[1]")


def test_attach_socket_is_private_to_the_container_root(tmp_path: Path) -> None:
    listener = AttachListener(123456, lambda request, writer: None, str)
    try:
        for p in (listener.dir, listener.path):
            st = os.lstat(p)
            assert st.st_uid == 123456
            assert stat.S_IMODE(st.st_mode) in (0o700, 0o600)
        assert len(listener.token()["secret"]) == 32
    finally:
        listener.finish()
    assert not listener.dir.exists()


def test_abort_all_cleans_up_open_restores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EOF in the middle of a restore: every init gets its cleanup, even when one fails."""
    adapter, provider, logs = _adapter(tmp_path)
    cleaned: list[str] = []

    def cleanup(volname: str, storeid: str, dev: str) -> None:
        cleaned.append(dev)
        if dev == "drive-a":
            raise PluginError("cleanup a failed")

    monkeypatch.setattr(provider, "restore_get_mechanism", lambda v, s: ("qemu-img", "qemu"))
    monkeypatch.setattr(provider, "restore_qemu_img_init", lambda v, s, d: f"/dev/{d}")
    monkeypatch.setattr(provider, "restore_qemu_img_cleanup", cleanup)
    for dev in ("drive-a", "drive-b"):
        adapter.m_restore_vm_volume_init(
            Params("r", {"volname": "vm/1/x", "device_name": dev, "info": {}})
        )
    assert adapter.abort_all("EOF") is True
    assert cleaned == ["drive-a", "drive-b"]
    assert any("cleanup a failed" in m for m in logs)
    assert adapter.abort_all("EOF") is False  # nothing left open


def test_file_handle_must_be_a_disk(tmp_path: Path) -> None:
    """A fifo as file-handle-path is refused (it would hang a reader)."""

    class Reader(FakeProvider):
        source_factory = None

    adapter, _, _ = _adapter(tmp_path)
    adapter.provider = Reader(FakePlugin(), {}, "f", lambda level, msg: None)
    adapter.provider.backup_guest_config = lambda vmid, filename: None  # type: ignore[method-assign]
    adapter.m_backup_init(Params("b", {"vmid": 100, "vmtype": "qemu"}))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="not a file or block device"):
        adapter.m_backup_vm(Params("backup_vm", {
            "vmid": 100, "guest_config": "", "info": {}, "volumes": {"drive-scsi0": {
                "size": 4096, "bitmap-mode": "none", "file-handle-path": str(fifo)}}}))


def test_archive_name_is_the_volume_name_without_backup() -> None:
    # vzdump builds "$storeid:backup/$archive_name" (pve-manager PVE/VZDump.pm)
    assert archive_name("backup/vm-100-2026-12-01T20:52:27Z") == "vm-100-2026-12-01T20:52:27Z"
    assert archive_name("vm/100/x") == "vm/100/x"  # a third party's own scheme
    for empty in ("backup/", ""):
        with pytest.raises(PluginError):
            archive_name(empty)


@pytest.mark.parametrize("kind", ["backup-dir", "backup-store"])
def test_vm_mechanism_is_a_storage_property(tmp_path: Path, kind: str) -> None:
    """storage.cfg's vm-mechanism (all a node can set) picks what vzdump is told."""
    (tmp_path / "s").mkdir()
    scfg = {"type": kind, "path": str(tmp_path / "s"), "vm-mechanism": "file-handle"}
    hello = _hello(tmp_path, scfg=scfg, **{"plugin-type": kind})
    lines, text = _serve(
        [hello,
         {"id": 1, "method": "job_init", "params": {"start_time": 1}},
         {"id": 2, "method": "backup_init",
          "params": {"vmid": 100, "vmtype": "qemu", "start_time": 1}},
         {"id": 3, "method": "backup_get_mechanism", "params": {"vmid": 100, "vmtype": "qemu"}},
         {"id": 4, "method": "backup_cleanup",
          "params": {"vmid": 100, "vmtype": "qemu", "success": 0, "info": {"error": "x"}}},
         {"id": 5, "method": "job_cleanup"},
         {"id": 6, "method": "bye"}],
        tmp_path,
    )  # fmt: skip
    answers = {m["id"]: m for m in lines if "id" in m}
    assert answers[3].get("result") == "file-handle", text

    bad = {**scfg, "vm-mechanism": "carrier-pigeon"}
    lines, text = _serve([{**hello, "params": {**hello["params"], "scfg": bad}}], tmp_path)
    (error,) = [m["error"] for m in lines if m.get("id") == 0]
    assert "vm-mechanism" in error["message"] and error["exit"] == 2, error


def test_spools_of_dead_helpers_are_swept_and_nothing_else(tmp_path: Path) -> None:
    """A helper killed with SIGKILL leaves its uncompressed archive behind: the next
    spool removes it, but never a live helper's, a foreign name, a link or a dir
    that is not ours and private."""
    import subprocess

    from pvebackup.bridge.restore import spool_tar

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"pvebackup-ct-restore-{dead.pid}-abcd"
    stale.mkdir(mode=0o700)
    (stale / "archive.tar").write_bytes(b"x" * 1024)
    live = tmp_path / f"pvebackup-ct-restore-{os.getpid()}-efgh"
    live.mkdir(mode=0o700)
    public = tmp_path / f"pvebackup-ct-restore-{dead.pid}-open"
    public.mkdir(mode=0o755)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("keep")
    link = tmp_path / f"pvebackup-ct-restore-{dead.pid}-link"
    link.symlink_to(victim)
    source = tmp_path / "source.tar"
    source.write_bytes(b"tar bytes")

    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path)
    try:
        spooled = spool_tar(str(source))
    finally:
        if old is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = old
    assert spooled.read_bytes() == b"tar bytes"
    assert spooled.parent.name.startswith(f"pvebackup-ct-restore-{os.getpid()}-")
    assert not stale.exists()
    assert live.is_dir() and public.is_dir() and link.is_symlink()
    assert (victim / "keep").read_text() == "keep"
