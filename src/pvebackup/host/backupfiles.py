"""``pvebackup ls``/``extract``: single files of a container backup, through the provider.

The provider gives a :class:`~pvebackup.api.files.FsReader`
(:meth:`~pvebackup.api.provider.BackupProvider.restore_file_reader`, optional:
the default refuses with :class:`UnsupportedError`); the host lists it and
writes what it reads with ``vm-files``' safe extractor
(:mod:`pvebackup.host.vmfiles.extract`): below a target held by fd, nothing
followed, unsafe names skipped, setuid/setgid dropped, no device nodes.
"""

from __future__ import annotations

from pathlib import Path

from pvebackup.api.errors import PluginError, UnsupportedError
from pvebackup.api.files import FsReader
from pvebackup.host.guests import NodeRoot
from pvebackup.host.tasklog import LogRouter
from pvebackup.host.vmfiles.extract import ExtractResult
from pvebackup.host.vmfiles.session import FileInfo, extract_entries, list_entries
from pvebackup.storage import new_backup_provider, parse_volume_id, read_storage_config

__all__ = ["extract_backup_files", "list_backup_files", "open_backup_files"]

_METHODS = ("root", "list_dir", "readlink", "read")


def open_backup_files(root: NodeRoot, volid: str, log: LogRouter) -> FsReader:
    """The file tree of backup ``volid``.

    :raises UnsupportedError: no provider, or it cannot give single files.
    """
    cfg = read_storage_config(root.storage_cfg)
    storeid, volname = parse_volume_id(volid)
    provider = new_backup_provider(cfg, storeid, log)
    if provider is None:
        raise UnsupportedError(f"storage '{storeid}' has no backup provider")
    reader = provider.restore_file_reader(volname, storeid)
    if not all(callable(getattr(reader, m, None)) for m in _METHODS):
        raise PluginError(f"restore_file_reader returned {reader!r:.80}")
    for path in getattr(reader, "unreachable", [])[:20]:
        log.warn(f"{volid}: catalog entry {path!r:.200} is in no directory; not shown")
    return reader


def list_backup_files(root: NodeRoot, volid: str, path: str, log: LogRouter) -> list[FileInfo]:
    return list_entries(open_backup_files(root, volid, log), path, volid)


def extract_backup_files(
    root: NodeRoot,
    volid: str,
    paths: list[str],
    target: Path,
    *,
    keep_owner: bool,
    log: LogRouter,
) -> ExtractResult:
    """Extract ``paths`` of ``volid`` into ``target`` (see :func:`extract_entries`).

    Owners (container ids, numeric) are applied with ``keep_owner`` when run as root.
    """
    reader = open_backup_files(root, volid, log)
    return extract_entries(reader, paths, target, keep_owner=keep_owner, log=log, where=volid)
