"""A TCP proxy in front of a loopback HTTP server (moto) that can throttle, reset or freeze it: S3 faults on cue."""

from __future__ import annotations

import socket
import struct
import threading

SLOW_DOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
             b"<Message>Please reduce your request rate.</Message></Error>")


class FaultyProxy:
    """A TCP proxy on 127.0.0.1 in front of an HTTP server, switchable between three behaviours:

    pass: bytes flow both ways untouched; reset: every connection is cut with a TCP reset, as a crashing server
    does; 503: every request is answered `503 SlowDown`, as S3 does when throttling; stall: connections are
    accepted and never answered, as by a frozen (SIGSTOPped) server, and stay so after a switch until close().
    Every switch cuts the connections open at that moment, so pooled connections cannot outlive their mode.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.mode = "pass"
        self.faults = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._stalled: list[socket.socket] = []
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_mode(self, mode: str) -> None:
        assert mode in ("pass", "reset", "503", "stall")
        with self._lock:
            self.mode = mode
            for connection in self._open:
                _reset(connection)
            self._open.clear()

    def close(self) -> None:
        self._listener.close()
        self.set_mode("reset")
        for connection in self._stalled:
            _reset(connection)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                mode = self.mode
                if mode == "reset":
                    self.faults += 1
                    _reset(client)
                    continue
                if mode == "stall":
                    self.faults += 1
                    self._stalled.append(client)
                    continue
            target = self._pass if mode == "pass" else self._answer_503
            threading.Thread(target=target, args=(client,), daemon=True).start()

    def _pass(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            upstream.settimeout(None)
        except OSError:
            _reset(client)
            return
        with self._lock:
            if self.mode != "pass":
                _reset(client)
                upstream.close()
                return
            self._open.update((client, upstream))
        threading.Thread(target=_copy, args=(upstream, client), daemon=True).start()
        _copy(client, upstream)

    def _answer_503(self, client: socket.socket) -> None:
        """Read each request's head (and body, unless the client waits for `100-continue`) and answer 503."""
        with self._lock:
            if self.mode != "503":
                _reset(client)
                return
            self._open.add(client)
        client.settimeout(10)
        buffered = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffered:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    buffered += chunk
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                fields = dict((name.strip().lower(), value.strip()) for name, _, value in
                              (line.partition(b":") for line in head.split(b"\r\n")[1:]))
                with self._lock:
                    self.faults += 1
                body = b"" if head.startswith(b"HEAD ") else SLOW_DOWN
                response = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                            b"Content-Length: %d\r\n" % len(SLOW_DOWN))
                if fields.get(b"expect", b"").lower() == b"100-continue":
                    client.sendall(response + b"Connection: close\r\n\r\n" + body)
                    return
                remaining = int(fields.get(b"content-length", b"0")) - len(buffered)
                while remaining > 0:
                    chunk = client.recv(min(65536, remaining))
                    if not chunk:
                        return
                    remaining -= len(chunk)
                buffered = b""
                client.sendall(response + b"\r\n" + body)
        except OSError:
            pass
        finally:
            client.close()


def _copy(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, target):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _reset(connection: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP reset, not an orderly end."""
    try:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()
    except OSError:
        pass
