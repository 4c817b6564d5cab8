"""A loopback TCP proxy that breaks connections: network faults for tests, on 127.0.0.1 only.

`FaultProxy(upstream_url, reset_after_bytes, resets=1)` listens on 127.0.0.1:<free port> and forwards every
connection to the upstream (the session's S3 server). When a connection has carried `reset_after_bytes` bytes
from the upstream to the client, the proxy sends what came before that point and then resets the connection
(TCP RST, as a peer or middlebox that drops a connection does), `resets` times in all (None: every connection
that gets that far). Bounded: at most `max_connections` connections, and it stops by itself after
`lifetime_s` seconds; use it as a context manager.
"""
from __future__ import annotations

import socket
import struct
import threading
import time
from urllib.parse import urlparse


class FaultProxy:
    def __init__(self, upstream_url: str, reset_after_bytes: int, resets: int | None = 1,
                 lifetime_s: float = 60.0, max_connections: int = 200):
        u = urlparse(upstream_url)
        if u.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"FaultProxy forwards to loopback only, not {upstream_url}")
        self.upstream = (u.hostname, u.port)
        self.reset_after_bytes, self.resets_left = reset_after_bytes, resets
        self.deadline = time.monotonic() + lifetime_s
        self.max_connections = max_connections
        self.connections = 0  # accepted so far
        self.resets_done = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy", daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            socks, self._socks = list(self._socks), set()
        for s in socks:
            _close(s)

    # -- internals
    def _accept_loop(self) -> None:
        try:
            while not self._stop.is_set() and time.monotonic() < self.deadline:
                try:
                    client, _ = self._listener.accept()
                except socket.timeout:
                    continue
                if self.connections >= self.max_connections:
                    _close(client)
                    continue
                self.connections += 1
                try:
                    upstream = socket.create_connection(self.upstream, timeout=10)
                except OSError:
                    _close(client)
                    continue
                with self._lock:
                    self._socks.update((client, upstream))
                state = {"down": 0}
                for src, dst, down in ((client, upstream, False), (upstream, client, True)):
                    threading.Thread(target=self._pump, args=(src, dst, down, client, upstream, state),
                                     daemon=True).start()
        finally:
            _close(self._listener)
            self._stop.set()

    def _pump(self, src, dst, down: bool, client, upstream, state: dict) -> None:
        src.settimeout(0.5)
        try:
            while not self._stop.is_set() and time.monotonic() < self.deadline:
                try:
                    data = src.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    break
                if down:
                    room = self.reset_after_bytes - state["down"]
                    if len(data) > room and self._take_reset():
                        if room > 0:
                            dst.sendall(data[:room])
                        _reset(client)
                        _close(upstream)
                        return
                    state["down"] += len(data)
                dst.sendall(data)
            try:
                dst.shutdown(socket.SHUT_WR)  # pass the half-close on, as TCP does
            except OSError:
                pass
        except OSError:
            _close(client)
            _close(upstream)

    def _take_reset(self) -> bool:
        with self._lock:
            if self.resets_left is not None and self.resets_left <= 0:
                return False
            if self.resets_left is not None:
                self.resets_left -= 1
            self.resets_done += 1
            return True


def _reset(s: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN, the peer sees ECONNRESET."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _close(s)


def _close(s: socket.socket) -> None:
    try:
        s.close()
    except OSError:
        pass
