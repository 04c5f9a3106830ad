"""`make bench`: pvebackup against borg, restic and zstd on the same generated disks.

Run from the repository root: ``python -m bench [--runs N] [--quick]
[--chunk-sizes 64K,256K,1M,4M]``. Results go to stdout (a table of times, sizes
and ratios with PASS/MISS per goal) and to ``bench/out/results.json``.
See ``docs/benchmarks.md`` for what each line means.

Modules: ``inputs`` (deterministic images and the scattered change), ``measure``
(timing, peak RSS, cache dropping, disk usage), ``peers`` (borg, restic, zstd,
qemu-img), ``ours`` (a node root driving ``pvebackup``), ``scenarios`` (one function
per measured scenario), ``report`` (goals, table, JSON).
"""
