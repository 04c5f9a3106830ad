"""Shared machinery of providers, host and storage (the layer just above ``api``).

One place for what every provider and the host need alike: symlink-safe access to
storage content, supervised child processes, atomic writes, the NBD source a
backup reads (and its fake for tests), pacing and progress.
Imports only :mod:`pvebackup.api` (``tests/test_layers.py`` checks it); a
third-party provider may use it, but needs only ``pvebackup.api``.
"""
