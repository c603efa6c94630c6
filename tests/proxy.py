"""A TCP proxy in front of a server, that a test can take down at a chosen request.

``CutProxy(port, cut_at, nth)`` listens on a loopback port of its own and forwards every
connection to ``127.0.0.1:port``. When the ``nth`` request from a client matching the ``cut_at``
pattern (bytes, e.g. ``rb"PUT /[^ ]*\\.avro"``) comes, it is not forwarded and the proxy goes down: every
open connection is closed and its port refuses new ones, as a stopped server's would, while the
server behind it keeps its state (moto's S3 holds its objects in memory: stopping it for real
would lose the bucket). ``up()`` listens on the same port again.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading

from keel.devservers import free_port


class CutProxy:
    def __init__(self, port: int, cut_at: bytes | None = None, nth: int = 1) -> None:
        self.target = ("127.0.0.1", port)
        self.port = free_port()
        self.cut_at = re.compile(cut_at) if cut_at else None
        self.nth = nth
        self.matches = 0
        self.cuts = 0
        self.forwarded: list[bytes] = []  # the first line of every request passed on
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> CutProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        """Close the port and every connection through it."""
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, set()
        for sock in [listener, *sockets]:
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # the listener was closed: the proxy is down
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # went down meanwhile
                    client.close()
                    server.close()
                    return
                self._sockets |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if requests and self._cut_here(chunk):
                    self.down()
                    return
                if requests and re.match(rb"[A-Z]+ /", chunk):
                    self.forwarded.append(chunk.split(b"\r\n", 1)[0])
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _cut_here(self, chunk: bytes) -> bool:
        with self._lock:
            if self.cut_at is None or not self.cut_at.match(chunk):
                return False
            self.matches += 1
            if self.matches < self.nth:
                return False
            self.cuts += 1
            self.cut_at = None  # once: after up() the same request passes
            return True

    def __enter__(self) -> CutProxy:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()
