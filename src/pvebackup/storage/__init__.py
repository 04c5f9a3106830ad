"""Storage layer: storage.cfg, plugin registry, API version."""
