"""A real upstream service on loopback that records every call it gets."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import attrs
from waitress.server import create_server

from dais_wsgi.server import BackgroundServer

__all__ = ["Call", "RawUpstream", "Upstream"]


@attrs.define
class Call:
    """One request the upstream received."""

    method: str
    target: str
    query: str
    body: bytes
    headers: dict[str, str]
    #: The caller's address and port, to tell one connection from another.
    peer: tuple[str, str]


class Upstream:
    """A real WSGI service on loopback that records every call."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.status = "200 OK"
        self.delay = 0.0
        self.drip = 0
        self.server = create_server(
            self.app,
            host="127.0.0.1",
            port=0,
            threads=4,
            clear_untrusted_proxy_headers=False,
        )
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        self.runner = BackgroundServer(self.server).start()

    def app(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        body = environ["wsgi.input"].read()
        headers = {
            k[5:].replace("_", "-").lower(): v
            for k, v in environ.items()
            if k.startswith("HTTP_")
        }
        if environ.get("CONTENT_TYPE"):
            headers["content-type"] = environ["CONTENT_TYPE"]
        self.calls.append(
            Call(
                environ["REQUEST_METHOD"],
                environ["REQUEST_URI"],
                environ.get("QUERY_STRING", ""),
                body,
                headers,
                (environ["REMOTE_ADDR"], environ["REMOTE_PORT"]),
            )
        )
        if self.delay:
            time.sleep(self.delay)
        if self.drip:
            start_response(self.status, [("Content-Type", "text/plain")])
            return self._dripping(self.drip)
        payload = b'{"secret": "upstream data never reaches the caller"}'
        start_response(
            self.status,
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(payload))),
            ],
        )
        return [payload]

    def _dripping(self, count: int) -> Iterator[bytes]:
        for _ in range(count):
            time.sleep(0.2)
            yield b"drip\n"

    def close(self) -> None:
        self.runner.stop()


class RawUpstream:
    """A loopback upstream that answers every request with fixed bytes.

    For answers no WSGI server would send: interim statuses, broken status
    lines, connections closed shortly after an answer. Each connection is
    served on a thread of its own; requests are read by their
    ``Content-Length``.

    Args:
        answer: The bytes sent back for each request.
        close_after: Seconds after an answer at which the connection is
            closed (``None`` keeps it open).
        answers: Requests answered on each connection; the next one is read
            whole and the connection closed without an answer (``None``
            answers them all).
        late: Bytes sent 0.1 s after each answer, on the open connection.
        pace: Seconds between the answer's bytes, sent one at a time (0 sends
            it at once).
        first: Bytes sent at once before the answer (a status line, say,
            before a paced head).
    """

    def __init__(
        self,
        answer: bytes,
        close_after: float | None = None,
        answers: int | None = None,
        late: bytes = b"",
        pace: float = 0.0,
        first: bytes = b"",
    ) -> None:
        self.answer = answer
        self.first = first
        self.pace = pace
        self.close_after = close_after
        self.answers = answers
        self.late = late
        self.requests: list[bytes] = []
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._stopping = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        """Stop accepting; connections being served end on their own."""
        self._stopping.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        # A client may drop a connection it saw bytes on: that ends it too.
        with contextlib.suppress(ConnectionError):
            self._converse(conn)

    def _send(self, conn: socket.socket) -> None:
        if self.first:
            conn.sendall(self.first)
        if not self.pace:
            conn.sendall(self.answer)
            return
        for byte in self.answer:
            if self._stopping.is_set():
                return
            conn.sendall(bytes([byte]))
            time.sleep(self.pace)

    def _converse(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        buffered = b""
        answered = 0
        with conn:
            while not self._stopping.is_set():
                while b"\r\n\r\n" not in buffered:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffered += chunk
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buffered) < length:
                    buffered += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + buffered[:length])
                buffered = buffered[length:]
                if self.answers is not None and answered == self.answers:
                    return
                answered += 1
                self._send(conn)
                if self.late:
                    time.sleep(0.1)
                    conn.sendall(self.late)
                if self.close_after is not None:
                    time.sleep(self.close_after)
                    return
