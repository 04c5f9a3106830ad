"""pvebackup.store.backends."""
