"""Tree comparison for tests: see :func:`pvebackup.host.lxc.compare.compare_trees`."""

from pvebackup.host.lxc.compare import compare_trees

__all__ = ["compare_trees"]
