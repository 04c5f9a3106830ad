"""Fault injection against the real RGW: a proxy that drops connections or answers 503."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from pvebackup.api.errors import TransientBackendError
from pvebackup.store.backends.retry import RetryBackend
from pvebackup.store.backends.s3 import S3Backend, S3Config
from s3fixture import S3Server

pytestmark = pytest.mark.s3

_SLOWDOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s"
)
_BODY = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>x</Message></Error>"


class FaultProxy:
    """Forwards TCP to ``target``; the first ``faults`` requests fail as ``mode`` says:
    ``drop`` closes the connection after reading the request, ``503`` answers SlowDown."""

    def __init__(self, target: tuple[str, int], mode: str, faults: int) -> None:
        self.target, self.mode, self.faults = target, mode, faults
        self.failed = 0
        self.active = self.max_active = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._lock = threading.Lock()
        self._stop = False
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _take_fault(self) -> bool:
        with self._lock:
            if self.failed < self.faults:
                self.failed += 1
                return True
            return False

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            if self._take_fault():
                head = b""
                while b"\r\n\r\n" not in head:
                    part = conn.recv(65536)
                    if not part:
                        return
                    head += part
                if self.mode == "503":
                    conn.sendall(_SLOWDOWN % (len(_BODY), _BODY))
                return  # "drop": closed without an answer
            with self._lock:
                self.active += 1
                self.max_active = max(self.max_active, self.active)
            try:
                with socket.create_connection(self.target) as up:
                    pump = threading.Thread(target=_pump, args=(up, conn), daemon=True)
                    pump.start()
                    _pump(conn, up)
                    pump.join(5)
            finally:
                with self._lock:
                    self.active -= 1

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for t in self._threads:
            t.join(5)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.fixture(params=["drop", "503"])
def proxy(request: pytest.FixtureRequest, s3_server: S3Server) -> Iterator[FaultProxy]:
    host, port = s3_server.endpoint.removeprefix("http://").split(":")
    p = FaultProxy((host, int(port)), request.param, faults=3)
    yield p
    p.close()


def _through(proxy: FaultProxy, server: S3Server, bucket: str, max_requests: int = 1) -> S3Backend:
    return S3Backend(
        S3Config(f"http://127.0.0.1:{proxy.port}", bucket, max_requests=max_requests),
        access_key=server.access_key, secret_key=server.secret_key,
    )  # fmt: skip


def test_retry_wrapper_rides_out_drops_and_503s(
    proxy: FaultProxy, s3_server: S3Server, s3_bucket: str
) -> None:
    backend = RetryBackend(_through(proxy, s3_server, s3_bucket), base_delay=0.01)
    assert backend.put("packs/ab/one", b"payload", overwrite=False)
    assert backend.get("packs/ab/one") == b"payload"
    assert list(backend.list("packs/")) == ["packs/ab/one"]
    assert proxy.failed == 3 and backend.retries == 3
    backend.close()


def test_without_the_wrapper_a_fault_is_a_transient_error(
    proxy: FaultProxy, s3_server: S3Server, s3_bucket: str
) -> None:
    backend = _through(proxy, s3_server, s3_bucket)
    with pytest.raises(TransientBackendError):
        backend.put("k", b"v", overwrite=True)
    backend.close()


def test_max_requests_bounds_the_connections(s3_server: S3Server, s3_bucket: str) -> None:
    host, port = s3_server.endpoint.removeprefix("http://").split(":")
    proxy = FaultProxy((host, int(port)), "none", faults=0)
    backend = _through(proxy, s3_server, s3_bucket, max_requests=2)
    threads = [
        threading.Thread(
            target=lambda i=i: [backend.put(f"k/{i}/{j}", b"v" * 1000, overwrite=False)
                                for j in range(5)]  # fmt: skip
        )
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(list(backend.list("k/"))) == 40
    assert 1 <= proxy.max_active <= 2
    backend.close()
    proxy.close()
