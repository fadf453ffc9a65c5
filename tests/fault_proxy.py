"""A TCP proxy on loopback that can be made to fail, for fault-injection tests (a toxiproxy in a few lines).

    proxy = FaultProxy(5432)             # clients connect to 127.0.0.1:proxy.port instead of 127.0.0.1:5432
    proxy.down(10)                       # for 10 s: open connections reset, new ones accepted then reset
    proxy.down_when(b"/checkpoint-", 12) # down for 12 s from the first client bytes containing the pattern
                                         # (plain HTTP: the request line of an S3 PUT of a checkpoint file)

A reset (RST, SO_LINGER 0) is what clients see when a server, a load balancer or a NAT entry dies mid-request.
"""

from __future__ import annotations

import socket
import struct
import threading
import time


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.resets = 0  # connections reset while down: proof that the fault met the client
        self.tripped_at: float | None = None  # when down_when's pattern was seen (time.monotonic)
        self._down_until = 0.0
        self._trigger: tuple[bytes, float] | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name=f"proxy-{self.port}", daemon=True).start()

    @property
    def is_down(self) -> bool:
        return time.monotonic() < self._down_until

    def down(self, seconds: float) -> None:
        self._down_until = time.monotonic() + seconds
        with self._lock:
            doomed, self._open = self._open, set()
        for sock in doomed:
            self.resets += 1
            _reset(sock)

    def down_when(self, pattern: bytes, seconds: float) -> None:
        self._trigger = (pattern, seconds)

    def close(self) -> None:
        self.listener.close()
        self.down(0)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if self.is_down:
                self.resets += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._open |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client and self._trigger is not None and self._trigger[0] in data:
                    seconds, self._trigger = self._trigger[1], None
                    self.tripped_at = time.monotonic()
                    self.down(seconds)
                if self.is_down:
                    break
                dst.sendall(data)
        except OSError:
            pass
        with self._lock:
            self._open -= {src, dst}
        for sock in (src, dst):
            _reset(sock) if self.is_down else sock.close()
