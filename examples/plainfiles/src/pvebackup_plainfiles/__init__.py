"""pvebackup-plainfiles: an example backup provider storing plain files.

Storage type ``plain-files``; see ``plugin.py`` (registration, properties, listing)
and ``provider.py`` (every provider method, in the host's call order).
"""
