"""The contract suite: one set of tests every backup provider must pass.

A provider author subclasses :class:`ProviderContract` in a test module, names the
storage section to test and what the provider claims, and runs pytest::

    from pvebackup.testing import Capability, ProviderContract

    class TestMyProvider(ProviderContract):
        storage_type = "my-backup"
        capabilities = frozenset({Capability.VM, Capability.LIST})

        def storage_properties(self, base):
            return {"path": str(base)}

The tests run the real host (:mod:`pvebackup.host`: qemu-storage-daemon exports,
container directories, ``qemu-img convert`` and ``tar`` restores) on a throw-away
node root under pytest's temporary directory, and watch the provider through
:class:`~pvebackup.testing.spy.ProviderSpy`. Each test is named after the seed
method it holds to its contract (``test_backup_nbd_full``,
``test_restore_tar_init_roundtrip``, ...). What a provider does not claim is not
skipped: the test then checks that the provider refuses it the documented way
(e.g. a container backup fails that guest only, with a typed error).

Images are tiny (1 and 4 MiB), and the backups the tests share are made once per
class, so a provider's run takes a few seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import ClassVar

import pytest

from pvebackup.api.errors import (
    AbortedError,
    PluginError,
    PveBackupError,
    UnsupportedError,
    UsageError,
    VolumeNotFoundError,
    VolumeProtectedError,
)
from pvebackup.api.provider import BackupProvider
from pvebackup.api.types import BackupMechanism, BitmapMode, GuestType, RestoreMechanism
from pvebackup.host.job import JobResult, run_backup_job
from pvebackup.host.lxc.compare import compare_trees
from pvebackup.host.restore import RestoreResult, run_restore
from pvebackup.kit.hoststate import STATE_DIR_ENV
from pvebackup.kit.nbdfake import FakeNbdSource
from pvebackup.storage import (
    StoragePlugin,
    VolumeInfo,
    new_backup_provider,
    read_storage_config,
    registry,
    remove_backup_volume,
)
from pvebackup.testing.node import STOREID, ContractNode, MiB
from pvebackup.testing.spy import Call, ProviderSpy

__all__ = ["VOLNAME_PATTERN", "Capability", "ProviderContract"]

VOLNAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+=@/-]{0,199}")
"""What a volume name may look like (docs/provider-api.md, "Volume names")."""

_EXCLUDES = ["/var/cache/**"]
_FIREWALL = "[OPTIONS]\nenable: 1\n\n[RULES]\nIN ACCEPT -p tcp -dport 22\n"
_VM_DISKS = {"scsi0": 4 * MiB, "virtio1": 1 * MiB}
_VM_DEVICES = {"drive-scsi0": 4 * MiB, "drive-virtio1": 1 * MiB}
_VMID, _CTID = 100, 101
_RANDOM = 1 * MiB  # incompressible data of the failure tests


def _bytes_under(path: Path) -> int:
    """Bytes in the regular files below ``path`` (what a storage holds)."""
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_blocks * 512 if stat.S_ISREG(st.st_mode) else 0
    return total


class Capability(StrEnum):
    """What a provider claims to support; the suite holds it to exactly that."""

    VM = "vm"
    """Backs up VMs (``nbd``) and restores them (``qemu-img``)."""
    INCREMENTAL = "incremental"
    """VM backups with a dirty bitmap: ``new`` then ``reuse``."""
    CT = "ct"
    """Backs up containers (``directory``)."""
    RESTORE_TAR = "restore-tar"
    """Restores containers as a tar archive."""
    RESTORE_DIRECTORY = "restore-directory"
    """Restores containers as a directory."""
    CHAINED = "chained"
    """``list_volumes`` names an incremental VM backup's base (the backup it was
    made on top of) as ``parent``; without the claim ``parent`` stays ``None``."""
    GARBAGE_COLLECTED = "garbage-collected"
    """The data of a failed backup stays until a garbage collection frees it (a
    deduplicating store); without this claim the suite checks that a failed or
    aborted backup leaves (almost) no bytes in the storage."""
    FAKE_SOURCE = "fake-source"
    """The provider reads VM disks through :mod:`pvebackup.kit.nbdsource` and takes a
    ``source_factory`` attribute: the suite then also backs up an in-memory export
    (:class:`~pvebackup.kit.nbdfake.FakeNbdSource`), which records every read and
    discard, calling the provider directly in the seed's order."""
    LIST = "list"
    """The storage plugin implements ``list_volumes``."""
    REMOVE = "remove"
    """The storage plugin implements ``free_volume``."""
    ATTRIBUTES = "attributes"
    """The storage plugin implements ``get_volume_attribute`` and
    ``update_volume_attribute`` (notes and protection); needs ``LIST`` and ``REMOVE``."""
    FILES = "files"
    """The provider implements the optional ``restore_file_reader`` for its container
    backups (``pvebackup ls``/``extract``); without the claim it must refuse with
    ``UnsupportedError``. Needs ``CT``."""


@dataclass
class _VmRun:
    """The VM scenario: full backup, change, second backup, both restored."""

    node: ContractNode
    jobs: list[JobResult] = field(default_factory=list)
    job_calls: list[list[Call]] = field(default_factory=list)
    expected: list[Path] = field(default_factory=list)  # copies of the disks per job
    restores: dict[int, RestoreResult | PveBackupError] = field(default_factory=dict)
    restore_calls: dict[int, list[Call]] = field(default_factory=dict)

    def volname(self, job: int) -> str:
        target = self.jobs[job].guests[0].target
        assert target is not None and target.startswith(f"{STOREID}:"), target
        return target.split(":", 1)[1]


@dataclass
class _CtRun:
    node: ContractNode
    job: JobResult
    calls: list[Call]
    expected: Path
    restore: RestoreResult | PveBackupError
    restore_calls: list[Call]


