"""Container backup benchmark: a generated file tree, ours vs tar|zstd, borg, restic.

``python -m bench --container [--ct-files N]``. The tree (seeded) has N files of
mixed sizes (90% up to 16 KiB, 9.5% up to 128 KiB, 0.5% 0.5..2 MiB; ~20 KiB mean), half random
and half text-like, directories of ~50 entries, 1% hard links and 1% symlinks,
owned by mapped ids (100000+). The issue's reference tree is 19.7k files,
438 MB; the default here is smaller. Measured, each in a fresh repository: first
backup, unchanged re-run, and the re-run after 1% of the files changed (their
content rewritten, half of them also resized), with the repository growth.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

from bench.measure import Timed, disk_usage, run_timed
from bench.peers import RESTIC_PASSWORD

__all__ = ["make_small_tree", "make_tree", "run_container", "run_container_rss"]

_WORDS = [f"w{i:03d}x" for i in range(256)]


def _content(rng: random.Random, size: int) -> bytes:
    if rng.random() < 0.5:
        return rng.randbytes(size)
    text = " ".join(rng.choice(_WORDS) for _ in range(size // 5 + 1)).encode()
    return text[:size]


def _size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.90:
        return rng.randint(0, 16 << 10)
    if r < 0.995:
        return rng.randint(16 << 10, 128 << 10)
    return rng.randint(512 << 10, 2 << 20)


def make_tree(root: Path, files: int, seed: int = 5) -> int:
    """Generate the tree; returns its data bytes."""
    rng = random.Random(seed)
    total = 0
    made: list[Path] = []
    for i in range(files):
        d = root / f"d{i // 2500:02d}" / f"s{(i // 50) % 50:02d}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"f{i:06d}"
        k = rng.random()
        if k < 0.01 and made:
            os.link(rng.choice(made), path)
        elif k < 0.02:
            os.symlink(f"../../d00/s00/f{rng.randrange(50):06d}", path)
        else:
            data = _content(rng, _size(rng))
            path.write_bytes(data)
            total += len(data)
            made.append(path)
        os.lchown(path, 100000 + rng.randrange(3), 100000 + rng.randrange(3))
    for d in [root, *root.rglob("*")]:
        if d.is_dir() and not d.is_symlink():
            os.lchown(d, 100000, 100000)
    return total


def make_small_tree(root: Path, files: int, seed: int = 7) -> int:
    """``files`` small files (0..256 bytes, 1000 per directory); returns data bytes."""
    rng = random.Random(seed)
    total = 0
    for i in range(files):
        if i % 1000 == 0:
            d = root / f"d{i // 100_000:02d}" / f"s{(i // 1000) % 100:02d}"
            d.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.randrange(257))
        fd = os.open(d / f"f{i:07d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
        total += len(data)
    return total


def run_container_rss(out: Path, files: int) -> dict[str, object]:
    """Peak RSS of our container backup (first and unchanged re-run) of ``files``
    small files: the issue's goal is <= 200 MiB for a million."""
    work = out / "ct-rss-work"
    shutil.rmtree(work, ignore_errors=True)
    tree = work / "tree"
    tree.mkdir(parents=True)
    data = make_small_tree(tree, files)
    conf = work / "200.conf"
    conf.write_text("arch: amd64\nrootfs: local:200/subvol-200-disk-0.subvol\n")
    (work / "ours").mkdir()
    rows: dict[str, dict[str, object]] = {}
    for step in ("first", "unchanged"):
        t = _ours(work / "ours", tree, conf)
        peak = next(int(line.split(":")[1]) for line in t.stdout.splitlines()
                    if line.startswith("peak rss KiB:"))  # fmt: skip
        rows[step] = {"seconds": round(t.seconds, 1), "peak rss MiB": round(peak / 1024, 1),
                      "log": [x for x in t.stdout.splitlines() if "backup-store" in x]}
        print(f"{step}: {t.seconds:.1f} s, peak RSS {peak / 1024:.1f} MiB", flush=True)
    print(f"container tree of {files} small files ({data / 2**20:.0f} MiB of data)")
    result: dict[str, object] = {"files": files, "data_bytes": data, "rows": rows}
    (out / "container-rss.json").write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return result


