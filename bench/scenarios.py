"""The measured scenarios, one function each, and the runs that chain them.

A dense run (``run_dense``) builds a fresh node and repositories, then measures in
this order, every tool on the same image file: full backup, (ours only) a re-run
with nothing changed, the scattered change, the incremental re-run (with store
growth), and restore. A sparse run
(``run_sparse``) does full and incremental backups of the 64 GiB sparse image
(ours only: peak RSS and incremental cost). ``run_sweep`` repeats the dense
full+incremental for each chunk size. Work directories are removed after each run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import gc as gc_bench
from bench.inputs import (
    GiB,
    Layout,
    Write,
    apply_change,
    change_writes,
    make_image,
    write_raw,
)
from bench.measure import Measurement, Timed, ToolFailed, disk_usage
from bench.ours import OURS, OurNode, unavailable_reason
from bench.peers import local_convert, peers
from bench.report import CHUNK_INDEX, CODECS, GC, GC_PROCESS
from bench.s3 import OURS_S3, BenchRGW, S3Node

__all__ = [
    "Config",
    "Inputs",
    "Results",
    "prepare_inputs",
    "run_chunk_index",
    "run_codecs",
    "run_dense",
    "run_gc",
    "run_s3",
    "run_sparse",
    "run_sweep",
]

OURS_CLI_RESTORE = "ours (pvebackup restore)"
LOCAL_CONVERT = "local convert"
SKIPPED = "skipped: ours not available"


@dataclass(frozen=True, slots=True)
class Config:
    """What to run: sizes, runs, seed, where to work."""

    out: Path
    runs: int = 3
    seed: int = 5
    data_size: int = GiB
    sparse_size: int = 64 * GiB
    writes: int = 160
    chunk_size: str | None = None  # None: the store's default
    storage_type: str = "backup-store"
    with_peers: bool = True

    @property
    def work(self) -> Path:
        return self.out / "work"


@dataclass(frozen=True, slots=True)
class Inputs:
    """Generated images (cached in ``out/inputs``) and the change applied to them."""

    dense: Layout
    sparse: Layout
    dense_raw: Path
    dense_qcow2: Path
    sparse_qcow2: Path
    writes: list[Write]


class Results:
    """Measurements keyed by (scenario, tool), in the order they were first made."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, str], Measurement] = {}
        self.ours_error: str | None = unavailable_reason()

    def get(self, scenario: str, tool: str) -> Measurement:
        key = (scenario, tool)
        if key not in self._items:
            self._items[key] = Measurement(scenario, tool)
        return self._items[key]

    def find(self, scenario: str, tool: str) -> Measurement | None:
        return self._items.get((scenario, tool))

    def __iter__(self) -> Iterator[Measurement]:
        return iter(self._items.values())


@dataclass(slots=True)
class _Run:
    """State of one run: its node, its image, the peers still working."""

    cfg: Config
    inputs: Inputs
    results: Results
    work: Path
    node: OurNode
    image: Path
    failed_peers: set[str] = field(default_factory=set)

    def ours(self, scenario: str) -> Measurement | None:
        """The measurement to add to, or None (error recorded) when ours is out."""
        m = self.results.get(scenario, OURS)
        if self.results.ours_error:
            m.error = m.error or SKIPPED
            return None
        return m

    def ours_failed(self, m: Measurement, exc: Exception) -> None:
        m.error = str(exc)
        self.results.ours_error = f"{m.scenario}: {exc}"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def prepare_inputs(cfg: Config) -> Inputs:
    """Generate (or reuse from an earlier run with the same parameters) the images."""
    dense = Layout(cfg.data_size, cfg.data_size)
    sparse = Layout(cfg.data_size, cfg.sparse_size)
    base = cfg.out / "inputs" / f"seed{cfg.seed}-{cfg.data_size >> 20}M"
    dense_raw, dense_qcow2 = base / "dense.raw", base / "dense.qcow2"
    sparse_qcow2 = base / f"sparse-{cfg.sparse_size >> 30}G.qcow2"
    done = base / ".done"
    if not done.exists() or done.read_text() != sparse_qcow2.name:
        _fresh(base)
        print(f"generating inputs in {base} ...", flush=True)
        write_raw(dense_raw, dense, cfg.seed)
        make_image(dense_raw, dense_qcow2)
        sparse_raw = base / "sparse.raw"
        write_raw(sparse_raw, sparse, cfg.seed)
        make_image(sparse_raw, sparse_qcow2)
        sparse_raw.unlink()
        done.write_text(sparse_qcow2.name)
    return Inputs(dense, sparse, dense_raw, dense_qcow2, sparse_qcow2,
                  change_writes(dense, cfg.seed, cfg.writes))


def _same_image(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)]).returncode == 0


# scenarios -----------------------------------------------------------------------