@contextmanager
def _state_dir(node: ContractNode) -> Iterator[None]:
    """Providers keep host state per node: never in the real /var/lib, never shared."""
    old = os.environ.get(STATE_DIR_ENV)
    os.environ[STATE_DIR_ENV] = str(node.state_dir)
    try:
        yield
    finally:
        if old is None:
            del os.environ[STATE_DIR_ENV]
        else:
            os.environ[STATE_DIR_ENV] = old


def _installed(plugin: type[StoragePlugin], storage_type: str) -> bool:
    """Whether ``plugin`` is already found through its entry point (pip installed):
    then registering it again would be refused as a second plugin of its type."""
    if storage_type not in registry.plugin_types():
        return False
    found = type(registry.lookup(storage_type))
    return (found.__module__, found.__qualname__) == (plugin.__module__, plugin.__qualname__)


def _names(calls: list[Call]) -> list[str]:
    return [c.name for c in calls]


def _seed_order_one_guest(disks: int, firewall: bool, mechanism: str) -> list[str]:
    data = ["backup_nbd"] * disks if mechanism == "nbd" else ["backup_directory"]
    return [
        "job_start",
        "backup_start",
        "backup_get_mechanism",
        "backup_get_target",
        "backup_guest_config",
        *(["backup_firewall_config"] if firewall else []),
        *data,
        "backup_end",
        "backup_handle_log_file",
        "backup_get_task_size",
        "job_end",
    ]


