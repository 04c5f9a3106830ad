"""File-level access to VM backups without mounting guest file systems in the host kernel.

See :mod:`.session` for the flow and docs/design.md ("File-level restore from VM
backups") for why nothing is mounted.
"""

from pvebackup.host.vmfiles.extract import ExtractResult
from pvebackup.host.vmfiles.session import (
    FileInfo,
    GuestFilesystem,
    extract_files,
    list_files,
    open_guest_filesystem,
)

__all__ = [
    "ExtractResult",
    "FileInfo",
    "GuestFilesystem",
    "extract_files",
    "list_files",
    "open_guest_filesystem",
]