def scenario_full(run: _Run, scenario: str = "full") -> None:
    """Full backup: ours (a new bitmap is made) and every peer into a fresh repo."""
    m = run.ours(scenario)
    if m is not None:
        try:
            m.add(run.node.backup(), run.node.store_usage())
            # Objects on S3 are requests: count what the full backup wrote per GiB of
            # image data (packs, index objects, indexes, manifest, sessions, config).
            objects = sum(1 for f in run.node.store.rglob("*") if f.is_file())
            m.values["objects_per_gib"] = objects / (run.cfg.data_size / GiB)
        except ToolFailed as exc:
            run.ours_failed(m, exc)
    if not run.cfg.with_peers or scenario != "full":
        return
    home = run.work / "home"
    for peer in peers():
        pm = run.results.get(scenario, peer.name)
        repo = run.work / "repos" / _slug(peer.name)
        try:
            peer.init(repo, home)
            pm.add(peer.backup(repo, run.image, 1, home), disk_usage(repo))
        except (ToolFailed, FileNotFoundError) as exc:
            pm.error = str(exc)
            run.failed_peers.add(peer.name)


def scenario_incremental(run: _Run, scenario: str = "incremental") -> None:
    """Re-run after the change: ours through the bitmap; borg and restic re-read all."""
    m = run.ours(scenario)
    if m is not None:
        before = run.node.store_usage()
        try:
            timed = run.node.backup()
            m.add(timed, run.node.store_usage() - before)
        except ToolFailed as exc:
            run.ours_failed(m, exc)
    if not run.cfg.with_peers or scenario != "incremental":
        return
    home = run.work / "home"
    for peer in peers():
        if not peer.incremental or peer.name in run.failed_peers:
            continue
        pm = run.results.get(scenario, peer.name)
        repo = run.work / "repos" / _slug(peer.name)
        before = disk_usage(repo)
        try:
            pm.add(peer.backup(repo, run.image, 2, home), disk_usage(repo) - before)
        except ToolFailed as exc:
            pm.error = str(exc)


def scenario_unchanged(run: _Run) -> None:
    """Ours re-run with nothing changed: the fixed cost of one backup invocation."""
    m = run.ours("unchanged")
    if m is None:
        return
    before = run.node.store_usage()
    try:
        m.add(run.node.backup(), run.node.store_usage() - before)
    except ToolFailed as exc:
        run.ours_failed(m, exc)


def scenario_restore(run: _Run) -> None:
    """Restore: ``qemu-img convert`` from our export vs from a local raw copy."""
    local = run.results.get("restore", LOCAL_CONVERT)
    target = run.work / "restored.raw"
    try:
        local.add(local_convert(run.inputs.dense_raw, target))
    except ToolFailed as exc:
        local.error = str(exc)
    m = run.ours("restore")
    if m is not None:
        try:
            timed = run.node.restore_export(target)
            if not _same_image(target, run.image):
                raise ToolFailed("restored image differs from the backed-up image")
            m.add(timed)
        except ToolFailed as exc:
            m.error = str(exc)  # the CLI restore below may still work
    target.unlink(missing_ok=True)
    cli = run.results.get("restore", OURS_CLI_RESTORE)
    if run.results.ours_error:
        cli.error = cli.error or SKIPPED
        return
    try:
        timed, restored = run.node.restore_cli()
        if not _same_image(restored, run.image):
            raise ToolFailed("restored image differs from the backed-up image")
        cli.add(timed)
    except (ToolFailed, ValueError, KeyError) as exc:
        cli.error = str(exc)
    run.node.forget_restored()


# runs ------------------------------------------------------------------------------


def _new_run(cfg: Config, inputs: Inputs, results: Results, name: str, image: Path,
             layout: Layout, chunk_size: str | None) -> _Run:
    work = _fresh(cfg.work / name)
    node = OurNode(work / "node", chunk_size, cfg.storage_type)
    installed = node.install(image, layout.virtual_size)
    return _Run(cfg, inputs, results, work, node, installed)


def run_dense(cfg: Config, inputs: Inputs, results: Results, number: int) -> None:
    """One run of full, change, incremental and restore on the dense image."""
    run = _new_run(cfg, inputs, results, f"dense-{number}", inputs.dense_qcow2,
                   inputs.dense, cfg.chunk_size)
    try:
        scenario_full(run)
        scenario_unchanged(run)
        apply_change(run.image, inputs.dense, inputs.writes)
        scenario_incremental(run)
        scenario_restore(run)
    finally:
        shutil.rmtree(run.work, ignore_errors=True)


def run_sparse(cfg: Config, inputs: Inputs, results: Results, number: int) -> None:
    """One run of full and incremental backups of the sparse image (ours only)."""
    run = _new_run(cfg, inputs, results, f"sparse-{number}", inputs.sparse_qcow2,
                   inputs.sparse, cfg.chunk_size)
    try:
        scenario_full(run, "sparse-full")
        apply_change(run.image, inputs.sparse, inputs.writes)
        scenario_incremental(run, "sparse-incremental")
    finally:
        shutil.rmtree(run.work, ignore_errors=True)


