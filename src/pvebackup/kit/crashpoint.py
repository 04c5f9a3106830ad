"""Named points where the crash-injection tests kill the process (SIGKILL).

``PVEBACKUP_TEST_CRASH_AT=<point>[:<n>]`` makes the ``n``-th call (default the
first) of :func:`crash_point` with that name send SIGKILL to this process: no
``finally`` block, no signal handler, no atexit runs, exactly what ``kill -9`` or
the OOM killer does. Without the variable a call is one dictionary lookup.

This is the only test hook in production code. It can only make the process die,
which anyone who may set its environment can do anyway; it cannot change what a
run writes. The points (``grep -rn crash_point src``) are listed in the tests of
``tests/cli/test_cli_crash.py``.
"""

from __future__ import annotations

import os
import signal

__all__ = ["ENV", "crash_point"]

ENV = "PVEBACKUP_TEST_CRASH_AT"
_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Die here with SIGKILL if ``$PVEBACKUP_TEST_CRASH_AT`` names this point."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, count = wanted.partition(":")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= (int(count) if count.isdigit() else 1):
        os.kill(os.getpid(), signal.SIGKILL)
