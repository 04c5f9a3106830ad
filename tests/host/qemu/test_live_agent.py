"""The guest agent is the guest's: whatever it answers, the backup goes on and thaws.

A fake agent on a Unix socket (a thread) plays a well-behaved, a silent, a lying
and a flooding guest.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pvebackup.host.qemu.agent import frozen_filesystems

if TYPE_CHECKING:
    from conftest import LogRecorder

Reply = Callable[[dict[str, object]], bytes | None]


class Agent(threading.Thread):
    def __init__(self, path: Path, reply: Reply) -> None:
        super().__init__(daemon=True)
        self.reply = reply
        self.commands: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(2)
        self.start()

    def run(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            buf = b""
            while True:
                try:
                    chunk = conn.recv(4096)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    msg = json.loads(line)
                    self.commands.append(str(msg["execute"]))
                    out = self.reply(msg)
                    if out is not None:
                        try:
                            conn.sendall(out)
                        except OSError:
                            return


def honest(msg: dict[str, object]) -> bytes:
    args = msg.get("arguments")
    ret = args.get("id", 0) if isinstance(args, dict) else 0
    return json.dumps({"return": ret}).encode() + b"\n"


@pytest.fixture
def qga(tmp_path: Path) -> Iterator[Callable[[Reply], Agent]]:
    agents: list[Agent] = []

    def make(reply: Reply) -> Agent:
        a = Agent(tmp_path / "100.qga", reply)
        agents.append(a)
        return a

    yield make
    for a in agents:
        a.sock.close()


def test_freeze_then_thaw(tmp_path: Path, qga: Callable[[Reply], Agent], log: LogRecorder) -> None:
    agent = qga(honest)
    with frozen_filesystems(tmp_path / "100.qga", log=log, timeout=5) as frozen:
        assert frozen
        assert agent.commands == ["guest-sync", "guest-fsfreeze-freeze"]
    assert agent.commands[-1] == "guest-fsfreeze-thaw"


def test_thawed_also_when_the_block_fails(
    tmp_path: Path, qga: Callable[[Reply], Agent], log: LogRecorder
) -> None:
    agent = qga(honest)
    with pytest.raises(RuntimeError), frozen_filesystems(tmp_path / "100.qga", log=log, timeout=5):
        raise RuntimeError("set-up failed")
    deadline = time.monotonic() + 5
    while agent.commands[-1:] != ["guest-fsfreeze-thaw"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert agent.commands[-1] == "guest-fsfreeze-thaw"


def test_a_silent_agent_times_out(
    tmp_path: Path, qga: Callable[[Reply], Agent], log: LogRecorder
) -> None:
    qga(lambda msg: None)
    started = time.monotonic()
    with frozen_filesystems(tmp_path / "100.qga", log=log, timeout=0.5) as frozen:
        assert not frozen
    assert time.monotonic() - started < 3
    assert any("no answer within" in m for m in log.at("warn"))


def test_a_freeze_answer_that_times_out_is_still_thawed(
    tmp_path: Path, qga: Callable[[Reply], Agent], log: LogRecorder
) -> None:
    # The guest may have frozen and then hung: thaw anyway.
    agent = qga(lambda msg: None if msg["execute"] == "guest-fsfreeze-freeze" else honest(msg))
    with frozen_filesystems(tmp_path / "100.qga", log=log, timeout=0.5) as frozen:
        assert not frozen
    assert agent.commands == ["guest-sync", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]


@pytest.mark.parametrize(
    "garbage",
    [
        b"not json\n",
        b"[1, 2, 3]\n" + b'{"error": {"class": "GenericError", "desc": "no"}}\n',
        b"x" * (2 << 20),  # an endless line: bounded
        b'{"error": "' + b"e" * 5000 + b'"}\n',
    ],
    ids=["not-json", "error", "flood", "long-error"],
)
def test_a_lying_agent_is_only_a_warning(
    tmp_path: Path, qga: Callable[[Reply], Agent], log: LogRecorder, garbage: bytes
) -> None:
    qga(lambda msg: honest(msg) if msg["execute"] == "guest-sync" else garbage)
    with frozen_filesystems(tmp_path / "100.qga", log=log, timeout=2) as frozen:
        assert not frozen
    warnings = log.at("warn")
    assert any("continuing without freezing" in m for m in warnings), log.lines
    assert all(len(m) < 1000 for _, m in log.lines)  # the guest's text is cut short


def test_no_agent_configured_or_no_socket(tmp_path: Path, log: LogRecorder) -> None:
    with frozen_filesystems(None, log=log) as frozen:
        assert not frozen
    with frozen_filesystems(tmp_path / "missing.qga", log=log, timeout=1) as frozen:
        assert not frozen
    assert len(log.at("warn")) == 2
