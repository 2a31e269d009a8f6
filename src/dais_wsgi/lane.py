"""Forward plain webhook calls from the event loop, without a worker thread.

A webhook call normally goes the way of every request: the event loop reads
it, a worker thread runs the Falcon application, and the worker waits on the
upstream. Most calls are small and ordinary, and for them that way costs
more than the forwarding itself: the hand-over to the worker, the WSGI
environment, Falcon's request and response, and a GIL round trip for every
step libcurl takes (``docs/performance.md``).

:class:`GatewayLane` takes such a call in the event loop as soon as it is
read, makes the same decision the application makes, and sends it upstream
through :class:`~dais_adapters.curl.CurlLoop`, which runs on the loop
itself; the answer is written when the upstream's comes. It takes a call
only when everything it needs is in hand and nothing could block the loop:

- an HTTP/1.1 request in origin form, its whole body (up to 64 KiB, not
  chunked) read with its head, and no answer still owed on the connection;
- the key and the project's services in the caches, fresh;
- the key allowed to call that route, under its cap on calls in flight;
- no per-key webhook throttle (it may live in Redis), and no plugin
  listening to forward records (it may do I/O).

Every other call, and every call the decision refuses, goes to the
application as before, which decides it again and answers it: refusals, and
the headers and bodies that go with them, have one home. A call the lane
took ends here: the upstream's status, or 502/504 as the application would
answer them, with the same headers, record, metrics and access log line.
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

import attrs
import falcon
from waitress.channel import ClientDisconnected, HTTPChannel
from waitress.proxy_headers import PROXY_HEADERS
from waitress.utilities import build_http_date

from dais_adapters.cache import CachedKeyStore, CachedRegistry, cause_of
from dais_adapters.curl import CurlForwarder, CurlLoop, Outcome
from dais_core.errors import DaisError, Unavailable, status_for
from dais_core.gateway import (
    GatewayCall,
    parse_gateway_path,
    relayable_status,
    upstream_headers,
    valid_request_id,
)
from dais_core.ports import ForwardRequest
from dais_core.usecases import Route, authenticate, authorise_call
from dais_core.values import (
    Credential,
    ForwardRecord,
    PublishRecord,
    ServiceEndpoint,
)
from dais_wsgi.app import caller_scheme, log_request
from dais_wsgi.bootstrap import Runtime
from dais_wsgi.metrics import Metrics
from dais_wsgi.streaming import asks_to_close

__all__ = ["GatewayLane"]

errors_log = logging.getLogger("dais.errors")

WEBHOOKS_PATH = "/project-gateway/webhooks/"
#: The largest body the lane takes; a larger one streams through a worker.
MAX_LANE_BODY = 64 * 1024
#: Answers that carry no body and so no ``Content-Length`` (RFC 9110, 8.6).
_BODILESS = frozenset({204, 304})


class _Cold(Exception):
    """What the lane needs is not in the caches: the application reads it."""


class _WarmKeys:
    """The key cache, answering only from memory."""

    def __init__(self, keys: CachedKeyStore) -> None:
        self.keys = keys

    def load(self, key_id: str) -> Credential | None:
        found = self.keys.cached(key_id)
        if found is None:
            raise _Cold(key_id)
        return found[0]

    def record_publish(self, record: PublishRecord) -> None:
        self.keys.record_publish(record)

    def record_forward(self, record: ForwardRecord) -> None:
        self.keys.record_forward(record)


class _WarmRegistry:
    """The service cache, answering only from memory."""

    def __init__(self, registry: CachedRegistry) -> None:
        self.registry = registry

    def endpoints(self, project: str) -> Sequence[ServiceEndpoint]:
        found = self.registry.cached(project)
        if found is None:
            raise _Cold(project)
        return found


class _CurlSocket:
    """One of libcurl's sockets, as the event loop's map holds a channel."""

    accepting = False

    def __init__(self, lane: GatewayLane, fd: int) -> None:
        self.lane = lane
        self.fd = fd
        self.events = 0

    def readable(self) -> bool:
        return bool(self.events & CurlLoop.READ)

    def writable(self) -> bool:
        return bool(self.events & CurlLoop.WRITE)

    def handle_read_event(self) -> None:
        self.lane.ready(self, CurlLoop.READ)

    def handle_expt_event(self) -> None:
        self.lane.ready(self, CurlLoop.READ)

    def handle_write_event(self) -> None:
        self.lane.ready(self, CurlLoop.WRITE)

    def handle_close(self) -> None:
        # Hung up or failed: libcurl learns which when it tries what it
        # waits for.
        self.lane.ready(self, self.events or CurlLoop.READ)

    def handle_error(self) -> None:
        errors_log.exception("forwarding from the event loop failed")

    def close(self) -> None:
        """Leave the socket to libcurl, which owns it."""


@attrs.define
class _Call:
    """A call the lane took, until its answer is written."""

    channel: Any
    request: Any
    request_id: str
    key_id: str
    project: str
    service: str
    route: str
    lineage_version: int
    bytes_in: int
    #: ``time.perf_counter()`` values: the call read, and sent upstream.
    started: float
    forwarded: float = 0.0
    #: The caller asked to close the connection after the answer.
    closing: bool = False


class GatewayLane:
    """Take plain webhook calls in the event loop (see the module docstring).

    Args:
        runtime: The wired gateway.
        metrics: The application's metrics.
        server: The waitress server whose event loop drives the lane.
    """

    def __init__(self, runtime: Runtime, metrics: Metrics, server: Any) -> None:
        forwarder = runtime.forwarder
        assert isinstance(forwarder, CurlForwarder)
        assert isinstance(runtime.keys, CachedKeyStore)
        assert isinstance(runtime.registry, CachedRegistry)
        self.runtime = runtime
        self.metrics = metrics
        self.ident = server.adj.ident
        self.url_scheme = server.adj.url_scheme
        self.max_body = min(MAX_LANE_BODY, runtime.settings.max_gateway_body)
        #: Calls the lane took.
        self.taken = 0
        self._map: dict[int, Any] = server._map
        self._adj = server.adj
        self._keys = _WarmKeys(runtime.keys)
        self._registry = _WarmRegistry(runtime.registry)
        self._trusted = runtime.settings.trust_forwarded
        self.curl = CurlLoop(forwarder.options, self._watch)

    @staticmethod
    def fits(runtime: Runtime) -> bool:
        """Whether the lane can serve this runtime's calls at all."""
        return (
            isinstance(runtime.forwarder, CurlForwarder)
            and isinstance(runtime.keys, CachedKeyStore)
            and isinstance(runtime.registry, CachedRegistry)
            and runtime.gateway_throttle is None
            and not runtime.hooks.dais_forward_recorded.get_hookimpls()
        )

    # -- the event loop's side ----------------------------------------------

    def timeout(self, longest: float) -> float:
        """Return how long the loop may wait for its sockets, at most ``longest``."""
        deadline = self.curl.deadline
        if deadline is None:
            return longest
        return max(0.0, min(longest, deadline - time.monotonic()))

    def tick(self) -> None:
        """Let libcurl act on its timer if it is due; call after each loop turn."""
        deadline = self.curl.deadline
        if deadline is not None and deadline <= time.monotonic():
            self.curl.expire()

    def ready(self, sock: _CurlSocket, events: int) -> None:
        """Pass a ready socket of libcurl's on, if it is still libcurl's."""
        if self._map.get(sock.fd) is sock:
            self.curl.ready(sock.fd, events)

    def close(self) -> None:
        """Abandon the calls under way (the server is stopping)."""
        for fd, dispatcher in list(self._map.items()):
            if isinstance(dispatcher, _CurlSocket):
                self._unmap(fd)
        self.curl.close()

    def _watch(self, fd: int, events: int) -> None:
        dispatcher = self._map.get(fd)
        if not events:
            if isinstance(dispatcher, _CurlSocket):
                self._unmap(fd)
            return
        if not isinstance(dispatcher, _CurlSocket):
            dispatcher = _CurlSocket(self, fd)
            self._map[fd] = dispatcher
            # waitress stops taking connections once its map holds
            # connection_limit sockets: an upstream's is not a caller's.
            self._adj.connection_limit += 1
        dispatcher.events = events

    def _unmap(self, fd: int) -> None:
        del self._map[fd]
        self._adj.connection_limit -= 1

    # -- taking a call ------------------------------------------------------

    def take(self, channel: HTTPChannel, request: Any) -> bool:
        """Start forwarding ``request`` if the lane can; ``False`` leaves it.

        The caller holds the channel's ``requests_lock`` and has checked
        that no answer is owed on the channel; a call taken is queued there
        as the one being answered.
        """
        if not self._plain(request, self.max_body):
            return False
        started = time.perf_counter()
        decided = self._decide(request)
        if decided is None:
            return False
        key_id, gateway_call, route = decided
        body = b""
        if request.body_rcv is not None:
            body = request.get_body_stream().read()
        call = _Call(
            channel,
            request,
            _request_id(request.headers),
            key_id,
            gateway_call.project,
            gateway_call.service,
            gateway_call.route,
            route.endpoint.lineage_version,
            # A HEAD's body is never sent (nor read, by the application).
            0 if request.command == "HEAD" else len(body),
            started,
            closing=asks_to_close(request.headers.get("CONNECTION", "")),
        )
        forwarded = ForwardRequest(
            request.command,
            route.url,
            self._upstream_headers(channel, request, call),
            io.BytesIO(body) if body else None,
            len(body) or None,
        )
        if not self._start(call, forwarded, body):
            return False
        channel.requests.append(request)
        self.taken += 1
        self.metrics.in_loop.inc()
        return True

    def _start(self, call: _Call, forwarded: ForwardRequest, body: bytes) -> bool:
        """Hand the call to libcurl; ``False`` if it could not be set up."""
        try:
            self.curl.start(
                forwarded, body, lambda outcome: self._answer(call, outcome)
            )
        except BaseException as exc:
            self.runtime.gateway_in_flight.release(call.key_id)
            if not isinstance(exc, DaisError):
                raise
            # Not started (out of descriptors, say): the application tries
            # it, and answers whatever comes of that.
            if call.request.body_rcv is not None:
                call.request.get_body_stream().seek(0)
            return False
        call.forwarded = time.perf_counter()
        return True

    def _decide(self, request: Any) -> tuple[str, GatewayCall, Route] | None:
        """Make the application's decision from the caches alone.

        Returns:
            The key id, the call and its route, with the key's place among
            its calls in flight taken; ``None`` when the application must
            decide (a refusal, or something not cached).
        """
        path, question, query = str(request.request_uri).partition("?")
        try:
            credential = authenticate(
                self._keys,
                _header(request.headers, "AUTHORIZATION"),
                self.runtime.clock(),
            )
            gateway_call = parse_gateway_path(path)
            route = authorise_call(
                credential,
                gateway_call,
                request.command,
                query if question else None,
                self._registry,
            )
            self.runtime.gateway_in_flight.acquire(credential.key.id)
        except (DaisError, _Cold):
            return None
        return credential.key.id, gateway_call, route

    @staticmethod
    def _plain(request: Any, max_body: int) -> bool:
        return bool(
            request.version == "1.1"
            and not request.chunked
            and not request.expect_continue
            and request.content_length <= max_body
            and str(request.request_uri).startswith(WEBHOOKS_PATH)
        )

    def _upstream_headers(
        self, channel: HTTPChannel, request: Any, call: _Call
    ) -> tuple[tuple[str, str], ...]:
        """The headers the application would send for this call."""
        headers = request.headers
        caller = []
        for name, value in headers.items():
            if name in ("CONTENT_LENGTH", "CONTENT_TYPE"):
                continue
            if not self._trusted and name in PROXY_HEADERS:
                continue
            # As waitress hands them to the application: values stripped.
            caller.append((name.replace("_", "-").title(), value.strip()))
        content_type = headers.get("CONTENT_TYPE", "").strip()
        if content_type:
            caller.append(("Content-Type", content_type))
        return upstream_headers(
            caller,
            client=channel.addr[0] if channel.addr else "",
            proto=caller_scheme(
                self.url_scheme, _header(headers, "X_FORWARDED_PROTO"), self._trusted
            ),
            host=_header(headers, "HOST") or "",
            request_id=call.request_id,
            key_id=call.key_id,
            project=call.project,
            trusted_chain=(
                _header(headers, "X_FORWARDED_FOR") if self._trusted else None
            ),
        )

    # -- answering ----------------------------------------------------------

    def _answer(self, call: _Call, outcome: Outcome) -> None:
        self.runtime.gateway_in_flight.release(call.key_id)
        try:
            if isinstance(outcome, DaisError):
                raise outcome
            self.metrics.upstream.observe(time.perf_counter() - call.forwarded)
            self._record(call, outcome)
            status = relayable_status(outcome)
            head = self._head(
                call, status, [("Dais-Lineage-Version", str(call.lineage_version))]
            )
            self._send(call, status, head)
        except DaisError as exc:
            self._refuse(call, exc)
        except Exception:
            errors_log.exception("request %s crashed", call.request_id)
            error = {"error": "internal_error", "message": "internal error"}
            self._send_json(call, 500, error)

    def _refuse(self, call: _Call, exc: DaisError) -> None:
        status = status_for(exc)
        if status == 500 or isinstance(exc, Unavailable):
            errors_log.warning(
                "request %s failed: %s%s", call.request_id, exc.message, cause_of(exc)
            )
        self._send_json(call, status, exc.body())

    def _send_json(self, call: _Call, status: int, document: dict[str, Any]) -> None:
        body = json.dumps(document, ensure_ascii=False).encode()
        head = self._head(
            call,
            status,
            [("Content-Type", "application/json")],
            length=len(body),
        )
        self._send(call, status, head + body)

    def _head(
        self,
        call: _Call,
        status: int,
        extra: list[tuple[str, str]],
        length: int = 0,
    ) -> bytes:
        headers = [*extra, ("X-Request-Id", call.request_id)]
        if status not in _BODILESS:
            headers.append(("Content-Length", str(length)))
            if not length:
                # As Falcon labels every answer that may have a body.
                headers.append(("Content-Type", "application/json"))
        headers.append(("Date", build_http_date(time.time())))
        headers.append(("Server", self.ident))
        if call.closing:
            headers.append(("Connection", "close"))
        headers.sort()
        lines = [f"HTTP/1.1 {falcon.code_to_http_status(status)}"]
        lines += [f"{name}: {value}" for name, value in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send(self, call: _Call, status: int, data: bytes) -> None:
        channel, request = call.channel, call.request
        closing = call.closing
        try:
            channel.write_soon(data)
        except ClientDisconnected:  # the client left: nothing to write to
            closing = True
        with channel.requests_lock:
            if channel.requests and channel.requests[0] is request:
                channel.requests.pop(0)
            request.close()
            if closing:
                channel.close_when_flushed = True
                for queued in channel.requests:
                    queued.close()
                channel.requests = []
            elif channel.requests:
                channel.server.add_task(channel)
            elif _waits_to_continue(channel):
                # As waitress does once the answers owed are out.
                channel.send_continue()
        channel.last_activity = time.time()
        self.metrics.requests.labels("gateway", str(status)).inc()
        log_request(
            request.command,
            "gateway",
            str(status),
            request.content_length or 0,
            call.started,
            call.key_id,
            call.request_id,
        )

    def _record(self, call: _Call, status: int) -> None:
        record = ForwardRecord(
            key_id=call.key_id,
            project=call.project,
            service=call.service,
            lineage_version=call.lineage_version,
            method=call.request.command,
            route=call.route,
            status=status,
            latency=time.perf_counter() - call.forwarded,
            bytes_in=call.bytes_in,
            request_id=call.request_id,
            at=self.runtime.clock(),
        )
        try:
            self.runtime.keys.record_forward(record)
        except DaisError as exc:
            errors_log.warning(
                "could not record forward %s: %s", record.request_id, exc
            )


def _waits_to_continue(channel: Any) -> bool:
    """Whether a request read after the call waits for ``100 Continue``."""
    waiting = channel.request
    return bool(
        channel.connected
        and waiting is not None
        and waiting.expect_continue
        and waiting.headers_finished
        and not channel.sent_continue
    )


def _request_id(headers: dict[str, str]) -> str:
    """The caller's request id if well-formed, else a new one."""
    given = _header(headers, "X_REQUEST_ID")
    if given is not None and valid_request_id(given):
        return given
    return uuid.uuid4().hex


def _header(headers: dict[str, str], name: str) -> str | None:
    """A request header as the application reads it: stripped, or ``None``."""
    value = headers.get(name)
    return None if value is None else value.strip()
