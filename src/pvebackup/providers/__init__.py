"""pvebackup.providers."""
