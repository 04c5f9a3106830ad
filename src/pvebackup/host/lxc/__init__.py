"""pvebackup.host.lxc."""
