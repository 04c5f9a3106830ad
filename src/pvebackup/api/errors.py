"""Every error pvebackup raises on purpose, in one tree.

Each leaf carries a stable ``exit_code`` (what the CLI exits with) and a message
meant for a person. Foreign errors (OSError, libnbd, botocore, subprocess failures)
are mapped at the boundary where they occur: ``raise OurError(...) from exc``.
Not-found, integrity, permanent and transient failures are kept apart so that a
caller can decide whether retrying can help.

::

    PveBackupError                      exit 1   anything of ours
    ├── UsageError                      exit 2   bad command line or arguments
    ├── ConfigError                     exit 2   a malformed file; names file and line
    │   ├── StorageConfigError                   storage.cfg
    │   └── GuestConfigError                     qemu-server/<vmid>.conf, lxc/<vmid>.conf
    ├── NotFoundError                   exit 3   something named does not exist
    │   ├── StorageNotFoundError                 no storage with that id
    │   ├── StorageUnavailableError              storage disabled, path missing or not mounted
    │   ├── PluginNotFoundError                  no plugin for that storage type
    │   ├── GuestNotFoundError                   no guest with that vmid
    │   ├── VolumeNotFoundError                  no backup volume with that name
    │   └── ObjectNotFoundError                  a backend key is missing
    ├── PluginError                     exit 4   a storage plugin or provider misbehaves
    │   ├── PluginVersionError                   api version out of the accepted range
    │   ├── ProviderNotImplementedError          method not implemented by the provider
    │   └── UnsupportedError                     provider does not support this guest/mechanism
    │       └── UnsupportedFilesystemError       vm-files: no file system it can read on the disk
    ├── IntegrityError                  exit 5   stored data is not what was written
    │   ├── CorruptChunkError                    digest/tag mismatch, bad blob header
    │   ├── CorruptIndexError                    bad index, manifest or snapshot
    │   └── CorruptFilesystemError               vm-files: a guest file system cannot be read
    ├── CryptoError                     exit 6   keys
    │   ├── MissingKeyError                      encrypted store opened without a key
    │   ├── WrongKeyError                        key or passphrase does not fit
    │   └── KeyFileError                         unreadable or malformed key file
    │       └── UnprotectedKeyFileError          key/passphrase file readable by group or others
    ├── StateError                      exit 7   refused because of existing state
    │   ├── GuestExistsError                     restore onto an existing vmid without --force
    │   ├── GuestRunningError                    restore onto a running VM (qmrestore refuses too)
    │   ├── VolumeInUseError                     remove a volume another one depends on
    │   ├── VolumeProtectedError                 remove or prune a protected backup
    │   ├── SnapshotExistsError                  a snapshot with that name is already stored
    │   ├── LockedError                          someone else holds a lock
    │   └── BaseUnusableError                    bitmap mode reuse, but no usable base backup
    ├── UnsafeArchiveError              exit 8   hostile archive entry (absolute, .., escaping link)
    │   ├── UnsafeImageError                     stored image header reaches outside its chain
    │   └── UnsafeStorageError                   a symlink or unexpected file type inside a storage
    ├── ExternalToolError               exit 9   qemu-img, qemu-storage-daemon, nbdkit, tar failed
    │   ├── QmpError                             QMP command answered with an error
    │   └── NbdError                             libnbd call failed
    ├── BackendError                    exit 10  storage backend I/O
    │   ├── TransientBackendError                may succeed when retried
    │   └── PermanentBackendError                will not succeed when retried (denied, EIO)
    │       └── StorageFullError        exit 12  no space left (ENOSPC, EDQUOT)
    ├── GuestBackupError                exit 11  one or more guests of a job failed
    └── AbortedError                    exit 130 interrupted by SIGINT/SIGTERM

This module imports nothing of ours, so every layer, and every third-party
provider, can use it.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AbortedError",
    "BackendError",
    "BaseUnusableError",
    "ConfigError",
    "CorruptChunkError",
    "CorruptFilesystemError",
    "CorruptIndexError",
    "CryptoError",
    "ExternalToolError",
    "GuestBackupError",
    "GuestConfigError",
    "GuestExistsError",
    "GuestNotFoundError",
    "GuestRunningError",
    "IntegrityError",
    "KeyFileError",
    "LockedError",
    "MissingKeyError",
    "NbdError",
    "NotFoundError",
    "ObjectNotFoundError",
    "PermanentBackendError",
    "PluginError",
    "PluginNotFoundError",
    "PluginVersionError",
    "ProviderNotImplementedError",
    "PveBackupError",
    "QmpError",
    "SnapshotExistsError",
    "StateError",
    "StorageConfigError",
    "StorageFullError",
    "StorageNotFoundError",
    "StorageUnavailableError",
    "TransientBackendError",
    "UnprotectedKeyFileError",
    "UnsafeArchiveError",
    "UnsafeImageError",
    "UnsafeStorageError",
    "UnsupportedError",
    "UnsupportedFilesystemError",
    "UsageError",
    "VolumeInUseError",
    "VolumeNotFoundError",
    "VolumeProtectedError",
    "WrongKeyError",
    "exit_codes",
]


class PveBackupError(Exception):
    """Base of every error pvebackup raises on purpose.

    A class that sets its own ``exit_code`` sets ``summary`` too: one line for
    people saying what the code means; ``pvebackup --help`` lists them
    (:func:`exit_codes`), so the table there cannot fall behind this tree.
    """

    exit_code: int = 1
    summary: ClassVar[str] = "other error"


class UsageError(PveBackupError):
    """The command line or the arguments of a call are wrong."""

    exit_code = 2
    summary = "bad command line or arguments"


class ConfigError(PveBackupError):
    """A configuration file is malformed. The message names the file and the line."""

    exit_code = 2
    summary = "malformed configuration file (storage.cfg, a guest config)"

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(f"{where}{message}")
        self.path = path
        self.line = line
        self.reason = message


class StorageConfigError(ConfigError):
    """storage.cfg (or one storage's properties) is malformed."""


class GuestConfigError(ConfigError):
    """A VM or container configuration file is malformed."""


class NotFoundError(PveBackupError):
    """Something named by the caller does not exist."""

    exit_code = 3
    summary = (
        "something named does not exist or cannot be used now (storage missing, disabled "
        "or not mounted; guest; backup volume)"
    )


class StorageNotFoundError(NotFoundError):
    """No storage with that id in storage.cfg."""


class StorageUnavailableError(NotFoundError):
    """The storage is disabled (``disable``), or its path does not exist, or is not
    mounted although it must be.

    Nothing was created: an unmounted disk must never make a backup fill ``/``.
    """


class PluginNotFoundError(NotFoundError):
    """No storage plugin is registered for that storage type."""


class GuestNotFoundError(NotFoundError):
    """No guest configuration with that vmid."""


class VolumeNotFoundError(NotFoundError):
    """No backup volume with that name on the storage."""


class ObjectNotFoundError(NotFoundError):
    """A key is missing in a store backend."""


class PluginError(PveBackupError):
    """A storage plugin or a backup provider cannot be used as asked."""

    exit_code = 4
    summary = "storage plugin or backup provider problem (no provider, unsupported)"


class PluginVersionError(PluginError):
    """A plugin declares a storage API version outside the accepted range."""


class ProviderNotImplementedError(PluginError, NotImplementedError):
    """A provider method the host called is not implemented by that provider.

    The Python form of the seed's ``die "implement me in subclass\\n"``.
    """


class UnsupportedError(PluginError):
    """The provider does not support this guest type or mechanism."""


class UnsupportedFilesystemError(UnsupportedError):
    """``vm-files``: the chosen disk or partition holds no file system it can read."""


class IntegrityError(PveBackupError):
    """Stored data does not match what was written (checksum, tag, structure)."""

    exit_code = 5
    summary = "stored data failed an integrity check"


class CorruptChunkError(IntegrityError):
    """A chunk failed its digest or authentication check, or its header is bad."""


class CorruptIndexError(IntegrityError):
    """An index, manifest or snapshot is malformed or fails its checksum."""


class CorruptFilesystemError(IntegrityError):
    """``vm-files``: a guest file system in a backup is damaged (or crafted) beyond reading."""


class CryptoError(PveBackupError):
    """Key handling failed. Messages never contain key material."""

    exit_code = 6
    summary = "key problem (missing, wrong, unreadable key)"


class MissingKeyError(CryptoError):
    """The store is encrypted and no key was given."""


class WrongKeyError(CryptoError):
    """The key (or the passphrase protecting it) does not fit."""


class KeyFileError(CryptoError):
    """The key file cannot be read or is malformed."""


class UnprotectedKeyFileError(KeyFileError):
    """A key or passphrase file is accessible by group or others (OpenSSH's rule).

    The message names the file and says how to fix it (``chmod 600 FILE``).
    """


class StateError(PveBackupError):
    """Refused because of existing state; nothing was changed."""

    exit_code = 7
    summary = (
        "refused because of existing state (guest exists or runs, volume in use or "
        "protected, locked)"
    )


class GuestExistsError(StateError):
    """A guest with the target vmid exists and --force was not given."""


class GuestRunningError(StateError):
    """The target vmid is a running VM: a restore never replaces a running guest's disks."""


class VolumeInUseError(StateError):
    """The volume is the base of another volume and cannot be removed."""


class VolumeProtectedError(StateError):
    """The backup is protected (``pvebackup protect``): never removed or pruned."""


class SnapshotExistsError(StateError):
    """A store snapshot with that name exists already; it was left alone."""


class LockedError(StateError):
    """A lock is held by someone else."""


class BaseUnusableError(StateError):
    """The host exported only the dirty parts (bitmap mode ``reuse``), but the
    provider has no usable base to apply them to (gone, damaged, other disk size).

    Nothing was stored; the provider records that its base is gone, so the next
    backup of the guest gets no bitmap id and is a full one. Never store a
    partial image instead: that is the silent gap this error exists to prevent.
    """


class UnsafeArchiveError(PveBackupError):
    """An archive entry would write outside the target (absolute path, '..', link)."""

    exit_code = 8
    summary = "hostile archive entry or storage content refused (e.g. a symlink in the storage)"


class UnsafeImageError(UnsafeArchiveError):
    """A stored disk image would make qemu read outside the backup storage.

    Its header names a backing file other than the provider's own verified chain,
    an external data file, a ``json:`` or protocol file name, or the image is not
    the format it is stored as. Nothing was read through it.
    """


class UnsafeStorageError(UnsafeArchiveError):
    """Storage content is not what we expect where we expect it; nothing was followed.

    Raised (by :mod:`pvebackup.kit.safefs`) for a symlink, a device, fifo or socket
    met below a storage's configured path: whoever can write the storage could
    otherwise make a read, write or delete reach outside it. A subclass of
    :class:`UnsafeArchiveError` because it is the same refusal (hostile storage
    content, exit 8); catch this one to tell the two apart.
    """


class ExternalToolError(PveBackupError):
    """An external program (qemu-img, qemu-storage-daemon, nbdkit, tar) failed.

    ``returncode`` and ``stderr`` are set when the program ran and exited non-zero
    (``None`` and ``""`` when it could not be started, timed out or is no program),
    so a caller can tell "the tool refused this input" from "no tool".
    """

    exit_code = 9
    summary = "external tool failed (qemu-img, qemu-storage-daemon, tar, ...)"

    def __init__(self, message: str, *, returncode: int | None = None, stderr: str = ""):
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


class QmpError(ExternalToolError):
    """A QMP command was answered with an error."""


class NbdError(ExternalToolError):
    """A libnbd call failed."""


class BackendError(PveBackupError):
    """A store backend could not read or write."""

    exit_code = 10
    summary = "storage backend I/O failed"


class TransientBackendError(BackendError):
    """A backend failure that may go away when retried (timeout, throttling)."""


class PermanentBackendError(BackendError):
    """A backend failure that retrying will not fix (permission denied, I/O error)."""


class StorageFullError(PermanentBackendError):
    """No space left on the storage (ENOSPC, EDQUOT): free space or prune, then retry.

    Its own exit code, so that a script can tell "full" from "broken".
    """

    exit_code = 12
    summary = "no space left on the storage (prune or free space, then retry)"


class GuestBackupError(PveBackupError):
    """One or more guests of a backup job failed; the others were backed up."""

    exit_code = 11
    summary = "backup job finished, but one or more guests failed"


class AbortedError(PveBackupError):
    """The job was interrupted (SIGINT, SIGTERM)."""

    exit_code = 130
    summary = "interrupted (SIGINT/SIGTERM)"


def exit_codes() -> list[tuple[int, str]]:
    """Every exit code of the tree with what it means, sorted by code.

    Built from the classes of this module that set their own ``exit_code``: their
    ``summary`` lines, joined with ``"; "`` where several share a code (usage and
    configuration errors both exit 2).
    """
    meanings: dict[int, list[str]] = {}
    for cls in list(globals().values()):  # in the order of the tree above
        if isinstance(cls, type) and issubclass(cls, PveBackupError) and (
            "exit_code" in vars(cls)
        ):
            meanings.setdefault(cls.exit_code, []).append(cls.summary)
    return [(code, "; ".join(meanings[code])) for code in sorted(meanings)]
