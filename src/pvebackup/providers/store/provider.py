"""``BackupStoreProvider``: VM backups into the deduplicating chunk store.

One snapshot per guest backup (see :mod:`pvebackup.store.snapshot`): one fixed
index per disk, the guest and firewall configs as blobs, the manifest last
(written in ``backup_end``, which makes the backup durable and visible). The task
log arrives after ``backup_end``: it is stored as ``task.log``, a blob next to the
manifest and not listed in it (AEAD-protected in an encrypted store), so the
committed manifest never has to be rewritten. It goes away with the snapshot.

Incremental backups use one dirty bitmap per storage (``store-<store id>``); which
snapshot the bitmap may be applied to is kept by :mod:`.bitmap_base`. Containers
are stored as one tar stream in fixed-size chunks (:mod:`.ctarchive`) and restored
with the ``tar`` mechanism through a FIFO. VM restores serve each disk through
nbdkit (:mod:`.restore_server`).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pvebackup.api.errors import (
    BaseUnusableError,
    CorruptChunkError,
    CorruptIndexError,
    PveBackupError,
    UnsafeStorageError,
    UnsupportedError,
    UsageError,
    VolumeNotFoundError,
)
from pvebackup.api.provider import BackupProvider, no_backup_started
from pvebackup.api.types import (
    BackupMechanism,
    BitmapMode,
    DeviceInfo,
    GuestType,
    LogFunction,
    RestoreMechanism,
)
from pvebackup.kit import safefs
from pvebackup.kit.crashpoint import crash_point
from pvebackup.kit.hoststate import HostState
from pvebackup.kit.nbdsource import SourceFactory
from pvebackup.kit.oserrors import os_error
from pvebackup.kit.safefs import MAX_CONFIG_FILE_SIZE
from pvebackup.kit.units import format_bytes
from pvebackup.providers.store.bitmap_base import BitmapBase, commit_base, decide, reset_base
from pvebackup.providers.store.ctarchive import TarFeeder, backup_archive, extract_directory
from pvebackup.providers.store.ctfiles import CatalogFiles
from pvebackup.providers.store.ctreuse import find_previous
from pvebackup.providers.store.disk import DiskBackup
from pvebackup.providers.store.restore_server import RestoreServer
from pvebackup.providers.store.settings import StoreSettings
from pvebackup.store.backends.retry import RetryBackend
from pvebackup.store.datastore import Datastore
from pvebackup.store.snapshot import Snapshot, SnapshotId, SnapshotWriter

__all__ = ["CONFIG_FILE", "FIREWALL_FILE", "TASK_LOG_FILE", "BackupStoreProvider"]

CONFIG_FILE = "guest.conf"
FIREWALL_FILE = "firewall.fw"
TASK_LOG_FILE = "task.log"


@dataclass
class _Guest:
    """State of one guest's backup between ``backup_start`` and the log file."""

    vmid: int
    vmtype: GuestType
    snapshot: SnapshotId
    writer: SnapshotWriter
    bitmap_id: str | None = None
    base: SnapshotId | None = None
    base_sha256: str | None = None
    pinned: SnapshotId | None = None
    modes: dict[str, str] = field(default_factory=dict)
    new_bytes: int = 0
    stored_bytes: int = 0
    reused_bytes: int = 0
    committed: bool = False
    base_unusable: str | None = None
    task_size: int = 0


