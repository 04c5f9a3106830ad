"""VM disks for backups: unchanging NBD exports with real QEMU.

- :mod:`.export`: :class:`BackupExport`, what the job runner uses per VM backup;
- :mod:`.bitmaps`: bitmap names and the none/new/reuse decision;
- :mod:`.daemon`: one ``qemu-storage-daemon`` process, started and stopped by PID;
- :mod:`.qmp`: a small synchronous QMP client;
(``qemu-img`` runs through :mod:`pvebackup.kit.qemuimg`).
"""

from .export import BackupExport, DiskSpec, ExportedDisk

__all__ = ["BackupExport", "DiskSpec", "ExportedDisk"]
