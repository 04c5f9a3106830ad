"""pvebackup.host.qemu."""
