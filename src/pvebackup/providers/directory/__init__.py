"""The reference provider ``backup-dir``: each backup is a directory of plain files.

The example every provider author reads first (see ``docs/provider-api.md``,
"Worked example"). Modules, in reading order:

- :mod:`.plugin`: the storage type ``backup-dir`` and its properties; lists and
  removes backups;
- :mod:`.provider`: :class:`BackupDirProvider`, every method of the API;
- :mod:`.volumes`: volume names, the on-disk layout, ``index.json``;
- :mod:`.vm`: one VM disk from an NBD export into a qcow2 (incremental chains);
- :mod:`.walk`: walking a container's sources with excludes and mount points;
- :mod:`.archive`: the walk as a zstd-compressed PAX tar;
- :mod:`.tree`: the walk as a plain directory tree.

The NBD source, the bandwidth limit and the progress lines are the kit's
(:mod:`pvebackup.kit.nbdsource`, :mod:`pvebackup.kit.pacing`), shared with every provider.
"""
