"""pvebackup.host."""
