"""``python3 -m pvebackup.bridge``: the helper the Perl plugin starts per job.

Reads requests from stdin and answers on stdout (docs/bridge-protocol.md);
stderr carries diagnostics only. Takes no arguments: nothing secret may be
in argv, and nothing else is needed there.
"""

from __future__ import annotations

import sys

from pvebackup.bridge.server import Server


def main() -> int:
    if len(sys.argv) > 1:
        print("usage: python3 -m pvebackup.bridge (speaks JSON lines on stdin/stdout)",
              file=sys.stderr)
        return 2
    return Server(sys.stdin.buffer, sys.stdout.buffer, sys.stderr).run()


if __name__ == "__main__":
    sys.exit(main())