def _compare_images(expected: Path, restored: Path) -> None:
    out = subprocess.run(
        ["qemu-img", "compare", "-q", str(expected), str(restored)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, f"{restored} differs from {expected}: {out.stdout}{out.stderr}"


class ProviderContract:
    """Subclass as ``Test<Name>`` and set the class attributes below.

    :cvar storage_type: the storage type (the plugin's ``type``).
    :cvar plugin: the plugin class, registered for the tests in-process; ``None``
        when it is installed (found through its entry point).
    :cvar capabilities: what the provider claims (:class:`Capability`).
    :cvar ct_restore_properties: extra storage properties that make the provider
        restore containers with a given mechanism (only needed when it claims
        more than one and picks by a property, e.g. backup-dir's ``ct-format``).
    """

    storage_type: ClassVar[str]
    plugin: ClassVar[type[StoragePlugin] | None] = None
    capabilities: ClassVar[frozenset[Capability]] = frozenset()
    ct_restore_properties: ClassVar[Mapping[RestoreMechanism, Mapping[str, str]]] = {}

    def storage_properties(self, base: Path) -> dict[str, str]:
        """The section's properties; ``base`` is an empty directory for its data."""
        raise NotImplementedError("set storage_properties() in the contract subclass")

    # -- fixtures ------------------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def contract_spy(cls) -> Iterator[ProviderSpy]:
        """The plugin (registered if the subclass names it) with every provider watched."""
        spy = ProviderSpy()
        with ExitStack() as stack:
            if cls.plugin is not None and not _installed(cls.plugin, cls.storage_type):
                stack.enter_context(registry.registered(cls.plugin))
            yield stack.enter_context(spy.watching(cls.storage_type))

    def _node(self, path: Path, **extra: str) -> ContractNode:
        path.mkdir(parents=True, exist_ok=True)
        base = path / "storage"
        base.mkdir()
        props = {**self.storage_properties(base), **extra}
        node = ContractNode(path / "node", self.storage_type, props)
        node.storage_base = base
        return node

    def _backup(
        self, spy: ProviderSpy, node: ContractNode, vmids: list[int], **kw: object
    ) -> tuple[JobResult, list[Call]]:
        spy.calls.clear()
        with _state_dir(node):
            job = run_backup_job(node.root, STOREID, vmids, terminal=None, **kw)  # type: ignore[arg-type]
        calls = list(spy.calls)
        spy.clear()
        return job, calls

    def _restore(
        self, spy: ProviderSpy, node: ContractNode, volname: str, vmid: int
    ) -> tuple[RestoreResult | PveBackupError, list[Call]]:
        spy.calls.clear()
        try:
            with _state_dir(node):
                result: RestoreResult | PveBackupError = run_restore(
                    node.root, f"{STOREID}:{volname}", vmid, terminal=None
                )
        except PveBackupError as exc:
            result = exc
        calls = list(spy.calls)
        spy.clear()
        return result, calls

    def _provider(self, node: ContractNode) -> BackupProvider:
        cfg = read_storage_config(node.root.storage_cfg)
        with _state_dir(node):
            provider = new_backup_provider(cfg, STOREID, lambda level, msg: None)
        assert provider is not None, f"{self.storage_type} returned no backup provider"
        return provider

    def _plugin(self) -> StoragePlugin:
        return registry.lookup(self.storage_type)

    def _scfg(self, node: ContractNode) -> dict[str, str]:
        return {"type": self.storage_type, **node.properties}

    def _list(self, node: ContractNode, vmid: int | None = None) -> list[VolumeInfo]:
        with _state_dir(node):
            volumes = self._plugin().list_volumes(self._scfg(node), STOREID)
        return [v for v in volumes if vmid is None or v.vmid == vmid]

    @pytest.fixture(scope="class")
    @classmethod
    def vm_run(
        cls, contract_spy: ProviderSpy, tmp_path_factory: pytest.TempPathFactory
    ) -> _VmRun:
        """Two backups of VM 100 (the second after a change), each restored."""
        self = cls()
        tmp = tmp_path_factory.mktemp("vm")
        run = _VmRun(self._node(tmp))
        if Capability.VM not in cls.capabilities:
            return run  # the tests that need VMs check the refusal instead
        disks = run.node.add_vm(_VMID, _VM_DISKS)
        run.node.root.firewall_path(_VMID).write_text(_FIREWALL)
        for n in range(2):
            if n:
                run.node.write_disk(disks[0], 2 * MiB, 128 * 1024, 0x77)
                run.node.write_disk(disks[1], 512 * 1024, 64 * 1024, 0x78)
            job, calls = self._backup(contract_spy, run.node, [_VMID], bwlimit_kib=64 * 1024)
            run.jobs.append(job)
            run.job_calls.append(calls)
            copy = tmp / f"expected-{n}"
            copy.mkdir()
            for disk in disks:
                shutil.copyfile(disk, copy / disk.name)
            run.expected.append(copy)
        for n, job in enumerate(run.jobs):
            if job.failed:
                continue
            result, calls = self._restore(contract_spy, run.node, run.volname(n), 200 + n)
            run.restores[n] = result
            run.restore_calls[n] = calls
        return run

    def _ct_run(
        self, spy: ProviderSpy, tmp: Path, mechanism: RestoreMechanism | None
    ) -> _CtRun:
        extra = dict(self.ct_restore_properties.get(mechanism, {})) if mechanism else {}
        node = self._node(tmp, **extra)
        rootfs, data = node.add_ct(_CTID)
        expected = tmp / "expected"
        for src, dst in ((rootfs, expected / "rootfs"), (data, expected / "data")):
            dst.parent.mkdir(parents=True, exist_ok=True)
            # --modify-window=-1: rsync otherwise leaves directory mtimes unset when
            # the copy happens within the second of the last change
            subprocess.run(
                ["rsync", "-aHAX", "--numeric-ids", "--modify-window=-1", f"{src}/", f"{dst}/"],
                check=True,
            )
        (expected / "rootfs/var/cache/junk.tmp").unlink()
        cache = (rootfs / "var/cache").stat()
        os.utime(expected / "rootfs/var/cache", ns=(cache.st_atime_ns, cache.st_mtime_ns))
        # the directory a mount point is mounted on is hidden by the mount: a restore
        # recreates it with what the container saw there (the mount point's root)
        mp_dir, mp_root = expected / "rootfs/srv/data", data.stat()
        os.chown(mp_dir, mp_root.st_uid, mp_root.st_gid)
        os.chmod(mp_dir, mp_root.st_mode & 0o7777)
        os.utime(mp_dir, ns=(mp_root.st_atime_ns, mp_root.st_mtime_ns))
        job, calls = self._backup(spy, node, [_CTID], exclude_paths=_EXCLUDES)
        restore: RestoreResult | PveBackupError = PluginError("backup failed, nothing restored")
        restore_calls: list[Call] = []
        if not job.failed:
            target = job.guests[0].target
            assert target is not None
            restore, restore_calls = self._restore(spy, node, target.split(":", 1)[1], 301)
        return _CtRun(node, job, calls, expected, restore, restore_calls)

    @pytest.fixture(scope="class")
    @classmethod
    def ct_runs(
        cls, contract_spy: ProviderSpy, tmp_path_factory: pytest.TempPathFactory
    ) -> dict[RestoreMechanism | None, _CtRun]:
        """Container backups and restores, one per claimed restore mechanism (lazily)."""
        return _LazyCtRuns(cls(), contract_spy, tmp_path_factory)

    def claims(self, *caps: Capability) -> bool:
        return all(c in self.capabilities for c in caps)

    def _ct_mechanisms(self) -> list[RestoreMechanism]:
        wanted = [
            (Capability.RESTORE_TAR, RestoreMechanism.TAR),
            (Capability.RESTORE_DIRECTORY, RestoreMechanism.DIRECTORY),
        ]
        return [m for cap, m in wanted if cap in self.capabilities]

    # -- the claims themselves -----------------------------------------------------

    def test_capabilities_are_consistent(self) -> None:
        """A VM provider restores VMs; a container provider claims a restore mechanism."""
        assert self.capabilities, "declare what the provider supports in `capabilities`"
        if Capability.INCREMENTAL in self.capabilities:
            assert Capability.VM in self.capabilities
        if Capability.CHAINED in self.capabilities:
            assert Capability.INCREMENTAL in self.capabilities
        has_ct_restore = bool(self._ct_mechanisms())
        assert has_ct_restore == (Capability.CT in self.capabilities), (
            "a provider backing up containers claims restore-tar and/or restore-directory"
        )
        if len(self._ct_mechanisms()) > 1:
            assert set(self.ct_restore_properties) >= set(self._ct_mechanisms()), (
                "more than one container restore mechanism: say in ct_restore_properties "
                "which properties select each"
            )

    def test_provider_name(self, tmp_path: Path, contract_spy: ProviderSpy) -> None:
        name = self._provider(self._node(tmp_path)).provider_name()
        assert isinstance(name, str) and name.strip() and "\n" not in name

    # -- backup: VMs ---------------------------------------------------------------

    def test_job_start_to_job_end_call_order(self, vm_run: _VmRun) -> None:
        """The host's order (and the provider's answers) for one VM with a firewall."""
        if not self.claims(Capability.VM):
            pytest.skip("covered by test_backup_get_mechanism_refuses_vm")
        assert not vm_run.jobs[0].failed, vm_run.jobs[0].guests[0].error
        assert _names(vm_run.job_calls[0]) == _seed_order_one_guest(2, True, "nbd")
        assert all(c.error is None for c in vm_run.job_calls[0])

    def test_backup_get_mechanism(self, vm_run: _VmRun) -> None:
        if not self.claims(Capability.VM):
            pytest.skip("covered by test_backup_get_mechanism_refuses_vm")
        for calls in vm_run.job_calls:
            (call,) = [c for c in calls if c.name == "backup_get_mechanism"]
            mechanism, bitmap_id = call.result
            assert mechanism == BackupMechanism.NBD
            assert bitmap_id is None or (isinstance(bitmap_id, str) and bitmap_id)
            if self.claims(Capability.INCREMENTAL):
                assert bitmap_id, "an incremental provider names a bitmap"

    def test_backup_get_mechanism_refuses_vm(
        self, tmp_path: Path, contract_spy: ProviderSpy
    ) -> None:
        """A provider without VM support fails the VM's backup, and the job goes on."""
        if self.claims(Capability.VM):
            pytest.skip("the provider claims VM backups (test_backup_nbd_full)")
        node = self._node(tmp_path)
        node.add_vm(_VMID, {"scsi0": 1 * MiB})
        job, calls = self._backup(contract_spy, node, [_VMID])
        assert [g.vmid for g in job.failed] == [_VMID]
        assert "backup_abort" in _names(calls) and "job_end" in _names(calls)
        assert "backup_nbd" not in _names(calls)

    def test_backup_get_target(self, vm_run: _VmRun) -> None:
        """Volume names: documented characters, no path tricks, one per backup."""
        if not self.claims(Capability.VM):
            pytest.skip("see test_backup_directory_roundtrip")
        names = [vm_run.volname(n) for n in range(2)]
        for name in names:
            assert VOLNAME_PATTERN.fullmatch(name), name
            assert not {"", ".", ".."} & set(name.split("/")), name
        assert names[0] != names[1]

    def test_backup_nbd_full(self, vm_run: _VmRun) -> None:
        """The first backup of a VM holds every disk; the restore equals the disks."""
        if not self.claims(Capability.VM):
            pytest.skip("covered by test_backup_get_mechanism_refuses_vm")
        nbd = [c for c in vm_run.job_calls[0] if c.name == "backup_nbd"]
        assert [c.args[1] for c in nbd] == list(_VM_DEVICES)
        assert all(c.args[3] in ("none", "new") for c in nbd)
        assert all(c.args[5] == 64 * 1024 * 1024 for c in nbd)  # KiB/s became bytes/s
        self._check_vm_restore(vm_run, 0)

    def test_backup_nbd_incremental(self, vm_run: _VmRun) -> None:
        """``new`` then ``reuse``; the incremental backup restores the changed disks."""
        if not self.claims(Capability.VM):
            pytest.skip("covered by test_backup_get_mechanism_refuses_vm")
        modes = [[c.args[3] for c in calls if c.name == "backup_nbd"] for calls in vm_run.job_calls]
        if self.claims(Capability.INCREMENTAL):
            assert modes == [["new", "new"], ["reuse", "reuse"]]
        else:
            assert "reuse" not in modes[1]
        self._check_vm_restore(vm_run, 1)

    def _check_vm_restore(self, vm_run: _VmRun, n: int) -> None:
        assert not vm_run.jobs[n].failed, vm_run.jobs[n].guests[0].error
        result = vm_run.restores[n]
        if isinstance(result, PveBackupError):
            raise result
        vmid = 200 + n
        for i, disk in enumerate(_VM_DISKS):
            restored = vm_run.node.image(vmid, f"vm-{vmid}-disk-{i}.qcow2")
            _compare_images(vm_run.expected[n] / f"vm-{_VMID}-disk-{i}.qcow2", restored)
            assert disk  # names the disk in a failure message

    def test_backup_nbd_bandwidth_limit(self, tmp_path: Path, contract_spy: ProviderSpy) -> None:
        """4 MiB of data at 2 MiB/s take about a second, even after a 2 MiB burst.

        The burst allowance covers a token bucket holding a second's worth and
        ``qemu-img convert -r``, which sends its first 2 MiB buffer unpaced.
        """
        if not self.claims(Capability.VM):
            pytest.skip("covered by test_backup_get_mechanism_refuses_vm")
        node = self._node(tmp_path)
        (disk,) = node.add_vm(_VMID, {"scsi0": 4 * MiB})
        node.write_disk(disk, 0, 4 * MiB, 0x55)
        job, calls = self._backup(contract_spy, node, [_VMID], bwlimit_kib=2048)
        assert not job.failed, job.guests[0].error
        (call,) = [c for c in calls if c.name == "backup_nbd"]
        assert call.args[5] == 2 * MiB
        assert call.seconds >= 0.7, f"4 MiB read in {call.seconds:.2f} s at 2 MiB/s"

    def _direct_backup(
        self, node: ContractNode, conf: Path, fake_for: Callable[[BitmapMode], FakeNbdSource]
    ) -> tuple[str, BitmapMode, FakeNbdSource]:
        """One VM backup in the seed's order, without the host: its disk is a fake."""
        provider = self._provider(node)
        provider.job_start(int(time.time()))
        provider.backup_start(_VMID, GuestType.QEMU)
        mechanism, bitmap = provider.backup_get_mechanism(_VMID, GuestType.QEMU)
        assert mechanism == BackupMechanism.NBD
        volname = provider.backup_get_target(_VMID, GuestType.QEMU)
        provider.backup_guest_config(_VMID, str(conf))
        # The host's answer: a bitmap id it has seen before is reused.
        mode = BitmapMode.NONE if bitmap is None else BitmapMode.NEW
        if bitmap is not None and bitmap == node.fake_bitmap:
            mode = BitmapMode.REUSE
        fake = fake_for(mode)
        provider.source_factory = lambda path, name, bm: fake  # type: ignore[attr-defined]
        provider.backup_nbd(_VMID, "drive-scsi0", str(conf.parent / "none.sock"), mode, bitmap,
                            None)  # fmt: skip
        provider.backup_end(_VMID)
        node.fake_bitmap = bitmap
        provider.backup_handle_log_file(_VMID, str(conf))
        provider.backup_get_task_size(_VMID)
        provider.job_end()
        return volname, mode, fake

    def _restore_bytes(self, node: ContractNode, volname: str, out: Path) -> bytes:
        provider = self._provider(node)
        source = provider.restore_qemu_img_init(volname, STOREID, "drive-scsi0")
        try:
            fmt = [] if source.startswith("json:") else ["-f", "raw"]
            subprocess.run(["qemu-img", "convert", *fmt, "-O", "raw", source, str(out)],
                           check=True, capture_output=True)  # fmt: skip
        finally:
            provider.restore_qemu_img_cleanup(volname, STOREID, "drive-scsi0")
        return out.read_bytes()

    def test_backup_nbd_fake_source(self, tmp_path: Path, contract_spy: ProviderSpy) -> None:
        """An in-memory export: reads only allocated (then only dirty) extents,
        discards what was stored, and both backups restore byte for byte."""
        if not self.claims(Capability.FAKE_SOURCE):
            pytest.skip("the provider does not claim Capability.FAKE_SOURCE (real exports only)")
        node = self._node(tmp_path)
        conf = tmp_path / "guest.conf"
        conf.write_text("# fake source\n")
        disk = bytearray(4 * MiB)
        disk[: 1 * MiB] = os.urandom(1 * MiB)
        disk[3 * MiB : 3 * MiB + 64 * 1024] = b"\x5a" * (64 * 1024)
        allocated = [(0, 1 * MiB), (3 * MiB, 64 * 1024)]
        with _state_dir(node):
            vol1, mode1, fake1 = self._direct_backup(
                node, conf, lambda mode: FakeNbdSource(disk, allocated=allocated)
            )
            first = bytes(disk)
            disk[2 * MiB : 2 * MiB + 128 * 1024] = os.urandom(128 * 1024)
            dirty = [(2 * MiB, 128 * 1024)]
            vol2, mode2, fake2 = self._direct_backup(
                node, conf, lambda mode: FakeNbdSource(
                    disk, dirty=dirty if mode == BitmapMode.REUSE else None)
            )  # fmt: skip
            restored = [self._restore_bytes(node, v, tmp_path / f"{v.replace('/', '_')}.raw")
                        for v in (vol1, vol2)]  # fmt: skip
        for start, length in fake1.reads:  # nothing read that the export calls a hole
            assert any(a <= start and start + length <= a + n for a, n in allocated)
        assert fake1.closed and fake2.closed
        assert sum(n for _, n in fake1.trims) >= 1 * MiB, "what was stored is discarded"
        if self.claims(Capability.INCREMENTAL):
            assert (mode1, mode2) == (BitmapMode.NEW, BitmapMode.REUSE)
            assert sum(n for _, n in fake2.reads) <= 128 * 1024
        assert restored[0] == first
        assert restored[1] == bytes(disk)

    def test_restore_qemu_get_device_info(self, vm_run: _VmRun) -> None:
        if not self.claims(Capability.VM):
            pytest.skip("covered by test_backup_get_mechanism_refuses_vm")
        assert sorted(vm_run.restore_calls) == [0, 1], "a backup failed"
        for calls in vm_run.restore_calls.values():
            (info,) = [c.result for c in calls if c.name == "restore_qemu_get_device_info"]
            assert set(info) == set(_VM_DEVICES)
            for dev, size in _VM_DEVICES.items():
                assert isinstance(info[dev]["size"], int) and info[dev]["size"] >= size

    def test_restore_qemu_img_init_roundtrip(self, vm_run: _VmRun) -> None:
        """Each ``restore_qemu_img_init`` is followed by its cleanup; the data is equal."""
        if not self.claims(Capability.VM):
            pytest.skip("covered by test_backup_get_mechanism_refuses_vm")
        assert sorted(vm_run.restore_calls) == [0, 1], "a backup failed"
        for n, calls in vm_run.restore_calls.items():
            (mech,) = [c.result for c in calls if c.name == "restore_get_mechanism"]
            assert tuple(mech) == (RestoreMechanism.QEMU_IMG, GuestType.QEMU)
            inits = [c.args[2] for c in calls if c.name == "restore_qemu_img_init"]
            cleanups = [c.args[2] for c in calls if c.name == "restore_qemu_img_cleanup"]
            assert sorted(inits) == sorted(cleanups) == sorted(_VM_DEVICES)
            self._check_vm_restore(vm_run, n)

    def test_restore_qemu_img_cleanup_after_failed_init(
        self, vm_run: _VmRun, contract_spy: ProviderSpy
    ) -> None:
        """A restore failing right after ``restore_qemu_img_init`` still cleans up."""
        if not self.claims(Capability.VM):
            pytest.skip("covered by test_backup_get_mechanism_refuses_vm")

        def fail(call: Call) -> None:
            raise PluginError("injected failure after restore_qemu_img_init")

        contract_spy.after["restore_qemu_img_init"] = fail
        result, calls = self._restore(contract_spy, vm_run.node, vm_run.volname(0), 299)
        inits = [c.args[2] for c in calls if c.name == "restore_qemu_img_init"]
        cleanups = [c for c in calls if c.name == "restore_qemu_img_cleanup"]
        if inits and not cleanups:
            # The host did not clean up: do it, so that what the init started
            # (e.g. an NBD server) does not outlive the test.
            provider = contract_spy.providers[-1]
            with _state_dir(vm_run.node):
                provider.restore_qemu_img_cleanup(vm_run.volname(0), STOREID, inits[0])
        assert isinstance(result, PveBackupError)
        assert inits and [c.args[2] for c in cleanups] == inits[:1]
        assert all(c.error is None for c in cleanups), "a cleanup failed"
        assert vm_run.node.root.guest_type(299) is None

    def test_backup_guest_config_roundtrip(self, vm_run: _VmRun) -> None:
        if not self.claims(Capability.VM):
            pytest.skip("see test_backup_directory_roundtrip")
        provider = self._provider(vm_run.node)
        original = vm_run.node.root.config_path(_VMID, GuestType.QEMU).read_text()
        for n in range(2):
            assert provider.extract_guest_config(vm_run.volname(n), STOREID) == original

    def test_backup_firewall_config_roundtrip(self, vm_run: _VmRun) -> None:
        if not self.claims(Capability.VM):
            pytest.skip("see test_extract_firewall_config_none")
        provider = self._provider(vm_run.node)
        for n in range(2):
            assert provider.extract_firewall_config(vm_run.volname(n), STOREID) == _FIREWALL

    def test_backup_handle_log_file(self, vm_run: _VmRun) -> None:
        """Called once, after ``backup_end``, with the complete task log of the guest."""
        if not self.claims(Capability.VM):
            pytest.skip("see test_backup_abort_failed_guest")
        for calls in vm_run.job_calls:
            names = _names(calls)
            assert names.count("backup_handle_log_file") == 1
            assert names.index("backup_handle_log_file") > names.index("backup_end")
            (call,) = [c for c in calls if c.name == "backup_handle_log_file"]
            assert call.args[0] == _VMID
            assert call.note and "drive-scsi0" in call.note, "the log file was unreadable"

    def test_backup_get_task_size(self, vm_run: _VmRun) -> None:
        if not self.claims(Capability.VM):
            pytest.skip("see test_backup_directory_roundtrip")
        for job, calls in zip(vm_run.jobs, vm_run.job_calls, strict=True):
            (call,) = [c for c in calls if c.name == "backup_get_task_size"]
            assert isinstance(call.result, int) and call.result >= 0
            assert job.guests[0].size == call.result
        (first,) = [c.result for c in vm_run.job_calls[0] if c.name == "backup_get_task_size"]
        assert first > 0, "a full backup of 2 MiB of data stored nothing"

    # -- backup: containers --------------------------------------------------------

    def test_backup_directory_roundtrip(
        self, ct_runs: dict[RestoreMechanism | None, _CtRun]
    ) -> None:
        """Id map in the seed's shape, excludes, mount points; restored tree equal."""
        if not self.claims(Capability.CT):
            run = ct_runs[None]
            assert [g.vmid for g in run.job.failed] == [_CTID]
            error = run.job.failed[0].error or ""
            assert "backup_abort" in _names(run.calls) and "job_end" in _names(run.calls)
            assert "backup_directory" not in _names(run.calls), error
            return
        run = ct_runs[self._ct_mechanisms()[0]]
        assert not run.job.failed, run.job.guests[0].error
        assert _names(run.calls) == _seed_order_one_guest(1, False, "directory")
        (call,) = [c for c in run.calls if c.name == "backup_directory"]
        assert list(call.args[3]) == _EXCLUDES
        assert list(call.args[4]) == [".", "./srv/data"]
        self._check_ct_restore(run)

    def test_backup_directory_id_map(
        self, ct_runs: dict[RestoreMechanism | None, _CtRun]
    ) -> None:
        """``id_map`` entries arrive in the seed's shape: 4-element lists of strings."""
        if not self.claims(Capability.CT):
            pytest.skip("the container fixture is refused (test_backup_directory_roundtrip)")
        run = ct_runs[self._ct_mechanisms()[0]]
        (call,) = [c for c in run.calls if c.name == "backup_directory"]
        id_map = call.args[2]
        assert id_map == [["u", "0", "100000", "65536"], ["g", "0", "100000", "65536"]]
        kind, ct_start, host_start, count = id_map[0]  # unpackable, as the seed's lists
        assert (kind, id_map[0][2]) == ("u", "100000")

    def _check_ct_restore(self, run: _CtRun) -> None:
        if isinstance(run.restore, PveBackupError):
            raise run.restore
        restored = run.node.images / "301"
        for src, dst in (("rootfs", "subvol-301-disk-0.subvol"),
                         ("data", "subvol-301-disk-1.subvol")):  # fmt: skip
            assert compare_trees(run.expected / src, restored / dst) == []

    def _ct_restore_roundtrip(
        self, ct_runs: dict[RestoreMechanism | None, _CtRun], mechanism: RestoreMechanism
    ) -> None:
        claimed = self._ct_mechanisms()
        if mechanism not in claimed:
            # Not claimed: the provider must never hand a container back this way.
            for other in claimed:
                (mech,) = [
                    c.result for c in ct_runs[other].restore_calls
                    if c.name == "restore_get_mechanism"
                ]  # fmt: skip
                assert mech[0] != mechanism
            return
        run = ct_runs[mechanism]
        assert not run.job.failed, run.job.guests[0].error
        (mech,) = [c.result for c in run.restore_calls if c.name == "restore_get_mechanism"]
        assert tuple(mech) == (mechanism, GuestType.LXC)
        names = _names(run.restore_calls)
        prefix = "restore_tar" if mechanism == RestoreMechanism.TAR else "restore_directory"
        assert names.count(f"{prefix}_init") == names.count(f"{prefix}_cleanup") == 1
        assert names.index(f"{prefix}_cleanup") > names.index(f"{prefix}_init")
        self._check_ct_restore(run)

    def test_restore_tar_init_roundtrip(
        self, ct_runs: dict[RestoreMechanism | None, _CtRun]
    ) -> None:
        self._ct_restore_roundtrip(ct_runs, RestoreMechanism.TAR)

    def test_restore_directory_init_roundtrip(
        self, ct_runs: dict[RestoreMechanism | None, _CtRun]
    ) -> None:
        self._ct_restore_roundtrip(ct_runs, RestoreMechanism.DIRECTORY)

    def test_restore_file_reader(self, ct_runs: dict[RestoreMechanism | None, _CtRun]) -> None:
        """Optional capability: single files of a container backup, or a typed refusal."""
        if not self.claims(Capability.CT):
            pytest.skip("no container backups to read files of")
        assert not self.claims(Capability.FILES) or Capability.CT in self.capabilities
        run = ct_runs[self._ct_mechanisms()[0]]
        assert not run.job.failed, run.job.guests[0].error
        target = run.job.guests[0].target
        assert target is not None
        volname = target.split(":", 1)[1]
        with _state_dir(run.node):
            provider = self._provider(run.node)
            if not self.claims(Capability.FILES):
                with pytest.raises(UnsupportedError):
                    provider.restore_file_reader(volname, STOREID)
                return
            reader = provider.restore_file_reader(volname, STOREID)
        root = reader.root()
        assert root.is_dir
        names = {e.name: e for e in reader.list_dir(root.inode)}
        assert {b"etc", b"srv"} <= set(names), sorted(names)
        assert b"var" in names  # excluded below it, not itself
        etc = {e.name: e for e in reader.list_dir(names[b"etc"].inode)}
        hostname = etc[b"hostname"]
        assert hostname.is_file and hostname.size == len(f"ct{_CTID}\n")
        assert b"".join(reader.read(hostname)) == f"ct{_CTID}\n".encode()

    def test_extract_firewall_config_none(
        self, ct_runs: dict[RestoreMechanism | None, _CtRun]
    ) -> None:
        """A guest backed up without a firewall file has none: ``None``, not an error."""
        if not self.claims(Capability.CT):
            pytest.skip("the container fixture is refused (test_backup_directory_roundtrip)")
        run = ct_runs[self._ct_mechanisms()[0]]
        target = run.job.guests[0].target
        assert target is not None
        provider = self._provider(run.node)
        volname = target.split(":", 1)[1]
        assert provider.extract_firewall_config(volname, STOREID) is None
        original = run.node.root.config_path(_CTID, GuestType.LXC).read_text()
        assert provider.extract_guest_config(volname, STOREID) == original

    # -- failures ------------------------------------------------------------------

    def _one_guest(self, node: ContractNode) -> tuple[int, str]:
        """A small guest of a kind the provider claims, with 1 MiB of random data."""
        if self.claims(Capability.VM):
            (disk,) = node.add_vm(_VMID, {"scsi0": 2 * MiB})
            node.write_random(disk, 0, _RANDOM)
            return _VMID, "backup_nbd"
        rootfs, _ = node.add_ct(_CTID)
        (rootfs / "srv/random.bin").write_bytes(os.urandom(_RANDOM))
        return _CTID, "backup_directory"

    def test_backup_abort_failed_guest(self, tmp_path: Path, contract_spy: ProviderSpy) -> None:
        """A guest failing after its data was written leaves no volume and no base."""
        node = self._node(tmp_path)
        vmid, method = self._one_guest(node)

        def fail(call: Call) -> None:
            raise PluginError("injected failure after the data was written")

        kept_after_abort: list[int] = []
        contract_spy.after[method] = fail
        contract_spy.after["backup_abort"] = lambda call: kept_after_abort.append(
            _bytes_under(node.storage_base)
        )
        job, calls = self._backup(contract_spy, node, [vmid])
        assert [g.vmid for g in job.failed] == [vmid]
        if not self.claims(Capability.GARBAGE_COLLECTED):
            # Thrown away by backup_abort itself, not later: the next guest of the
            # job may need the space.
            (kept,) = kept_after_abort
            assert kept < _RANDOM // 2, f"{kept} bytes left when backup_abort returned"
        names = _names(calls)
        assert "backup_end" not in names
        assert names.index("backup_abort") < names.index("backup_handle_log_file")
        assert names[-1] == "job_end"
        (abort,) = [c for c in calls if c.name == "backup_abort"]
        assert abort.args[0] == vmid and "injected failure" in abort.args[1]
        self._check_nothing_kept(node, "failed backup")
        if self.claims(Capability.LIST):
            assert self._list(node, vmid) == []
        # the next backup must not build on what the failed one stored
        job, calls = self._backup(contract_spy, node, [vmid])
        assert not job.failed, job.guests[0].error
        assert "reuse" not in [c.args[3] for c in calls if c.name == "backup_nbd"]

    def _check_nothing_kept(self, node: ContractNode, what: str) -> None:
        if not self.claims(Capability.GARBAGE_COLLECTED):
            kept = _bytes_under(node.storage_base)
            assert kept < _RANDOM // 2, f"the {what} left {kept} bytes in the storage"

    def test_job_abort(self, tmp_path: Path, contract_spy: ProviderSpy) -> None:
        """SIGTERM in the middle of a guest: ``backup_abort``, ``job_abort``, nothing kept."""
        node = self._node(tmp_path)
        vmid, method = self._one_guest(node)

        def interrupt(call: Call) -> None:
            os.kill(os.getpid(), signal.SIGTERM)

        contract_spy.after[method] = interrupt
        contract_spy.calls.clear()
        with pytest.raises(AbortedError), _state_dir(node):
            run_backup_job(node.root, STOREID, [vmid], terminal=None)
        names = contract_spy.names()
        contract_spy.clear()
        assert "backup_end" not in names and "job_end" not in names
        assert names[-1] == "job_abort"
        assert "backup_abort" in names
        self._check_nothing_kept(node, "aborted job")
        if self.claims(Capability.LIST):
            assert self._list(node, vmid) == []

    # -- list and remove -----------------------------------------------------------

    def test_list_volumes(self, vm_run: _VmRun, ct_runs: dict[RestoreMechanism | None, _CtRun]
                          ) -> None:  # fmt: skip
        """``VolumeInfo`` fields; oldest first; ``parent`` names an incremental's base."""
        if not self.claims(Capability.LIST):
            with pytest.raises(UnsupportedError, match="does not implement listing"):
                self._plugin().list_volumes({"type": self.storage_type}, STOREID)
            return
        if not self.claims(Capability.VM):
            run = ct_runs[self._ct_mechanisms()[0]]
            (info,) = self._list(run.node)
            assert info.vmtype == GuestType.LXC and info.vmid == _CTID
            return
        volumes = self._list(vm_run.node)
        names = [vm_run.volname(n) for n in range(2)]
        assert [v.volid for v in volumes] == [f"{STOREID}:{n}" for n in names]
        for info, job in zip(volumes, vm_run.jobs, strict=True):
            assert isinstance(info, VolumeInfo)
            assert (info.vmid, info.vmtype) == (_VMID, GuestType.QEMU)
            assert isinstance(info.ctime, int) and abs(info.ctime - job.start_time) < 600
            # bytes stored for this backup: what backup_get_task_size reported
            assert isinstance(info.size, int) and info.size == job.guests[0].size
            assert info.virtual_size in (None, sum(_VM_DEVICES.values()))
            assert isinstance(info.format, str) and info.format
            assert isinstance(info.comment, str) and isinstance(info.notes, str)
        assert volumes[0].parent is None
        assert volumes[1].parent == (names[0] if self.claims(Capability.CHAINED) else None)

    def test_free_volume(self, tmp_path: Path, contract_spy: ProviderSpy) -> None:
        """Removed volumes are gone from the list and from restores; twice is an error."""
        node = self._node(tmp_path)
        vmid, _ = self._one_guest(node)
        job, _ = self._backup(contract_spy, node, [vmid])
        assert not job.failed, job.guests[0].error
        target = job.guests[0].target
        assert target is not None
        volname = target.split(":", 1)[1]
        if not self.claims(Capability.REMOVE):
            with pytest.raises(UnsupportedError, match="does not implement"):
                self._plugin().free_volume(self._scfg(node), STOREID, volname)
            return
        self._plugin().free_volume(self._scfg(node), STOREID, volname)
        if self.claims(Capability.LIST):
            assert self._list(node, vmid) == []
        with pytest.raises(VolumeNotFoundError):
            self._provider(node).restore_get_mechanism(volname, STOREID)
        with pytest.raises(VolumeNotFoundError):
            self._plugin().free_volume(self._scfg(node), STOREID, volname)

    def test_volume_attributes(self, tmp_path: Path, contract_spy: ProviderSpy) -> None:
        """Notes and protection round-trip; a protected volume is never removed."""
        node = self._node(tmp_path)
        vmid, _ = self._one_guest(node)
        job, _ = self._backup(contract_spy, node, [vmid])
        assert not job.failed, job.guests[0].error
        assert job.guests[0].target is not None
        volname = job.guests[0].target.split(":", 1)[1]
        plugin, scfg = self._plugin(), self._scfg(node)
        if not self.claims(Capability.ATTRIBUTES):
            for attribute, value in (("notes", "x"), ("protected", True)):
                assert plugin.get_volume_attribute(scfg, STOREID, volname, attribute) in (
                    None, "", False,
                )  # fmt: skip
                with pytest.raises(UnsupportedError, match="not supported"):
                    plugin.update_volume_attribute(scfg, STOREID, volname, attribute, value)
            return
        notes = "first line\nsecond: ünïcode\t{{vmid}}"
        plugin.update_volume_attribute(scfg, STOREID, volname, "notes", notes)
        plugin.update_volume_attribute(scfg, STOREID, volname, "protected", True)
        assert plugin.get_volume_attribute(scfg, STOREID, volname, "notes") == notes
        assert plugin.get_volume_attribute(scfg, STOREID, volname, "protected") is True
        (info,) = self._list(node, vmid)
        assert (info.notes, info.protected) == (notes, True)
        with pytest.raises(VolumeProtectedError):
            plugin.free_volume(scfg, STOREID, volname)
        with pytest.raises(VolumeProtectedError):
            remove_backup_volume(plugin, scfg, STOREID, volname)
        assert len(self._list(node, vmid)) == 1
        for bad in ("\x1b]0;pwned\x07", "x" * (1 << 20)):  # escapes; far too long
            with pytest.raises(UsageError):
                plugin.update_volume_attribute(scfg, STOREID, volname, "notes", bad)
        assert plugin.get_volume_attribute(scfg, STOREID, volname, "notes") == notes
        plugin.update_volume_attribute(scfg, STOREID, volname, "notes", "")
        plugin.update_volume_attribute(scfg, STOREID, volname, "protected", False)
        (info,) = self._list(node, vmid)
        assert (info.notes, info.protected) == ("", False)
        with pytest.raises(VolumeNotFoundError):
            plugin.update_volume_attribute(scfg, STOREID, volname + "0", "protected", True)
        remove_backup_volume(plugin, scfg, STOREID, volname)
        assert self._list(node, vmid) == []
        with pytest.raises(VolumeNotFoundError):
            plugin.get_volume_attribute(scfg, STOREID, volname, "notes")

    # -- bad input -----------------------------------------------------------------

    HOSTILE_VOLNAMES: ClassVar[tuple[str, ...]] = (
        "no-such-volume",
        "../decoy",
        "backup/../../decoy",
        "/etc/passwd",
        "a\x00b",
        "x" * 5000,
        "vm-100-2026-12-01T20:52:27Z/../../../decoy",
    )

    def test_restore_get_mechanism_bad_volname(
        self, tmp_path: Path, contract_spy: ProviderSpy
    ) -> None:
        """Missing or hostile volume names are typed errors and touch nothing outside."""
        node = self._node(tmp_path)
        decoy = tmp_path / "decoy"
        decoy.mkdir()
        (decoy / "keep").write_text("keep\n")
        provider = self._provider(node)
        for volname in self.HOSTILE_VOLNAMES:
            for call in (provider.restore_get_mechanism, provider.extract_guest_config):
                with pytest.raises(PveBackupError):
                    call(volname, STOREID)
            if self.claims(Capability.REMOVE):
                with pytest.raises(PveBackupError):
                    self._plugin().free_volume(self._scfg(node), STOREID, volname)
        assert (decoy / "keep").read_text() == "keep\n"

    def test_list_volumes_empty_storage(self, tmp_path: Path, contract_spy: ProviderSpy) -> None:
        """Before the first backup the list is empty, not an error."""
        if not self.claims(Capability.LIST):
            pytest.skip("see test_list_volumes")
        assert self._list(self._node(tmp_path)) == []


class _LazyCtRuns(dict[RestoreMechanism | None, _CtRun]):
    """Makes the container scenario of a mechanism the first time a test asks for it."""

    def __init__(
        self, suite: ProviderContract, spy: ProviderSpy, factory: pytest.TempPathFactory
    ) -> None:
        super().__init__()
        self.suite, self.spy, self.factory = suite, spy, factory

    def __missing__(self, mechanism: RestoreMechanism | None) -> _CtRun:
        run = self.suite._ct_run(self.spy, self.factory.mktemp("ct"), mechanism)
        self[mechanism] = run
        return run
