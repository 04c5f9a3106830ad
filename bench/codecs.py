"""``python -m bench.codecs [MiB]``: digest and compression choices on the bench's data.

The data is the benchmark image's own regions (``bench.inputs``: 4 MiB alternately
random and text-like), cut into the store's 256 KiB chunks, in memory, one thread.
Digests: SHA-256 and HMAC-SHA-256 (today's ids ``sha256`` / ``hmac-sha256``), and
BLAKE3 plain and keyed when the PyPI package ``blake3`` can be imported (it is not a
dependency: install it to measure). Compression: zstd at levels -5, -1, 1 and 3,
and the "cheap incompressibility test": compress only the first 16 KiB at level 1
and store the chunk uncompressed when that does not shrink (skips the whole-chunk
attempt on random data). Prints MiB/s (of plaintext) and the stored share.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import time
from collections.abc import Callable

import zstandard

from bench.inputs import region_bytes

CS = 256 * 1024
PROBE = 16 * 1024
_Fn = Callable[[bytes], object]


def chunks(mib: int, seed: int = 5) -> list[bytes]:
    out: list[bytes] = []
    for i in range(max(1, mib // 4)):
        region = region_bytes(seed, i)
        out += [region[o : o + CS] for o in range(0, len(region), CS)]
    return out


def _rate(fn: _Fn, data: list[bytes], rounds: int = 7) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for c in data:
            fn(c)
        best = min(best, time.perf_counter() - t)
    return sum(map(len, data)) / best / 2**20


def digests(data: list[bytes]) -> dict[str, float]:
    key = bytes(range(32))
    out = {
        "sha256": _rate(lambda c: hashlib.sha256(c).digest(), data),
        "hmac-sha256": _rate(lambda c: hmac.digest(key, c, "sha256"), data),
    }
    try:
        import blake3  # type: ignore[import-not-found]
    except ImportError:
        return out
    out["blake3"] = _rate(lambda c: blake3.blake3(c).digest(), data)
    out["blake3-keyed"] = _rate(lambda c: blake3.blake3(c, key=key).digest(), data)
    return out


def compression(data: list[bytes]) -> dict[str, dict[str, float]]:
    total = sum(map(len, data))
    out: dict[str, dict[str, float]] = {}
    for level in (-5, -1, 1, 3):
        cctx = zstandard.ZstdCompressor(level=level)

        def store(c: bytes, cctx: zstandard.ZstdCompressor = cctx) -> int:
            z = cctx.compress(c)
            return len(z) if len(z) < len(c) else len(c)

        stored = sum(store(c) for c in data)
        out[f"zstd {level}"] = {"mib_s": _rate(store, data), "stored": stored / total}
    probe = zstandard.ZstdCompressor(level=1)
    cctx1 = zstandard.ZstdCompressor(level=1)

    def probed(c: bytes) -> int:
        if len(probe.compress(c[:PROBE])) >= PROBE:
            return len(c)  # the sample did not shrink: store as is
        z = cctx1.compress(c)
        return len(z) if len(z) < len(c) else len(c)

    out["zstd 1 + 16 KiB probe"] = {
        "mib_s": _rate(probed, data),
        "stored": sum(probed(c) for c in data) / total,
    }
    return out


def main(argv: list[str]) -> int:
    as_json = argv[:1] == ["--json"]
    argv = argv[1:] if as_json else argv
    mib = int(argv[0]) if argv else 64
    data = chunks(mib)
    result = {"mib": mib, "digests_mib_s": digests(data), "compression": compression(data)}
    if as_json:
        print(json.dumps(result))
        return 0
    print(f"{mib} MiB of the bench's data, {CS >> 10} KiB chunks, one thread, best of 7")
    for name, rate in result["digests_mib_s"].items():  # type: ignore[union-attr]
        print(f"  digest {name:<22} {rate:8.0f} MiB/s")
    for name, r in result["compression"].items():  # type: ignore[union-attr]
        print(f"  {name:<29} {r['mib_s']:8.0f} MiB/s  stored {100 * r['stored']:5.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
