"""The Python side of the Proxmox VE bridge: the merged backup provider API
(Proxmox VE 8.4+) served to the Perl plugin over a pipe, on seed-API providers.

- :mod:`~pvebackup.bridge.server`: the request loop (``python3 -m pvebackup.bridge``),
- :mod:`~pvebackup.bridge.adapter`: each merged backup method on the seed provider,
- :mod:`~pvebackup.bridge.restore`: the restore methods (a mixin of the adapter),
- :mod:`~pvebackup.bridge.rawexport`: restore sources handed over as raw NBD,
- :mod:`~pvebackup.bridge.attach`: the container backup's user-namespace step,
- :mod:`~pvebackup.bridge.framing`: JSON lines, bounded.

A layer beside ``host``: it imports ``api``, ``kit`` and ``storage`` only and
reaches providers through the storage plugin's ``new_backup_provider``, as the
host does. docs/bridge-protocol.md is the protocol and the mapping table.
"""