class BackupStoreProvider(BackupProvider):
    """The provider of storage type ``backup-store``."""

    source_factory: SourceFactory | None = None
    """Tests set this to wrap the NBD source (e.g. to record reads)."""
    progress_interval: float = 5.0

    def __init__(
        self,
        storage_plugin: object,
        scfg: Mapping[str, str],
        storeid: str,
        log_function: LogFunction,
        *,
        state_dir: Path | str | None = None,
    ) -> None:
        """``state_dir``: where the host-side base proof lives (default: see
        :func:`pvebackup.kit.hoststate.default_state_dir`)."""
        super().__init__(storage_plugin, scfg, storeid, log_function)
        self.settings = StoreSettings.from_scfg(scfg, storeid)
        self.hoststate = HostState("backup-store", storeid, state_dir)
        self._store: Datastore | None = None
        self._guests: dict[int, _Guest] = {}
        self._restores: dict[tuple[str, str], RestoreServer] = {}
        self._tar_feeders: dict[str, TarFeeder] = {}
        self._ct_dirs: dict[str, Path] = {}

    def provider_name(self) -> str:
        return "backup-store"

    # store -------------------------------------------------------------------------

    def store(self, *, create: bool = False) -> Datastore:
        """The datastore, opened on first use (created by ``job_start`` if empty)."""
        if self._store is None:
            # The chunk index cache is host state: the storage may be shared or
            # hostile, and what the cache says decides which chunks are skipped.
            self._store = self.settings.open(create=create, cache_dir=self.chunk_cache_dir)
        return self._store

    @property
    def chunk_cache_dir(self) -> Path:
        """``<cache-dir or state dir/backup-store/<storeid>>/chunkcache``; one
        subdirectory per store id, owned (locked) by one process at a time."""
        if self.settings.cache_dir is not None:
            return Path(self.settings.cache_dir) / "chunkcache"
        return self.hoststate.dir / "chunkcache"

    # job hooks ---------------------------------------------------------------------

    def job_start(self, start_time: int) -> None:
        store = self.store(create=True)
        enc = "encrypted" if store.encrypted else "not encrypted"
        self.log("info", f"backup-store {self.storeid}: {self.settings.path} ({enc})")

    def job_end(self) -> None:
        self._drop_unfinished()

    def job_abort(self, error: str) -> None:
        self._drop_unfinished()

    def _drop_unfinished(self) -> None:
        for guest in list(self._guests.values()):
            if not guest.committed:
                guest.writer.abort()
        self._guests.clear()
        if self._store is not None:
            # ends the writer session, so that garbage collection need not wait
            # for it to expire; and lets other processes have the chunk index cache
            self._store.close()
            self._store.close_cache()

    # guest hooks -------------------------------------------------------------------

    def _guest(self, vmid: int) -> _Guest:
        guest = self._guests.get(vmid)
        if guest is None:
            raise UsageError(no_backup_started(vmid))
        return guest

    def _new_snapshot_id(self, vmtype: GuestType, vmid: int) -> SnapshotId:
        # Names have one-second resolution: never reuse or go behind an existing one.
        existing = self.store().list_snapshots(vmtype, vmid)
        t = int(time.time())
        if existing and existing[-1].backup_time >= t:
            t = existing[-1].backup_time + 1
        return SnapshotId(vmtype, vmid, t)

    def backup_start(self, vmid: int, vmtype: GuestType) -> None:
        vmtype = GuestType(vmtype)
        store = self.store()
        sid = self._new_snapshot_id(vmtype, vmid)
        writer = store.new_snapshot(sid, chunk_size=self.settings.index_chunk_size(store))
        self._guests[vmid] = _Guest(vmid, vmtype, sid, writer)

    def backup_get_mechanism(
        self, vmid: int, vmtype: GuestType
    ) -> tuple[BackupMechanism, str | None]:
        if GuestType(vmtype) is GuestType.LXC:
            return BackupMechanism.DIRECTORY, None
        guest = self._guests.get(vmid)
        store = self.store()
        decision = decide(
            store, self.hoststate, GuestType.QEMU, vmid, self.settings.index_chunk_size(store)
        )
        self.log(decision.level, decision.message)
        if guest is not None:
            guest.bitmap_id = decision.bitmap_id
            guest.base = decision.base
            guest.base_sha256 = decision.base_sha256
            if decision.base is not None and guest.pinned is None:
                # Until this guest's backup ends, removal in any process refuses
                # the base (store lock protocol, docs/design.md).
                store.pin_snapshot(decision.base)
                guest.pinned = decision.base
        return BackupMechanism.NBD, decision.bitmap_id

    def backup_get_target(self, vmid: int, vmtype: GuestType) -> str:
        return self._guest(vmid).snapshot.volname

    def backup_get_task_size(self, vmid: int) -> int:
        return self._guest(vmid).task_size

    def backup_guest_config(self, vmid: int, filename: str) -> None:
        self._add_file(vmid, CONFIG_FILE, filename)

    def backup_firewall_config(self, vmid: int, filename: str) -> None:
        self._add_file(vmid, FIREWALL_FILE, filename)

    def _add_file(self, vmid: int, name: str, filename: str) -> None:
        writer = self._guest(vmid).writer
        try:
            # The restore refuses a larger config: better to fail the backup now.
            data = safefs.read_file_path(filename, limit=MAX_CONFIG_FILE_SIZE)
        except OSError as exc:
            raise os_error(exc, f"cannot read {filename}") from exc
        writer.add_file(name, data)

    def backup_nbd(
        self,
        vmid: int,
        devicename: str,
        nbd_path: str,
        bitmap_mode: BitmapMode,
        bitmap_name: str | None,
        bandwidth_limit: int | None,
    ) -> None:
        guest = self._guest(vmid)
        mode = BitmapMode(bitmap_mode)
        guest.modes[devicename] = mode.value
        reuse = mode is BitmapMode.REUSE
        if reuse and not bitmap_name:
            raise UsageError(f"{devicename}: bitmap mode reuse without a bitmap name")
        base: Snapshot | None = None
        if reuse and guest.base is not None:
            try:
                base = self.store().open_snapshot(guest.base)
            except PveBackupError:
                base = None
            # Threat: the store changed since backup_get_mechanism proved the base.
            if base is not None and base.manifest_sha256 != guest.base_sha256:
                base = None
        if reuse and base is None:
            # Refused before connecting: only dirty extents can be read, and there
            # is nothing to take the rest from (the same answer as backup-dir's).
            guest.base_unusable = "mode reuse without a usable base"
            raise BaseUnusableError(
                f"{devicename}: bitmap mode reuse but there is no previous backup to "
                "apply it to; the next backup will be full"
            )
        job = DiskBackup(
            store=self.store(),
            writer=guest.writer,
            devicename=devicename,
            nbd_path=nbd_path,
            log=self.log_function,
            bandwidth_limit=bandwidth_limit,
            progress_interval=self.progress_interval,
        )
        if self.source_factory is not None:
            job.source_factory = self.source_factory
        try:
            stats = job.run(bitmap_name if reuse else None, base)
        except BaseUnusableError as exc:
            guest.base_unusable = str(exc)
            raise BaseUnusableError(
                f"{exc}; the incremental backup cannot be made, the next backup will be full"
            ) from exc
        guest.new_bytes += stats.new
        guest.stored_bytes += stats.stored
        guest.reused_bytes += stats.reused

    def backup_directory(
        self,
        vmid: int,
        directory: str,
        id_map: Sequence[Sequence[str]],
        exclude_paths: Sequence[str],
        sources: Sequence[str],
        bandwidth_limit: int | None,
    ) -> None:
        guest = self._guest(vmid)
        previous = find_previous(self.store(), vmid, self.log_function)
        try:
            stats = backup_archive(
                self.store(), guest.writer, directory, sources, id_map, exclude_paths,
                bandwidth_limit, self.log_function, previous,
            )  # fmt: skip
        except OSError as exc:
            raise os_error(exc, f"cannot archive {directory}") from exc
        guest.new_bytes += stats.new
        guest.stored_bytes += stats.stored
        guest.reused_bytes += stats.reused
        walk = stats.walk
        self.log(
            "info",
            f"backup-store: {walk.entries} entries, {format_bytes(walk.data)} of file data, "
            f"{walk.excluded} excluded, {walk.skipped} skipped, "
            f"archive {format_bytes(stats.size)} in {stats.chunks} chunks, "
            f"{format_bytes(stats.new)} new, {format_bytes(stats.reused)} deduplicated, "
            f"{stats.sparse_files} sparse files ({format_bytes(stats.holes)} of holes not stored)",
        )
        if previous is not None:
            self.log(
                "info",
                f"backup-store: reused {stats.reused_entries} unchanged entries and "
                f"{stats.reused_files} large files ({format_bytes(stats.reused_data)} of file "
                f"data) of {previous.volname} without reading them",
            )

    def backup_end(self, vmid: int) -> None:
        guest = self._guest(vmid)
        writer = guest.writer
        writer.bitmap_id = guest.bitmap_id if any(
            m != BitmapMode.NONE for m in guest.modes.values()
        ) else None
        writer.parent = guest.base if BitmapMode.REUSE in guest.modes.values() else None
        writer.metadata.update(
            {
                "provider": "backup-store",
                "bitmap-modes": ",".join(f"{d}={m}" for d, m in sorted(guest.modes.items())),
                "new-bytes": str(guest.new_bytes),
                "stored-bytes": str(guest.stored_bytes),
                "reused-bytes": str(guest.reused_bytes),
            }
        )
        crash_point("backup-before-manifest")
        manifest = writer.commit()
        crash_point("backup-after-manifest")
        guest.committed = True
        self._unpin(guest)
        guest.task_size = guest.stored_bytes + sum(f.size for f in manifest.files.values())
        if guest.vmtype is GuestType.QEMU:
            # The proof for the next incremental: this snapshot, byte for byte (the
            # host clears the bitmap only after we return).
            commit_base(
                self.store(),
                self.hoststate,
                "vm",
                vmid,
                BitmapBase(guest.snapshot, writer.manifest_sha256, writer.bitmap_id),
            )
        self.log(
            "info",
            f"snapshot {guest.snapshot} committed: new {format_bytes(guest.new_bytes)} "
            f"(stored {format_bytes(guest.stored_bytes)}), "
            f"reused {format_bytes(guest.reused_bytes)}{_retried(self.store())}",
        )

    def backup_abort(self, vmid: int, error: str) -> None:
        guest = self._guests.get(vmid)
        if guest is None:
            return
        if not guest.committed:
            guest.writer.abort()
        try:
            self._unpin(guest)
        except PveBackupError as exc:  # the pin ends with the session anyway
            self.log("warn", f"cannot unpin {guest.pinned}: {exc}")
        reason: str | None = None
        if guest.base_unusable is not None:
            reason = guest.base_unusable
        elif BitmapMode.NEW in guest.modes.values():
            reason = "a backup that created a new dirty bitmap failed"
        if reason is not None and not guest.committed:
            reset_base(self.store(), self.hoststate, "vm", vmid, reason)

    def _unpin(self, guest: _Guest) -> None:
        if guest.pinned is not None:
            self.store().unpin_snapshot(guest.pinned)
            guest.pinned = None

    def backup_handle_log_file(self, vmid: int, filename: str) -> None:
        guest = self._guests.get(vmid)
        if guest is None or not guest.committed:
            return  # nothing was kept of a failed backup, so neither is its log
        try:
            data = safefs.read_file_path(filename)
        except (OSError, UnsafeStorageError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            self.log("warn", f"cannot read the task log {filename}: {why}")
            return
        store = self.store()
        store.backend.put(
            guest.snapshot.prefix + TASK_LOG_FILE, store.codec.encode(data), overwrite=True
        )

    # restore -----------------------------------------------------------------------

    def _snapshot(self, volname: str) -> Snapshot:
        try:
            sid = SnapshotId.from_volname(volname)
        except ValueError as exc:
            raise VolumeNotFoundError(f"{volname!r} is not a backup-store volume name") from exc
        return self.store().open_snapshot(sid)

    def restore_get_mechanism(
        self, volname: str, storeid: str
    ) -> tuple[RestoreMechanism, GuestType]:
        snap = self._snapshot(volname)
        if snap.id.guest_type is GuestType.LXC:
            if self.settings.ct_restore == "directory":
                return RestoreMechanism.DIRECTORY, GuestType.LXC
            return RestoreMechanism.TAR, GuestType.LXC
        return RestoreMechanism.QEMU_IMG, GuestType.QEMU

    def extract_guest_config(self, volname: str, storeid: str) -> str:
        return _config_text(self._snapshot(volname), CONFIG_FILE)

    def extract_firewall_config(self, volname: str, storeid: str) -> str | None:
        snap = self._snapshot(volname)
        if FIREWALL_FILE not in snap.file_names():
            return None
        return _config_text(snap, FIREWALL_FILE)

    def restore_tar_init(self, volname: str, storeid: str) -> str:
        """A FIFO in a private directory serving the archive as plain, uncompressed
        tar (PAX; sparse files as PAX sparse 1.0), every chunk verified."""
        snap = self._snapshot(volname)
        if snap.id.guest_type is not GuestType.LXC:
            raise UnsupportedError(f"{volname} is not a container backup")
        self.restore_tar_cleanup(volname, storeid)
        feeder = TarFeeder(self.store(), snap)
        self._tar_feeders[volname] = feeder
        self.log("info", f"backup-store: serving {volname} as uncompressed tar through a FIFO")
        return str(feeder.path)

    def restore_tar_cleanup(self, volname: str, storeid: str) -> None:
        feeder = self._tar_feeders.pop(volname, None)
        if feeder is not None:
            feeder.close()

    def restore_directory_init(self, volname: str, storeid: str) -> str:
        """The archive extracted (every chunk verified) into a private directory."""
        snap = self._snapshot(volname)
        if snap.id.guest_type is not GuestType.LXC:
            raise UnsupportedError(f"{volname} is not a container backup")
        self.restore_directory_cleanup(volname, storeid)
        root = extract_directory(self.store(), snap, self.log_function)
        self._ct_dirs[volname] = root
        return str(root)

    def restore_file_reader(self, volname: str, storeid: str) -> CatalogFiles:
        """The container archive's files through its catalog (format 2 only)."""
        snap = self._snapshot(volname)
        if snap.id.guest_type is not GuestType.LXC:
            raise UnsupportedError(
                f"{volname} is not a container backup (for VM backups: pvebackup vm-files)"
            )
        return CatalogFiles.open(self.store(), snap)

    def restore_directory_cleanup(self, volname: str, storeid: str) -> None:
        root = self._ct_dirs.pop(volname, None)
        if root is not None:
            shutil.rmtree(root.parent, ignore_errors=True)

    def restore_qemu_get_device_info(self, volname: str, storeid: str) -> DeviceInfo:
        return {name: {"size": dev.size} for name, dev in self._snapshot(volname).devices.items()}

    def restore_qemu_img_init(self, volname: str, storeid: str, devicename: str) -> str:
        snap = self._snapshot(volname)
        snap.open_fixed_index(devicename)  # fail here, with a clear error, not inside nbdkit
        self.restore_qemu_img_cleanup(volname, storeid, devicename)
        key = self.settings.load_key()
        server = RestoreServer(
            self.settings.location,
            snap.id.path,
            devicename,
            None if key is None else key.material,
            backend=self.settings.backend,
        )
        self._restores[(volname, devicename)] = server
        return server.uri

    def restore_qemu_img_cleanup(self, volname: str, storeid: str, devicename: str) -> None:
        server = self._restores.pop((volname, devicename), None)
        if server is None:
            return
        errors = server.stop()
        if errors:
            self.log("err", f"restore of {devicename} from {volname}: {errors}")
        if server.integrity_failures:
            # The host's qemu-img only saw EIO; say what really failed (exit code 5).
            raise CorruptChunkError(
                f"restore of {devicename} from {volname} stopped: "
                + "; ".join(server.integrity_failures)
            )


def _config_text(snap: Snapshot, name: str) -> str:
    """A stored config as text; we only store UTF-8, so anything else is damage."""
    data = snap.read_file(name)
    if len(data) > MAX_CONFIG_FILE_SIZE:
        raise CorruptIndexError(f"snapshot {snap.id}: {name} is larger than a config can be")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptIndexError(f"snapshot {snap.id}: {name} is not UTF-8 text") from exc


def _retried(store: Datastore) -> str:
    """``", 120 S3 requests (41 PUT), 3 retried"`` for a backend that retries (S3),
    else ``""``: counts since the store was opened (this job), so that a flaky
    endpoint, and what the job costs in requests, show in the task log."""
    backend = store.backend
    if not isinstance(backend, RetryBackend):
        return ""
    note = f", {backend.retries} storage requests retried"
    requests = getattr(backend.inner, "requests", None)
    if isinstance(requests, dict):
        puts = sum(n for op, n in requests.items() if op in ("put_object", "upload_part"))
        note = f", {sum(requests.values())} S3 requests ({puts} PUT){note}"
    return note
