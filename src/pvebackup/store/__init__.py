"""pvebackup.store."""
