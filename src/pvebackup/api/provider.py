"""The backup provider contract: ``BackupProvider``, every method of the seed.

A storage plugin for an external backup system returns an instance of a subclass
from ``new_backup_provider(scfg, storeid, log_function)``. The host (Proxmox VE's
role, here :mod:`pvebackup.host`) then calls the methods below. Every method of
this base class raises :class:`ProviderNotImplementedError` ("not implemented by
<provider>"), the Python form of the seed's ``die "implement me in subclass"``; a
provider overrides what it supports. It is enough to implement one backup and one
restore mechanism per guest type it supports.

Call order of a backup job (``pvebackup backup``, vzdump's role)::

    job_start(start_time)
    for each guest:
        backup_start(vmid, vmtype)
        backup_get_mechanism(vmid, vmtype)      -> (mechanism, bitmap_id)
        backup_get_target(vmid, vmtype)         -> volname
        backup_guest_config(vmid, filename)
        backup_firewall_config(vmid, filename)  (only when the guest has one)
        backup_nbd(...) per disk | backup_directory(...)
        backup_end(vmid)             or, on any failure of this guest,
        backup_abort(vmid, error)    and the job goes on with the next guest
        backup_handle_log_file(vmid, filename)
        backup_get_task_size(vmid)              -> bytes (for the report)
    job_end()                        after all guests, even when some failed, or
    job_abort(error)                 when the job itself fails or is interrupted

Call order of a restore (``pvebackup restore``, qmrestore/pct restore's role)::

    restore_get_mechanism(volname, storeid)     -> (mechanism, vmtype)
    extract_guest_config(volname, storeid)
    extract_firewall_config(volname, storeid)
    qemu-img:  restore_qemu_get_device_info(volname, storeid)
               per device: restore_qemu_img_init(...) -> path/URI,
                           qemu-img convert, restore_qemu_img_cleanup(...) (always)
    tar:       restore_tar_init(...) -> archive, extract, restore_tar_cleanup(...) (always)
    directory: restore_directory_init(...) -> dir, copy, restore_directory_cleanup(...) (always)

Units: sizes in bytes, bandwidth limits in bytes per second, times in Unix seconds.

Same situation, same behaviour. Every provider of this project (and the contract
suite in :mod:`pvebackup.testing` holds third-party ones to it) answers these
situations alike, with the error class (and so the CLI exit code) given:

====================================================  =================================
situation                                             behaviour
====================================================  =================================
a per-guest method for a vmid without ``backup_start``  ``UsageError`` (exit 2), message
(``backup_get_target``, ``backup_get_task_size``,        :func:`no_backup_started`
``backup_nbd``, ``backup_end``, configs, ...)
``backup_abort`` / ``backup_handle_log_file`` for a    no-op (the host calls them after a
vmid without (successful) ``backup_start``              failed ``backup_start``, too)
``backup_guest_config`` etc. with a file that cannot   ``os_error`` mapping of
be read                                                 :mod:`pvebackup.kit.oserrors`:
                                                        missing -> ``NotFoundError`` (3)
``backup_nbd`` in mode ``reuse`` without a usable      ``BaseUnusableError`` (7); nothing
base (none, gone, changed, other size)                 stored, the next backup is full
the storage path is missing or not mounted             ``StorageUnavailableError`` (3),
                                                        nothing created
listing before the first backup                        empty list, no error
no space left on the storage                           ``StorageFullError`` (12)
====================================================  =================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pvebackup.api.errors import ProviderNotImplementedError, UnsupportedError
from pvebackup.api.files import FsReader
from pvebackup.api.types import (
    BackupMechanism,
    BitmapMode,
    DeviceInfo,
    GuestType,
    LogFunction,
    LogLevel,
    RestoreMechanism,
)

__all__ = ["BackupProvider", "no_backup_started"]


def no_backup_started(vmid: int) -> str:
    """The message of the ``UsageError`` for a guest method called before
    ``backup_start`` of that guest (the same text from every provider)."""
    return f"no backup of guest {vmid} was started (backup_start was not called)"


class BackupProvider:
    """Base class of every backup provider. See the module docstring for call order."""

    def __init__(
        self,
        storage_plugin: object,
        scfg: Mapping[str, str],
        storeid: str,
        log_function: LogFunction,
    ) -> None:
        """Create the provider for one backup job or one restore (the seed's ``new``).

        Called by the storage plugin's ``new_backup_provider``.

        :param storage_plugin: the storage plugin (class or instance) this provider
            belongs to; kept as ``self.storage_plugin``.
        :param scfg: the storage's configuration from storage.cfg: ``type`` plus
            its properties, all values as strings (flags as ``"1"``).
        :param storeid: the storage id.
        :param log_function: ``log_function(level, message)`` writes to the task log
            with level ``info``, ``warn`` or ``err``.
        :raises ConfigError: when ``scfg`` lacks something the provider needs.
        """
        self.storage_plugin = storage_plugin
        self.scfg = scfg
        self.storeid = storeid
        self.log_function = log_function

    # helpers for subclasses ------------------------------------------------------

    def log(self, level: LogLevel | str, message: str) -> None:
        """Write ``message`` to the task log through ``log_function``."""
        self.log_function(str(level), message)

    def _shown_name(self) -> str:
        try:
            return self.provider_name()
        except ProviderNotImplementedError:
            return type(self).__name__

    def _not_implemented(self, method: str) -> ProviderNotImplementedError:
        return ProviderNotImplementedError(
            f"{method}() is not implemented by {self._shown_name()}"
        )

    # general ---------------------------------------------------------------------

    def provider_name(self) -> str:
        """Return the provider's name; it is printed in some log lines."""
        raise ProviderNotImplementedError(
            f"provider_name() is not implemented by {type(self).__name__}"
        )

    # job hooks -------------------------------------------------------------------

    def job_start(self, start_time: int) -> None:
        """Called once when the job starts, before the first guest is backed up.

        :param start_time: Unix time (seconds) when the job started.
        :raises PveBackupError: fails the whole job (the host then calls ``job_abort``).
        """
        raise self._not_implemented("job_start")

    def job_end(self) -> None:
        """Called when the job ends, after all guests, even if some backups failed."""
        raise self._not_implemented("job_end")

    def job_abort(self, error: str) -> None:
        """Called instead of ``job_end`` when the job is aborted.

        The job is aborted when it is interrupted by a signal (SIGINT, SIGTERM) or
        hits another fundamental failure (e.g. ``job_start`` failed).

        :param error: the error message indicating the failure.
        """
        raise self._not_implemented("job_abort")

    # guest hooks -----------------------------------------------------------------

    def backup_start(self, vmid: int, vmtype: GuestType) -> None:
        """Called before the backup of a given guest is made.

        :param vmid: id of the guest being backed up.
        :param vmtype: ``qemu`` or ``lxc``.
        :raises PveBackupError: this guest fails (``backup_abort`` follows).
        """
        raise self._not_implemented("backup_start")

    def backup_end(self, vmid: int) -> None:
        """Called after the backup of a given guest finished successfully.

        A provider commits the backup here (e.g. makes the snapshot visible). If it
        raises, the guest's backup counts as failed and ``backup_abort`` follows.
        Once it has *returned*, ``backup_abort`` is never called for this guest,
        also when a signal or a failure of the host's own teardown follows: the
        backup is committed (the host then only logs it; its dirty bitmap is not
        advanced, so the next backup reads more, never less).

        :param vmid: id of the guest being backed up.
        """
        raise self._not_implemented("backup_end")

    def backup_abort(self, vmid: int, error: str) -> None:
        """Called if the backup of a given guest encountered an error or was aborted.

        The provider must throw away what it stored for this guest's backup; a
        failed backup must never become the base of a later incremental one.

        :param vmid: id of the guest being backed up.
        :param error: the error message of the failure.
        """
        raise self._not_implemented("backup_abort")

    def backup_get_mechanism(
        self, vmid: int, vmtype: GuestType
    ) -> tuple[BackupMechanism, str | None]:
        """Decide which mechanism is used to back up the guest.

        :param vmid: id of the guest being backed up.
        :param vmtype: ``qemu`` or ``lxc``.
        :returns: ``(mechanism, bitmap_id)``. ``mechanism`` is ``nbd`` for ``qemu``
            and ``directory`` for ``lxc``; the provider implements the matching
            ``backup_<mechanism>``. ``bitmap_id`` is, if the provider backs up with
            a dirty bitmap, the id of the bitmap to use, else ``None``. Re-use the
            same id for incremental backups; return ``None`` when the base an
            incremental backup would need is gone (the host then does a full
            backup).
        :raises UnsupportedError: the provider does not support this guest type
            (the seed: "die or return undef"). Returning plain ``None`` (the seed's
            undef) has the same effect: the host fails that guest with "provider
            does not support backing up <vmtype> guests" and calls
            ``backup_abort``; the job goes on. Anything but a pair of strings
            (bitmap id may be ``None``) is a ``PluginError`` for that guest.
        """
        raise self._not_implemented("backup_get_mechanism")

    def backup_get_target(self, vmid: int, vmtype: GuestType) -> str:
        """Return the volume name of the backup archive this backup will create.

        The archive can later be accessed through the storage plugin under that
        name; the host reports it as ``STOREID:VOLNAME``.

        :param vmid: id of the guest being backed up.
        :param vmtype: ``qemu`` or ``lxc``.
        """
        raise self._not_implemented("backup_get_target")

    def backup_get_task_size(self, vmid: int) -> int:
        """Return the size of the backup after completion, in bytes: what this
        backup stored (the ``size`` the storage's listing shows for the volume).

        :param vmid: id of the guest that was backed up.
        """
        raise self._not_implemented("backup_get_task_size")

    # configuration and log -------------------------------------------------------

    def backup_guest_config(self, vmid: int, filename: str) -> None:
        """Back up the guest's configuration file.

        :param vmid: id of the guest being backed up.
        :param filename: path of the file with the guest configuration.
        """
        raise self._not_implemented("backup_guest_config")

    def backup_firewall_config(self, vmid: int, filename: str) -> None:
        """Back up the guest's firewall configuration file (only called if it exists).

        :param vmid: id of the guest being backed up.
        :param filename: path of the file with the guest's firewall configuration.
        """
        raise self._not_implemented("backup_firewall_config")

    def backup_handle_log_file(self, vmid: int, filename: str) -> None:
        """Handle the backup's task log, e.g. store or upload a copy of it.

        Called after ``backup_end`` or ``backup_abort``, so the log is complete.

        :param vmid: id of the guest that was backed up.
        :param filename: path of the file with the task log.
        """
        raise self._not_implemented("backup_handle_log_file")

    # backup mechanisms -----------------------------------------------------------

    def backup_nbd(
        self,
        vmid: int,
        devicename: str,
        nbd_path: str,
        bitmap_mode: BitmapMode,
        bitmap_name: str | None,
        bandwidth_limit: int | None,
    ) -> None:
        """Back up one VM disk made available as an NBD export (VMs only).

        Called once per disk of the VM. The export is an unchanging copy of the
        disk as of backup start: either the full image, or, with ``bitmap_mode``
        ``reuse``, the dirty parts since the last successful backup with this
        bitmap. **Reading outside the dirty parts is an error.** Dirty extents are
        found with NBD block status on the meta context
        ``qemu:dirty-bitmap:<bitmap_name>``, which the export offers whenever
        ``bitmap_name`` is given: in mode ``reuse`` it holds the changes, in mode
        ``new`` it reports the *whole disk* dirty (there is no base yet), so one
        code path may read "the dirty extents" in both modes. In modes ``none``
        and ``new`` the context ``base:allocation`` tells data from holes. After
        backing up each part, discard (trim) it on the export: a fleecing image
        on the host holds copies of blocks the guest overwrote, and discards
        free that space.

        :param vmid: id of the guest being backed up.
        :param devicename: device name of the disk (e.g. ``drive-scsi0``), also
            the NBD export name. Remember it: restores name disks by it.
        :param nbd_path: path of the NBD Unix socket.
        :param bitmap_mode: ``none``, ``new`` or ``reuse`` (see :class:`BitmapMode`).
        :param bitmap_name: name of the dirty bitmap when one is used, else None.
        :param bandwidth_limit: bytes per second the provider must not exceed for
            I/O on the source and network traffic; ``None`` means unlimited.
        :raises PveBackupError: the guest's backup fails (``backup_abort`` follows).
        """
        raise self._not_implemented("backup_nbd")

    def backup_directory(
        self,
        vmid: int,
        directory: str,
        id_map: Sequence[Sequence[str]],
        exclude_paths: Sequence[str],
        sources: Sequence[str],
        bandwidth_limit: int | None,
    ) -> None:
        """Back up a directory holding an unchanging copy of a container's filesystem.

        :param vmid: id of the guest being backed up.
        :param directory: path of the directory to back up.
        :param id_map: the container's uid/gid mappings in the seed's shape: a
            list of 4-element lists of strings, e.g.
            ``[["u", "0", "100000", "65536"], ["g", "0", "100000", "65536"]]``
            (kind ``u``/``g``, first container id, first host id, count); empty
            for a privileged container. Unpack or index them as in the seed; to
            compute, wrap them with :class:`~pvebackup.api.idmap.IdMapper`
            (accepts this list as it is) or :meth:`IdMapEntry.from_seed`.
            Files in ``directory`` are owned by host ids; a provider that stores
            ownership stores container ids by reversing this map.
        :param exclude_paths: glob patterns of files and directories to exclude,
            with rsync's meaning (``*``, ``**``, ``?``, ``/`` anchored, trailing
            ``/`` for directories only). See :mod:`pvebackup.api.excludes`.
        :param sources: paths inside ``directory`` to back up: ``"."`` for the
            root and one entry per separate mount point (``"./srv/data"``).
        :param bandwidth_limit: bytes per second, ``None`` for unlimited.
        :raises PveBackupError: the guest's backup fails (``backup_abort`` follows).
        """
        raise self._not_implemented("backup_directory")

    # restore ---------------------------------------------------------------------

    def restore_get_mechanism(
        self, volname: str, storeid: str
    ) -> tuple[RestoreMechanism, GuestType]:
        """Decide which mechanism is used to restore the backup.

        :param volname: volume name of the backup being restored.
        :param storeid: storage id of the backup storage.
        :returns: ``(mechanism, vmtype)``: ``qemu-img`` for ``qemu``; ``tar`` or
            ``directory`` for ``lxc``. The provider implements the matching
            ``restore_<mechanism>_init``/``_cleanup`` (and, for ``qemu``,
            ``restore_qemu_get_device_info``).
        :raises VolumeNotFoundError: no such backup.

        A mechanism or type the host does not know (e.g. ``vma``, ``openvz``) is
        ``UnsupportedError``; anything but a pair is ``PluginError``: the restore
        fails before anything is allocated.
        """
        raise self._not_implemented("restore_get_mechanism")

    def extract_guest_config(self, volname: str, storeid: str) -> str:
        """Return the raw contents of the backed-up guest configuration file.

        :param volname: volume name of the backup being restored.
        :param storeid: storage id of the backup storage.
        """
        raise self._not_implemented("extract_guest_config")

    def extract_firewall_config(self, volname: str, storeid: str) -> str | None:
        """Return the raw contents of the backed-up firewall configuration.

        :returns: the contents, or ``None`` if the backup has no firewall config.
        :raises PveBackupError: it exists but cannot be extracted.
        """
        raise self._not_implemented("extract_firewall_config")

    def restore_qemu_get_device_info(self, volname: str, storeid: str) -> DeviceInfo:
        """For VM backups, name the disks in the backup and their sizes.

        :returns: ``{devicename: {"size": bytes}}``. ``devicename`` is the name
            given to ``backup_nbd`` when the backup was made; ``size`` is the size
            of the image after restore, at least the size of the image that
            ``restore_qemu_img_init`` returns.
        """
        raise self._not_implemented("restore_qemu_get_device_info")

    def restore_qemu_img_init(self, volname: str, storeid: str, devicename: str) -> str:
        """For VM backups, set up the restore of one disk with ``qemu-img``.

        :param devicename: the disk to prepare, as given to ``backup_nbd``.
        :returns: a path or URI that ``qemu-img convert`` can read the whole
            disk from, e.g. a file or ``nbd+unix:///NAME?socket=PATH``. The host
            reads it as untrusted raw data (``-f raw``, never probed); a provider
            that hands over another format returns a ``json:`` pseudo-file name
            whose top-level ``driver`` names it (and whose options pin every
            file, backing files included, that qemu may open).
        """
        raise self._not_implemented("restore_qemu_img_init")

    def restore_qemu_img_cleanup(self, volname: str, storeid: str, devicename: str) -> None:
        """Clean up after restoring one disk. Called on success and on failure.

        Also after ``restore_qemu_img_init`` itself raised (it may have half
        prepared: a server started, a directory made), so it must cope with an
        init that never got far. Its failure after a failed init is only logged
        (the init's error is what the restore reports); after a successful init
        it fails the restore (e.g. to name the real cause of an I/O error).
        """
        raise self._not_implemented("restore_qemu_img_cleanup")

    def restore_tar_init(self, volname: str, storeid: str) -> str:
        """For container backups, set up a restore with ``tar``.

        :returns: path of a (possibly compressed) tar archive of the container's
            full filesystem, owned by container ids (numeric).
        """
        raise self._not_implemented("restore_tar_init")

    def restore_tar_cleanup(self, volname: str, storeid: str) -> None:
        """Clean up after a ``tar`` restore. Called on success and on failure, also
        after ``restore_tar_init`` raised (see ``restore_qemu_img_cleanup``)."""
        raise self._not_implemented("restore_tar_cleanup")

    def restore_directory_init(self, volname: str, storeid: str) -> str:
        """For container backups, set up a restore from a directory.

        :returns: path of a directory with the container's full filesystem,
            owned by container ids.
        """
        raise self._not_implemented("restore_directory_init")

    def restore_directory_cleanup(self, volname: str, storeid: str) -> None:
        """Clean up after a ``directory`` restore. Called on success and on failure,
        also after ``restore_directory_init`` raised (see ``restore_qemu_img_cleanup``)."""
        raise self._not_implemented("restore_directory_cleanup")

    # -- optional capabilities (not in the seed) ------------------------------------

    def restore_file_reader(self, volname: str, storeid: str) -> FsReader:
        """Optional: the files of backup ``volname``, for ``pvebackup ls``/``extract``.

        A provider that can list and read single files of a container backup
        without restoring it whole returns a :class:`~pvebackup.api.files.FsReader`
        (entries with container ids as owners; every read verified). The host
        writes what it reads with its safe extractor; the provider never writes
        outside its storage. The default refuses.

        :raises UnsupportedError: the provider (or this backup's format) cannot.
        """
        raise UnsupportedError(
            f"{self._shown_name()}: file-level access to {volname} is not supported"
        )
