"""SIGINT/SIGTERM become AbortedError (pvebackup.host.signals)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from pvebackup.api.errors import AbortedError
from pvebackup.host.signals import abort_on_signals


def test_sigterm_raises_aborted_and_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(AbortedError, match="SIGTERM"):
        with abort_on_signals() as state:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted by the handler
    assert state.received == ["SIGTERM"]
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_signal_does_not_interrupt_cleanup() -> None:
    cleaned = False
    with pytest.raises(AbortedError):
        with abort_on_signals() as state:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                cleaned = True
    assert cleaned
    assert state.received == ["SIGINT", "SIGTERM"]


def test_outside_main_thread_nothing_is_installed() -> None:
    seen: list[bool] = []

    def worker() -> None:
        with abort_on_signals() as state:
            seen.append(state.aborted)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [False]
