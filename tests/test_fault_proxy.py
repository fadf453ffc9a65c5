"""The fault-injection proxy of the slow suite, and the job store's retry of database outages."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
from fault_proxy import FaultProxy
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from services.jobs import jobstore


def _echo_server() -> int:
    server = socket.create_server(("127.0.0.1", 0))

    def echo(conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:  # the proxy resets it: that is the point
            while data := conn.recv(1024):
                conn.sendall(data)

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return int(server.getsockname()[1])


def _echo(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(data)
        return conn.recv(1024)


def test_the_proxy_passes_traffic_resets_it_while_down_and_recovers() -> None:
    proxy = FaultProxy(_echo_server())
    assert _echo(proxy.port, b"ping") == b"ping"
    held = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    held.sendall(b"a")
    assert held.recv(16) == b"a"
    proxy.down(1.0)
    with pytest.raises(OSError):  # the open connection was reset...
        held.sendall(b"b")
        assert held.recv(16) == b""
        raise ConnectionResetError
    with pytest.raises(OSError):  # ...and new ones are refused while down
        assert _echo(proxy.port, b"x") == b""
        raise ConnectionResetError
    time.sleep(1.1)
    assert _echo(proxy.port, b"back") == b"back" and proxy.resets >= 2
    proxy.down_when(b"trip", 0.5)
    with pytest.raises(OSError):
        assert _echo(proxy.port, b"trip me") == b""
        raise ConnectionResetError
    assert proxy.tripped_at is not None
    proxy.close()


class _FlakySession:
    rollbacks = 0

    def rollback(self) -> None:
        self.rollbacks += 1


def test_job_store_writes_retry_a_database_outage_then_succeed() -> None:
    calls: list[float] = []

    @jobstore.retry_outages
    def write(session: Session, value: int) -> int:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise OperationalError("UPDATE jobs ...", {}, ConnectionRefusedError("connection refused"))
        return value

    session = _FlakySession()
    assert write(session, 7) == 7  # type: ignore[arg-type]
    assert len(calls) == 3 and session.rollbacks == 2  # each retry on a fresh connection
    assert calls[2] - calls[0] >= 0.9  # with backoff, not a busy loop


def test_job_store_writes_do_not_retry_other_errors() -> None:
    @jobstore.retry_outages
    def write(session: Session) -> None:
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError):
        write(_FlakySession())  # type: ignore[arg-type]
