"""pvebackup.cli."""
