"""Back up one container directory into a backup-store, in-process (timed by the
container benchmark as a child): ``python -m bench.ctbackup STORE TREE CONF``.

It plays the host's calls (job_start .. job_end) against the provider, so the
time is the provider's: walking, tar stream, chunking, digests, compression,
packs. Prints the provider's archive log lines and the process's peak RSS
(``getrusage``: the kernel's high-water mark, which polling can miss).
"""

from __future__ import annotations

import resource
import sys
import time

from pvebackup.api.types import GuestType
from pvebackup.providers.store.plugin import BackupStorePlugin
from pvebackup.providers.store.provider import BackupStoreProvider

ID_MAP = [["u", "0", "100000", "65536"], ["g", "0", "100000", "65536"]]


def main(store: str, tree: str, conf: str) -> int:
    lines: list[str] = []
    scfg = {"type": "backup-store", "path": store}
    # Host state (chunk cache, bitmap bases) next to the store, not in /var/lib.
    p = BackupStoreProvider(
        BackupStorePlugin(), scfg, "store", lambda level, msg: lines.append(f"{level}: {msg}"),
        state_dir=f"{store}.state",
    )
    p.job_start(int(time.time()))
    p.backup_start(200, GuestType.LXC)
    p.backup_get_target(200, GuestType.LXC)
    p.backup_guest_config(200, conf)
    p.backup_directory(200, tree, ID_MAP, [], ["."], None)
    p.backup_end(200)
    p.job_end()
    print("\n".join(m for m in lines if "backup-store" in m))
    print(f"peak rss KiB: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
