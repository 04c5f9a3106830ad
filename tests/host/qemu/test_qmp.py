"""The QMP client: against a scripted fake server, and against the real daemon."""

from __future__ import annotations

import json
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pvebackup.api.errors import QmpError
from pvebackup.host.qemu.daemon import StorageDaemon
from pvebackup.host.qemu.qmp import QmpClient, QmpConnectionError

GREETING = {"QMP": {"version": {}, "capabilities": []}}
Handler = Callable[[dict[str, Any]], list[dict[str, Any]] | None]


class FakeQmp:
    """A one-connection QMP server; ``handler(request)`` gives the replies to send
    (None: close the connection)."""

    def __init__(self, handler: Handler, greeting: dict[str, Any] = GREETING) -> None:
        self.path = str(Path(tempfile.mkdtemp()) / "q.sock")
        self.handler = handler
        self.greeting = greeting
        self.requests: list[dict[str, Any]] = []
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.srv.accept()
        with conn:
            f = conn.makefile("rwb")
            f.write(json.dumps(self.greeting).encode() + b"\n")
            f.flush()
            for line in f:
                req = json.loads(line)
                self.requests.append(req)
                replies = self.handler(req)
                if replies is None:
                    return
                for r in replies:
                    f.write(json.dumps(r).encode() + b"\n")
                f.flush()

    def close(self) -> None:
        self.srv.close()
        self.thread.join(timeout=5)


@pytest.fixture
def fake() -> Iterator[Callable[..., FakeQmp]]:
    servers: list[FakeQmp] = []

    def make(handler: Handler, **kw: Any) -> FakeQmp:
        s = FakeQmp(handler, **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def answer(req: dict[str, Any]) -> list[dict[str, Any]] | None:
    cmd = req["execute"]
    if cmd == "qmp_capabilities":
        return [{"return": {}, "id": req["id"]}]
    if cmd == "echo":
        return [
            {"event": "SOMETHING", "data": {}},
            {"return": "stale", "id": "not-ours"},
            {"return": req.get("arguments"), "id": req["id"]},
        ]
    if cmd == "fail":
        return [{"error": {"class": "GenericError", "desc": "it broke"}, "id": req["id"]}]
    if cmd == "hang":
        return []
    return None  # close


def test_execute_returns_skips_and_collects_events(fake: Callable[..., FakeQmp]) -> None:
    s = fake(answer)
    with QmpClient(s.path, timeout=5) as c:
        assert s.requests[0]["execute"] == "qmp_capabilities"
        assert c.execute("echo", **{"node-name": "n0", "x": [1]}) == {"node-name": "n0", "x": [1]}
        assert c.execute("echo") is None
        assert [e["event"] for e in c.events_named("SOMETHING")] == ["SOMETHING"] * 2
    assert not c.connected


def test_error_names_command_and_message(fake: Callable[..., FakeQmp]) -> None:
    with QmpClient(fake(answer).path, timeout=5) as c:
        with pytest.raises(QmpError, match=r"QMP fail failed: it broke \(GenericError\)") as ei:
            c.execute("fail")
        assert not isinstance(ei.value, QmpConnectionError)
        assert c.connected  # an error answer leaves the session usable
        assert c.execute("echo", a=1) == {"a": 1}


def test_timeout_breaks_the_session(fake: Callable[..., FakeQmp]) -> None:
    with QmpClient(fake(answer).path, timeout=0.3) as c:
        with pytest.raises(QmpConnectionError, match="hang: no answer within 0.3 s"):
            c.execute("hang")
        assert not c.connected
        with pytest.raises(QmpConnectionError, match="closed"):
            c.execute("echo")


def test_closed_connection_and_bad_greeting(fake: Callable[..., FakeQmp]) -> None:
    with QmpClient(fake(answer).path, timeout=5) as c:
        with pytest.raises(QmpConnectionError, match="closed by QEMU"):
            c.execute("bye")
    with pytest.raises(QmpConnectionError, match="unexpected greeting"):
        QmpClient(fake(answer, greeting={"hello": 1}).path, timeout=5)
    with pytest.raises(OSError):
        QmpClient(str(Path(tempfile.mkdtemp()) / "nothing.sock"), timeout=5)


@pytest.mark.e2e
def test_real_daemon() -> None:
    with StorageDaemon() as d:
        version = d.execute("query-version")
        assert version["qemu"]["major"] >= 7
        with pytest.raises(QmpError, match="QMP blockdev-del failed: .*nope"):
            d.execute("blockdev-del", **{"node-name": "nope"})
        assert d.qmp.connected
