"""``python -m bench``: run the benchmark and print the table (see ``bench/__init__``)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from bench.inputs import GiB, MiB
from bench.machine import machine_info
from bench.measure import drop_caches, keep_caches_warm
from bench.ours import OURS_S3, precompile
from bench.peers import tool_versions
from bench.report import evaluate, format_bytes, format_report, format_sweep, write_json
from bench.s3 import BenchRGW
from bench.scenarios import (
    Config,
    Inputs,
    Results,
    prepare_inputs,
    run_chunk_index,
    run_codecs,
    run_dense,
    run_gc,
    run_s3,
    run_sparse,
    run_sweep,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--runs", type=int, help="runs per scenario; the table shows medians "
                   "(default 3, with --quick 1)")
    p.add_argument("--quick", action="store_true",
                   help="256 MiB of data (16 GiB sparse image) and 40 changed blocks")
    p.add_argument("--chunk-size", help="chunk-size property of the backup-store "
                   "(default: the store's own default)")
    p.add_argument("--chunk-sizes", help="comma-separated sizes, e.g. 64K,256K,1M,4M: "
                   "only the chunk-size sweep (full + incremental per size)")
    p.add_argument("--storage-type", default="backup-store",
                   help="storage type measured as ours (backup-dir: the reference provider)")
    p.add_argument("--warm", action="store_true",
                   help="do not drop the page cache before timed steps")
    p.add_argument("--no-peers", action="store_true", help="measure only ours")
    p.add_argument("--no-s3", action="store_true",
                   help="skip the S3 lines (a Ceph RGW started on loopback)")
    p.add_argument("--s3-only", action="store_true",
                   help="only ours local and ours on S3: full, incremental, restore")
    p.add_argument("--container", action="store_true",
                   help="only the container benchmark (a generated file tree)")
    p.add_argument("--ct-files", type=int, default=5000,
                   help="files of the container benchmark's tree (default 5000)")
    p.add_argument("--ct-rss", type=int, metavar="N",
                   help="container: peak RSS of our backup of N small files (first and "
                   "unchanged re-run; the issue's goal: <= 200 MiB for 1000000)")
    p.add_argument("--seed", type=int, default=5, help="seed of the generated data")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="work and result directory (default bench/out)")
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def _config(args: argparse.Namespace) -> Config:
    if args.s3_only:
        args.no_peers = True
    if args.quick:
        return Config(out=args.out, runs=args.runs, seed=args.seed, data_size=256 * MiB,
                      sparse_size=16 * GiB, writes=40, chunk_size=args.chunk_size,
                      storage_type=args.storage_type, with_peers=not args.no_peers)
    return Config(out=args.out, runs=args.runs, seed=args.seed, chunk_size=args.chunk_size,
                  storage_type=args.storage_type, with_peers=not args.no_peers)


def _progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _run_s3(cfg: Config, inputs: Inputs, results: Results) -> None:
    """The S3 lines: one RGW on loopback for all runs, stopped by PID at the end."""
    reason = BenchRGW.unavailable()
    rgw = BenchRGW(cfg.out / "rgw")
    if reason is None:
        _progress("starting Ceph RGW on loopback")
        try:
            shutil.rmtree(rgw.root, ignore_errors=True)
            rgw.start()
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            reason = f"Ceph RGW did not start: {exc}"
    try:
        for n in range(1, cfg.runs + 1):
            if reason is not None:
                for scenario in ("full", "incremental", "restore"):
                    results.get(scenario, OURS_S3).error = reason
                break
            _progress(f"run {n}/{cfg.runs}: {dense_name(cfg)} image, ours on S3")
            run_s3(cfg, inputs, results, n, rgw)
    finally:
        rgw.stop()


def dense_name(cfg: Config) -> str:
    return format_bytes(cfg.data_size).replace(".0 ", " ")


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    cfg = _config(args)
    cfg.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(cfg.out)
    if args.warm:
        keep_caches_warm()
    cold = drop_caches()
    compiled = precompile()
    if args.ct_rss:
        from bench.container import run_container_rss

        run_container_rss(cfg.out, args.ct_rss)
        return 0
    if args.container:
        from bench.container import run_container

        run_container(cfg.out, args.ct_files, with_peers=not args.no_peers)
        return 0

    inputs = prepare_inputs(cfg)
    results = Results()
    dense = format_bytes(cfg.data_size).replace(".0 ", " ")
    sparse = format_bytes(cfg.sparse_size).replace(".0 ", " ")
    info = {
        "dense": dense,
        "sparse": sparse,
        "change": f"{cfg.writes} x 64 KiB",
        "summary": (f"{dense} mixed image, {cfg.writes} x 64 KiB scattered change, "
                    f"{cfg.runs} run(s), medians, "
                    + ("page cache dropped before each timed step" if cold
                       else "WARM page cache (caches not dropped)")),
        "machine": (f"{machine['nproc']} x {machine['cpu']}, "
                    f"{format_bytes(int(str(machine['memory_bytes'])))} RAM, "
                    f"disk {machine['disk']}"),
    }
    extra: dict[str, object] = {
        "machine": machine,
        "config": {**asdict(cfg), "out": str(cfg.out), "cold_cache": cold,
                   "byte_compiled": compiled},
        "tools": tool_versions(),
    }

    if args.chunk_sizes:
        sizes = [s.strip() for s in args.chunk_sizes.split(",") if s.strip()]
        reason = results.ours_error
        for size in sizes:
            for n in range(1, cfg.runs + 1):
                _progress(f"chunk size {size}, run {n}/{cfg.runs}")
                results.ours_error = reason  # one failing size must not hide the others
                run_sweep(cfg, inputs, results, n, size)
        measurements = list(results)
        print(f"pvebackup chunk-size sweep: {info['summary']}\nmachine: {info['machine']}\n")
        print(format_sweep(measurements, sizes))
        write_json(cfg.out / "sweep.json", measurements, [], extra)
        return 0

    for n in range(1, cfg.runs + 1):
        _progress(f"run {n}/{cfg.runs}: {dense} image, all tools")
        run_dense(cfg, inputs, results, n)
    if not args.no_s3:
        _run_s3(cfg, inputs, results)
    if not args.s3_only:
        for n in range(1, cfg.runs + 1):
            _progress(f"run {n}/{cfg.runs}: {sparse} sparse image, ours")
            run_sparse(cfg, inputs, results, n)
        _progress("GC after removing half the snapshots")
        run_gc(cfg, results)
        chunks = 1_000_000 if args.quick else 10_000_000
        _progress(f"chunk index cache, {chunks:,} chunks")
        run_chunk_index(cfg, results, chunks)
        _progress("digest and compression")
        run_codecs(cfg, results)
    measurements = list(results)
    goals = evaluate(measurements)
    print(format_report(measurements, goals, info, results.ours_error))
    out = cfg.out / "results.json"
    write_json(out, measurements, goals, extra)
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
