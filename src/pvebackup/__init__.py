"""pvebackup: the Proxmox VE backup provider system in Python.

Layers, imports pointing downwards only (see docs/design.md)::

    cli -> host -> providers -> store -> storage -> api
"""

__version__ = "0.1.0.dev0"
