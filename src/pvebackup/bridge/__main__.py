"""``python3 -m pvebackup.bridge``: the helper the Perl plugin starts per job.

Reads requests from stdin and answers on stdout (docs/bridge-protocol.md);
stderr carries diagnostics only. Takes no arguments: nothing secret may be
in argv, and nothing else is needed there.
"""

from __future__ import annotations

import signal
import sys

from pvebackup.api.errors import AbortedError
from pvebackup.bridge.server import Server


def main() -> int:
    if len(sys.argv) > 1:
        print("usage: python3 -m pvebackup.bridge (speaks JSON lines on stdin/stdout)",
              file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _interrupted)
    return Server(sys.stdin.buffer, sys.stdout.buffer, sys.stderr).run()


def _interrupted(signum: int, frame: object) -> None:
    # vzdump ends a job it aborts by signal; what is open must be aborted
    # (backup_abort, job_abort), not left half written for a later cleanup.
    raise AbortedError(f"interrupted by signal {signal.Signals(signum).name}")


if __name__ == "__main__":
    sys.exit(main())