def run_gc(cfg: Config, results: Results) -> None:
    """GC of a store of 10 snapshots (1% change each) after removing the older half."""
    m = results.get(GC, OURS)
    mib = cfg.data_size >> 22  # a quarter of the dense image: 10 snapshots of it
    try:
        r = gc_bench.run(mib, 10, str(cfg.out))
    except (subprocess.CalledProcessError, OSError) as exc:
        m.error = f"bench.gc failed: {exc}"
        return
    m.add(Timed(r["seconds"], {GC_PROCESS: int(r["peak_rss_mib"] * 2**20)}),
          int(r["freed_bytes"]))
    m.values.update({k: r[k] for k in ("condemn_s", "delete_s", "chunks_condemned",
                                       "chunks_removed", "packs_written",
                                       "store_before_mib", "store_after_mib")})
    m.note = f"store: 10 snapshots of {mib} MiB, each changing 1% of the chunks of the last"


def run_chunk_index(cfg: Config, results: Results, chunks: int) -> None:
    """``python -m bench.chunkindex`` in a child (its own peak RSS)."""
    m = results.get(CHUNK_INDEX, OURS)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "bench.chunkindex", "--json", str(chunks)],
            check=True, capture_output=True, text=True,
            env={**os.environ, "BENCH_TMP": str(cfg.out)},
        ).stdout
        r = json.loads(out)
    except (subprocess.CalledProcessError, OSError, ValueError) as exc:
        m.error = f"bench.chunkindex failed: {exc}"
        return
    m.add(Timed(r["build_s"], {}))
    m.values.update(r)
    m.note = "time: building the index file; lookups from the page cache"


def run_codecs(cfg: Config, results: Results) -> None:
    """``python -m bench.codecs``: digest and zstd-level speeds on the bench's data."""
    m = results.get(CODECS, OURS)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "bench.codecs", "--json", "64"],
            check=True, capture_output=True, text=True,
        ).stdout
        r = json.loads(out)
    except (subprocess.CalledProcessError, OSError, ValueError) as exc:
        m.error = f"bench.codecs failed: {exc}"
        return
    m.values.update({f"{k} MiB/s": v for k, v in r["digests_mib_s"].items()})
    for name, c in r["compression"].items():
        m.values[f"{name} MiB/s"] = c["mib_s"]
        m.values[f"{name} stored %"] = 100 * c["stored"]
    m.note = "64 MiB of the image's regions, 256 KiB chunks, one thread, in memory"


def run_sweep(cfg: Config, inputs: Inputs, results: Results, number: int,
              chunk_size: str) -> None:
    """Full and incremental backups of the dense image with one chunk size."""
    run = _new_run(cfg, inputs, results, f"sweep-{chunk_size}-{number}",
                   inputs.dense_qcow2, inputs.dense, chunk_size)
    try:
        scenario_full(run, f"sweep {chunk_size} full")
        apply_change(run.image, inputs.dense, inputs.writes)
        scenario_incremental(run, f"sweep {chunk_size} incremental")
    finally:
        shutil.rmtree(run.work, ignore_errors=True)


def _s3_step(m: Measurement, rgw: BenchRGW, step: Callable[[], Timed],
             size: Callable[[], int] | None = None) -> dict[str, int]:
    """Time ``step`` into ``m``; record RGW's request counts of it; return them."""
    before = rgw.counts()
    size_before = size() if size is not None else 0
    timed = step()
    after = rgw.counts()
    delta = {k: after[k] - before[k] for k in after}
    m.add(timed, None if size is None else size() - size_before)
    m.values.update({"requests": delta["req"], "PUT": delta["put"], "GET": delta["get"]})
    return delta


def run_s3(cfg: Config, inputs: Inputs, results: Results, number: int, rgw: BenchRGW) -> None:
    """Full, incremental and restore of the dense image with the store on RGW.

    Measured as tool ``OURS_S3`` in the scenarios ``full``, ``incremental`` and
    ``restore`` (the latter through the provider's export, as ours local), so the
    table puts them next to the local store's lines.
    """
    work = _fresh(cfg.work / f"s3-{number}")
    node = S3Node(work / "node", rgw, cfg.chunk_size)
    try:
        node.install(inputs.dense_qcow2, inputs.dense.virtual_size)
        full = results.get("full", OURS_S3)
        delta = _s3_step(full, rgw, node.backup, node.store_usage)
        full.values["PUT per GiB of image data"] = delta["put"] / (cfg.data_size / GiB)
        apply_change(node.image, inputs.dense, inputs.writes)
        _s3_step(results.get("incremental", OURS_S3), rgw, node.backup, node.store_usage)
        target = work / "restored.raw"
        restore = results.get("restore", OURS_S3)
        _s3_step(restore, rgw, lambda: node.restore_export(target))
        if not _same_image(target, node.image):
            restore.error = "restored image differs from the backed-up image"
        restore.note = "requests include one 'pvebackup list' (finds the snapshot)"
    except ToolFailed as exc:
        for scenario in ("full", "incremental", "restore"):
            m = results.get(scenario, OURS_S3)
            m.error = m.error or str(exc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        node.close()
