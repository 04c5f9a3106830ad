"""The peers: borg, restic and zstd backing up the same image file, and local convert.

Peers back up the qcow2 image *file* (the same file our host side exports), since
that is what they would see on a Proxmox VE node. Each gets a fresh repository per
run, with its cache and configuration kept inside the run's work directory.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.measure import Timed, run_timed

__all__ = ["Borg", "Peer", "Restic", "Zstd", "local_convert", "peers", "tool_versions"]

RESTIC_PASSWORD = "bench-not-a-secret"


@dataclass(frozen=True, slots=True)
class Peer:
    """A backup tool measured on the full backup and (if ``incremental``) the re-run."""

    name: str
    incremental: bool = True

    def env(self, home: Path) -> dict[str, str]:
        return {}

    def init(self, repo: Path, home: Path) -> None:
        """Create an empty repository at ``repo``."""

    def backup(self, repo: Path, image: Path, number: int, home: Path) -> Timed:
        """Back up ``image`` into ``repo`` (``number`` counts backups, from 1)."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Borg(Peer):
    compression: str = "lz4"

    def env(self, home: Path) -> dict[str, str]:
        return {
            "BORG_BASE_DIR": str(home / "borg"),
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
        }

    def init(self, repo: Path, home: Path) -> None:
        repo.parent.mkdir(parents=True, exist_ok=True)
        run_timed(["borg", "init", "--encryption", "none", str(repo)],
                  env=self.env(home), cold=False)

    def backup(self, repo: Path, image: Path, number: int, home: Path) -> Timed:
        return run_timed(
            ["borg", "create", "--compression", self.compression,
             f"{repo}::backup-{number}", image.name],
            env=self.env(home), cwd=image.parent,
        )


@dataclass(frozen=True, slots=True)
class Restic(Peer):
    def env(self, home: Path) -> dict[str, str]:
        return {"RESTIC_PASSWORD": RESTIC_PASSWORD, "RESTIC_CACHE_DIR": str(home / "restic")}

    def init(self, repo: Path, home: Path) -> None:
        run_timed(["restic", "--quiet", "-r", str(repo), "init"], env=self.env(home), cold=False)

    def backup(self, repo: Path, image: Path, number: int, home: Path) -> Timed:
        return run_timed(
            ["restic", "--quiet", "-r", str(repo), "backup", image.name],
            env=self.env(home), cwd=image.parent,
        )


@dataclass(frozen=True, slots=True)
class Zstd(Peer):
    """``zstd -1 -T2``: no repository, no dedup; the speed of compression alone."""

    def init(self, repo: Path, home: Path) -> None:
        repo.mkdir(parents=True, exist_ok=True)

    def backup(self, repo: Path, image: Path, number: int, home: Path) -> Timed:
        out = repo / f"{image.name}.{number}.zst"
        return run_timed(["zstd", "-1", "-T2", "-q", "-f", str(image), "-o", str(out)])


def peers() -> list[Peer]:
    """Every peer, in table order."""
    return [
        Borg("borg lz4", compression="lz4"),
        Borg("borg zstd,3", compression="zstd,3"),
        Restic("restic"),
        Zstd("zstd -1 -T2", incremental=False),
    ]


def local_convert(raw: Path, target: Path) -> Timed:
    """``qemu-img convert`` of a local raw copy to a raw target: the restore baseline."""
    target.unlink(missing_ok=True)
    return run_timed(["qemu-img", "convert", "-f", "raw", "-O", "raw", str(raw), str(target)])


def tool_versions() -> dict[str, str]:
    """First output line of each tool's version command ("missing" if absent)."""
    commands = {
        "borg": ["borg", "--version"],
        "restic": ["restic", "version"],
        "zstd": ["zstd", "--version"],
        "qemu-img": ["qemu-img", "--version"],
    }
    versions: dict[str, str] = {}
    for name, argv in commands.items():
        try:
            out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
        except FileNotFoundError:
            versions[name] = "missing"
            continue
        versions[name] = (out.strip().splitlines() or ["?"])[0]
    return versions
