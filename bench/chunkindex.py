"""``python -m bench.chunkindex [N]``: the chunk index cache at N chunks (default 10M).

Builds a synthetic ``SortedChunkIndex`` of N random digests (bucket by bucket, so
the build itself stays small), then measures lookups (half hits, half misses) and
the process's peak RSS. Goal (issue 10): >= 200k lookups/s, RSS <= 200 MiB.
"""

from __future__ import annotations

import json
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from pvebackup.store.chunkcache import SortedChunkIndex, write_sorted_index


def build(root: Path, n: int, seed: int = 1) -> list[bytes]:
    """Write an index of ``n`` random chunks in 100 packs; return a sample of digests."""
    rng = random.Random(seed)
    sample: list[bytes] = []
    per = n / 65536

    def records() -> Iterator[tuple[bytes, int, int, int, int]]:
        made = 0
        for b in range(65536):
            k = int((b + 1) * per) - made
            made += k
            prefix = b.to_bytes(2, "big")
            digests = sorted({prefix + rng.randbytes(30) for _ in range(k)})
            if digests and len(sample) < 100_000 and b % 3 == 0:
                sample.append(digests[0])
            for i, d in enumerate(digests):
                yield d, i % 100, 16 + i * 1000, 1000, 65536

    root.mkdir(parents=True, exist_ok=True)
    (root / "packs").write_bytes(b"".join(bytes([i]) * 32 for i in range(100)))
    write_sorted_index(root / "chunks.idx", records(), n)
    return sample


def measure(root: Path, sample: list[bytes], lookups: int = 400_000) -> dict[str, float]:
    cache = SortedChunkIndex(root)
    rng = random.Random(2)
    keys = [rng.choice(sample) if i % 2 else rng.randbytes(32) for i in range(lookups)]
    t = time.perf_counter()
    hits = sum(cache.lookup(k) is not None for k in keys)
    elapsed = time.perf_counter() - t
    assert hits >= lookups // 2
    return {
        "chunks": float(len(cache)),
        "lookups_per_s": lookups / elapsed,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "file_mib": (root / "chunks.idx").stat().st_size / 2**20,
    }


def main(argv: list[str]) -> int:
    as_json = argv[:1] == ["--json"]
    argv = argv[1:] if as_json else argv
    n = int(argv[0]) if argv else 10_000_000
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        t = time.perf_counter()
        sample = build(Path(tmp) / "cache", n)
        built = time.perf_counter() - t
        result = measure(Path(tmp) / "cache", sample)
    result["build_s"] = built
    if as_json:  # for ``python -m bench``, which runs us as a child (our own RSS)
        print(json.dumps(result))
        return 0
    for k, v in result.items():
        print(f"{k:>15}: {v:,.1f}")
    ok = result["lookups_per_s"] >= 200_000 and result["peak_rss_mib"] <= 200
    print("PASS" if ok else "MISS", "(goal: >= 200k lookups/s, peak RSS <= 200 MiB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
