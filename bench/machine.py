"""What the benchmark ran on: CPUs, memory, the disk under the work directory."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

__all__ = ["machine_info"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _disk(path: Path) -> str:
    out = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "-T", str(path)],
                         capture_output=True, text=True, check=False).stdout.split()
    if len(out) < 2:
        return "unknown"
    source, fstype = out[0], out[1]
    device = Path(source).name
    rotational = Path(f"/sys/block/{device}/queue/rotational")
    kind = ""
    if rotational.exists():
        kind = ", rotational" if rotational.read_text().strip() == "1" else ", non-rotational"
    return f"{source} ({fstype}{kind})"


def machine_info(work: Path) -> dict[str, object]:
    """A JSON-ready description of this machine; ``work`` picks the disk."""
    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_bytes": _memory(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "disk": _disk(work),
    }
