"""A real upstream service on loopback that records every call it gets."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import attrs
from waitress.server import create_server

from dais_wsgi.server import BackgroundServer

__all__ = ["Call", "Upstream"]


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
