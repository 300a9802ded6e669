"""A TCP forwarder on loopback whose one direction is slow: a test double for a slow network
between a daemon and its Redis (a 100 Mbit/s link, or worse). Everything a client sends is
passed on at `bytes_per_s` at most; what comes back passes at once, or at `back_bytes_per_s`.

    with SlowLink(target_port, bytes_per_s=2 << 20) as link:
        url = f"redis://127.0.0.1:{link.port}/0"
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

from tests.daemon import free_port

_PIECE = 16 << 10


class SlowLink:
    def __init__(self, target_port: int, bytes_per_s: int, back_bytes_per_s: int = 0) -> None:
        self.port = free_port()
        self._target = ("127.0.0.1", target_port)
        self._rate, self._back_rate = bytes_per_s, back_bytes_per_s
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._stopped = threading.Event()
        self._sockets: list[socket.socket] = []

    def __enter__(self) -> SlowLink:
        threading.Thread(target=self._accept, daemon=True, name="slowlink-accept").start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stopped.set()
        self._listener.close()
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _address = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._target)
            self._sockets += [client, server]
            pumps = ((client, server, self._rate), (server, client, self._back_rate))
            for source, sink, rate in pumps:
                threading.Thread(target=self._pump, args=(source, sink, rate),
                                 daemon=True, name="slowlink-pump").start()

    def _pump(self, source: socket.socket, sink: socket.socket, rate: int) -> None:
        """Pass bytes on; `rate` (bytes a second, 0: no limit) paces them piece by piece."""
        try:
            while data := source.recv(_PIECE):
                sink.sendall(data)
                if rate:
                    self._stopped.wait(len(data) / rate)
        except OSError:
            return  # one end closed: the finally closes the other
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