def change_tree(root: Path, fraction: float = 0.01, seed: int = 6) -> None:
    """Rewrite ``fraction`` of the regular files (half of them with a new size)."""
    rng = random.Random(seed)
    files = sorted(p for p in root.rglob("f*") if p.is_file() and not p.is_symlink())
    for path in rng.sample(files, max(1, int(len(files) * fraction))):
        size = path.stat().st_size
        if rng.random() < 0.5:
            size = _size(rng)
        path.write_bytes(_content(rng, size))


def _ours(store: Path, tree: Path, conf: Path) -> Timed:
    return run_timed([sys.executable, "-m", "bench.ctbackup", str(store), str(tree), str(conf)],
                     monitor_rss="python", label="ours")


def _tar_zstd(out: Path, tree: Path, n: int) -> Timed:
    script = f"tar -C '{tree}' -cf - . | zstd -1 -T2 -q -o '{out}/{n}.tar.zst'"
    return run_timed(["sh", "-c", script], label="tar|zstd")


def _borg(repo: Path, tree: Path, n: int, home: Path) -> Timed:
    env = {"BORG_BASE_DIR": str(home / "borg"),
           "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes"}
    if n == 1:
        run_timed(["borg", "init", "--encryption", "none", str(repo)], env=env, cold=False)
    return run_timed(["borg", "create", "--compression", "lz4", f"{repo}::b{n}", "."],
                     env=env, cwd=tree)


def _restic(repo: Path, tree: Path, n: int, home: Path) -> Timed:
    env = {"RESTIC_PASSWORD": RESTIC_PASSWORD, "RESTIC_CACHE_DIR": str(home / "restic")}
    if n == 1:
        run_timed(["restic", "--quiet", "-r", str(repo), "init"], env=env, cold=False)
    return run_timed(["restic", "--quiet", "-r", str(repo), "backup", "."], env=env, cwd=tree)


def run_container(out: Path, files: int, with_peers: bool = True) -> dict[str, object]:
    """Measure every tool on one generated tree; print a table, return the numbers."""
    work = out / "ct-work"
    shutil.rmtree(work, ignore_errors=True)
    tree = work / "tree"
    tree.mkdir(parents=True)
    data = make_tree(tree, files)
    conf = work / "200.conf"
    conf.write_text("arch: amd64\nrootfs: local:200/subvol-200-disk-0.subvol\n")
    home = work / "home"
    tools = {"ours": lambda n: _ours(work / "ours", tree, conf)}
    (work / "ours").mkdir()
    if with_peers:
        (work / "zstd").mkdir()
        tools["tar | zstd -1 -T2"] = lambda n: _tar_zstd(work / "zstd", tree, n)
        tools["borg lz4"] = lambda n: _borg(work / "borg", tree, n, home)
        tools["restic"] = lambda n: _restic(work / "restic", tree, n, home)
    repo = {"ours": work / "ours", "tar | zstd -1 -T2": work / "zstd",
            "borg lz4": work / "borg", "restic": work / "restic"}
    rows: dict[str, dict[str, float]] = {}
    for step, n in (("first", 1), ("unchanged", 2), ("changed 1%", 3)):
        if step == "changed 1%":
            change_tree(tree)
        for name, backup in tools.items():
            before = disk_usage(repo[name])
            t = backup(n)
            row = rows.setdefault(name, {})
            row[f"{step} s"] = round(t.seconds, 2)
            row[f"{step} growth MiB"] = round((disk_usage(repo[name]) - before) / 2**20, 1)
            if t.rss:
                row[f"{step} rss MiB"] = round(max(t.rss.values()) / 2**20, 1)
    print(f"container tree: {files} files, {data / 2**20:.0f} MiB of data")
    steps = ("first", "unchanged", "changed 1%")
    print(f"{'tool':20} " + " ".join(f"{s + ' s':>14} {'growth MiB':>11}" for s in steps))
    for name, row in rows.items():
        print(f"{name:20} " + " ".join(
            f"{row[s + ' s']:>14} {row[s + ' growth MiB']:>11}" for s in steps))
    result: dict[str, object] = {"files": files, "data_bytes": data, "rows": rows}
    (out / "container.json").write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return result
