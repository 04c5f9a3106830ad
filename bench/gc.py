"""``python -m bench.gc [MiB] [SNAPSHOTS]``: GC after removing half the snapshots.

Builds a store (local backend, default 16 MiB packs, 256 KiB chunks) holding
SNAPSHOTS backups of a MiB-sized mixed image (half random, a quarter text, a
quarter zero), each changing 1% of the chunks of the one before; removes the
older half of the snapshots and runs ``pvebackup``'s GC twice (condemn, then delete), each in
a child process, reporting its time, peak RSS and the bytes freed.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pvebackup.api.types import GuestType
from pvebackup.store.backends.local import LocalBackend
from pvebackup.store.datastore import Datastore
from pvebackup.store.gc import collect_garbage
from pvebackup.store.snapshot import SnapshotId

CS = 256 * 1024


def _chunk(rng: random.Random, i: int, version: int) -> bytes:
    kind = i % 4
    if kind < 2:
        return random.Random(i * 1_000_003 + version).randbytes(CS)
    if kind == 2:
        return (f"{i} {version} guest log line, fairly compressible\n".encode() * CS)[:CS]
    return bytes(CS)


def build(root: Path, mib: int, snapshots: int) -> list[SnapshotId]:
    Datastore.create(LocalBackend(root))
    n = mib * 1024 * 1024 // CS
    versions = [0] * n
    rng = random.Random(1)
    sids = []
    for s in range(snapshots):
        for i in rng.sample(range(n), max(1, n // 100)):
            versions[i] = s + 1
        store = Datastore.open(LocalBackend(root))
        sid = SnapshotId(GuestType.QEMU, 100, 1_800_000_000 + s)
        with store.new_snapshot(sid) as w, w.index_writer("drive-scsi0", n * CS) as iw:
            for i in range(n):
                iw.set(i, store.insert_chunk(_chunk(rng, i, versions[i])).digest)
        store.close()
        sids.append(sid)
    return sids


def _du(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def child(root: str) -> None:
    t = time.perf_counter()
    report = collect_garbage(Datastore.open(LocalBackend(root)), margin=0.0)
    print(json.dumps({
        "seconds": time.perf_counter() - t,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "chunks_removed": report.chunks_removed,
        "chunks_condemned": report.chunks_condemned,
        "bytes_removed": report.bytes_removed,
        "packs_written": report.packs_written,
    }))  # fmt: skip


def run(mib: int = 256, snapshots: int = 10, tmp_dir: str | None = None) -> dict[str, float]:
    """Build, remove the older half, GC twice; totals of both GC runs (each a child)."""
    with tempfile.TemporaryDirectory(dir=tmp_dir or os.environ.get("BENCH_TMP")) as tmp:
        root = Path(tmp) / "store"
        t = time.perf_counter()
        sids = build(root, mib, snapshots)
        total: dict[str, float] = {
            "build_s": time.perf_counter() - t,
            "store_before_mib": _du(root) / 2**20,
            "seconds": 0.0,
            "peak_rss_mib": 0.0,
            "chunks_condemned": 0.0,
            "chunks_removed": 0.0,
            "bytes_removed": 0.0,
            "packs_written": 0.0,
        }
        store = Datastore.open(LocalBackend(root))
        for sid in sids[: len(sids) // 2]:  # the older half, as retention would
            store.remove_snapshot(sid)
        for phase in ("condemn", "delete"):
            out = subprocess.run(
                [sys.executable, "-m", "bench.gc", "--child", str(root)],
                check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            r = json.loads(out)
            total[f"{phase}_s"] = r["seconds"]
            total["seconds"] += r["seconds"]
            total["peak_rss_mib"] = max(total["peak_rss_mib"], r["peak_rss_mib"])
            for k in ("chunks_removed", "bytes_removed", "packs_written"):
                total[k] += r[k]
            total["chunks_condemned"] = max(total["chunks_condemned"], r["chunks_condemned"])
        total["store_after_mib"] = _du(root) / 2**20
        total["freed_bytes"] = (total["store_before_mib"] - total["store_after_mib"]) * 2**20
    return total


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        child(argv[1])
        return 0
    mib = int(argv[0]) if argv else 256
    snapshots = int(argv[1]) if len(argv) > 1 else 10
    r = run(mib, snapshots)
    print(f"built {snapshots} snapshots of {mib} MiB in {r['build_s']:.1f} s, "
          f"store {r['store_before_mib']:.1f} MiB")  # fmt: skip
    print(f"gc: condemn {r['condemn_s']:.2f} s + delete {r['delete_s']:.2f} s, "
          f"peak RSS {r['peak_rss_mib']:.0f} MiB, {r['chunks_removed']:.0f} chunks removed, "
          f"{r['packs_written']:.0f} packs written, store {r['store_before_mib']:.1f} -> "
          f"{r['store_after_mib']:.1f} MiB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
