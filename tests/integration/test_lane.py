"""Webhook calls forwarded from the event loop (``dais_wsgi.lane``).

The lane must answer exactly as the application would, and leave to the
application every call it cannot take whole. Each test runs a real gateway
on loopback and a real upstream.
"""

from __future__ import annotations

import os
import re
import resource
import socket
import threading
import time
from typing import Any

import pytest

from dais_adapters.hooks import hookimpl
from dais_core.policies import RatePolicy
from dais_wsgi.server import make_server, run_until, wake
from tests.integration.conftest import FAST, Gateway
from tests.integration.test_cli import key_for_service, serving_process
from tests.upstream import RawUpstream, Upstream

pytestmark = pytest.mark.integration

BASE = "/project-gateway/webhooks"
PATH = f"{BASE}/p1/lineage-version/1/svc/api/webhook"


def start(
    start_gateway: Any, upstream_url: str, **overrides: Any
) -> tuple[Gateway, str]:
    """A gateway with one service and a key that may call it."""
    gateway = start_gateway(**FAST, **overrides)
    gateway.add_service("p1", 1, "svc", upstream_url)
    _, token = gateway.make_key(permissions=(("svc", "/api/webhook"),))
    return gateway, token


def send(gateway: Gateway, request: bytes, answers: int = 1) -> bytes:
    """Send raw bytes on one connection; read until ``answers`` heads and bodies are in."""
    port = int(gateway.url.rsplit(":", 1)[1])
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        while len(_answers(received)) < answers:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return received


def _answers(data: bytes) -> list[bytes]:
    """Split a stream of answers, each with its Content-Length body."""
    found = []
    while b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        length = int(match.group(1)) if match else 0
        if len(rest) < length:
            break
        found.append(head + b"\r\n\r\n" + rest[:length])
        data = rest[length:]
    return found


def post(token: str, body: bytes = b'{"n": 1}', extra: str = "") -> bytes:
    return (
        f"POST {PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
        f"X-Request-Id: fixed-id-1\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def without_date(answer: bytes) -> bytes:
    return re.sub(rb"\r\nDate: [^\r]*", b"", answer)


def taken(gateway: Gateway) -> int:
    return int(gateway.lane.taken)


class TestTaken:
    """Which calls the lane takes."""

    def test_a_call_with_its_key_cached_is_taken(self, start_gateway, upstream):
        """A key in use is forwarded from the loop, and the upstream gets it."""
        gateway, token = start(start_gateway, upstream.url)
        gateway.warm(token, PATH)
        answer = send(gateway, post(token))
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert taken(gateway) == 1
        assert upstream.calls[-1].body == b'{"n": 1}'
        assert upstream.calls[-1].target == "/api/webhook"

    def test_a_first_call_goes_to_a_worker_and_warms_the_next(
        self, start_gateway, upstream
    ):
        """The caches are filled by the application; the lane never reads a store."""
        gateway, token = start(start_gateway, upstream.url)
        first = send(gateway, post(token))
        second = send(gateway, post(token))
        assert first.startswith(b"HTTP/1.1 200 OK\r\n")
        assert second.startswith(b"HTTP/1.1 200 OK\r\n")
        assert taken(gateway) == 1
        assert len(upstream.calls) == 2

    @pytest.mark.parametrize(
        "request_bytes",
        [
            # A body larger than the lane takes.
            lambda token: post(token, b"x" * (64 * 1024 + 1)),
            # A chunked body.
            lambda token: (
                f"POST {PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}"
                "\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
            ).encode(),
            # HTTP/1.0.
            lambda token: (
                f"GET {PATH} HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n"
            ).encode(),
            # An absolute target.
            lambda token: (
                f"GET http://gw{PATH} HTTP/1.1\r\nHost: gw\r\n"
                f"Authorization: Bearer {token}\r\n\r\n"
            ).encode(),
        ],
        ids=["large-body", "chunked", "http-1.0", "absolute-target"],
    )
    def test_calls_the_lane_cannot_take_whole_go_to_a_worker(
        self, start_gateway, upstream, request_bytes
    ):
        """They are forwarded as before, by the application."""
        gateway, token = start(start_gateway, upstream.url)
        gateway.warm(token, PATH)
        answer = send(gateway, request_bytes(token))
        assert re.match(rb"HTTP/1\.[01] 200 OK\r\n", answer), answer[:200]
        assert taken(gateway) == 0
        assert len(upstream.calls) == 1

    @pytest.mark.parametrize(
        ("overrides", "plugins"),
        [
            ({"gateway_rate": RatePolicy(rate=100, burst=100)}, ()),
            ({"forwarder": "urllib3"}, ()),
            ({"gateway_lane": False}, ()),
            ({}, ("listener",)),
        ],
        ids=["gateway-throttle", "urllib3", "lane-off", "record-listener"],
    )
    def test_no_lane_where_it_could_block_or_is_off(
        self, start_gateway, upstream, overrides, plugins
    ):
        """A throttle that may live in Redis, another client, or a listener: no lane."""

        class Listener:
            @hookimpl
            def dais_forward_recorded(self, record: Any) -> None:
                self.record = record

        chosen = tuple(Listener() for _ in plugins)
        gateway = start_gateway(chosen, **FAST, **overrides)
        assert gateway.lane is None
        gateway.add_service("p1", 1, "svc", upstream.url)
        _, token = gateway.make_key(permissions=(("svc", "/api/webhook"),))
        gateway.warm(token, PATH)
        assert send(gateway, post(token)).startswith(b"HTTP/1.1 200 OK\r\n")

    def test_a_refused_call_is_answered_by_the_application(
        self, start_gateway, upstream
    ):
        """A route outside the key's permissions: 403 from the application."""
        gateway, token = start(start_gateway, upstream.url)
        gateway.warm(token, PATH)
        request = post(token).replace(b"/api/webhook", b"/api/other", 1)
        answer = send(gateway, request)
        assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        assert b'"error": "forbidden"' in answer
        assert taken(gateway) == 0
        assert upstream.calls == []


class TestSameAnswers:
    """The lane answers byte for byte as the application does, but for Date."""

    @pytest.mark.parametrize(
        "status",
        [
            "200 OK",
            "201 Created",
            "204 No Content",
            "404 Not Found",
            "503 Service Unavailable",
        ],
    )
    @pytest.mark.parametrize(
        "extra", ["", "Connection: close\r\n"], ids=["kept", "close"]
    )
    def test_the_upstreams_status(self, start_gateway, upstream, status, extra):
        """The status, headers and empty body match the application's."""
        upstream.status = status
        answers = []
        for lane in (True, False):
            gateway, token = start(start_gateway, upstream.url, gateway_lane=lane)
            gateway.warm(token, PATH)
            answers.append(without_date(send(gateway, post(token, extra=extra))))
            if lane:
                assert taken(gateway) == 1
        assert answers[0] == answers[1]
        assert answers[0].startswith(f"HTTP/1.1 {status}\r\n".encode())
        # The same headers went upstream, but for the two keys' ids.
        sent = [dict(call.headers) for call in upstream.calls]
        assert sent[0].pop("x-dais-key-id") != sent[1].pop("x-dais-key-id")
        assert sent[0] == sent[1]

    @pytest.mark.parametrize("trusted", [False, True], ids=["own-chain", "trusted"])
    def test_the_headers_sent_upstream(self, start_gateway, upstream, trusted):
        """Caller headers, forwarding chain and scheme go up as the application sends them."""
        extra = (
            "X-Forwarded-For: 203.0.113.9 \r\nX-Forwarded-Proto: https\r\n"
            "Forwarded: for=x\r\nX-Custom:  padded value \r\nConnection: x-hop\r\n"
            "X-Hop: 1\r\nCookie: c=1\r\n"
        )
        for lane in (True, False):
            gateway, token = start(
                start_gateway, upstream.url, gateway_lane=lane, trust_forwarded=trusted
            )
            gateway.warm(token, PATH)
            assert send(gateway, post(token, extra=extra)).startswith(b"HTTP/1.1 200")
            if lane:
                assert taken(gateway) == 1
        sent = [dict(call.headers) for call in upstream.calls]
        assert sent[0].pop("x-dais-key-id") != sent[1].pop("x-dais-key-id")
        assert sent[0] == sent[1]
        assert "cookie" not in sent[0] and "x-hop" not in sent[0]

    @pytest.mark.parametrize("method", ["POST", "HEAD"])
    def test_the_record(self, start_gateway, upstream, method):
        """The forward record is the application's, a HEAD's unsent body included."""
        records = []
        for lane in (True, False):
            gateway, token = start(start_gateway, upstream.url, gateway_lane=lane)
            gateway.warm(token, PATH)
            request = post(token, b"abcde").replace(b"POST", method.encode(), 1)
            assert send(gateway, request).startswith(b"HTTP/1.1 200 OK\r\n")
            gateway.flush()
            key_id = token.split("_")[1]
            (record,) = gateway.store.forwards(key_id)
            records.append(record)
        for record in records:
            for varying in ("key_id", "latency", "at"):
                record.pop(varying, None)
        assert records[0] == records[1]
        assert records[0]["bytes_in"] == (5 if method == "POST" else 0)

    def test_an_unreachable_upstream(self, start_gateway):
        """502 with the same JSON body."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            answers = []
            for lane in (True, False):
                gateway, token = start(start_gateway, url, gateway_lane=lane)
                gateway.warm(token, PATH)
                answers.append(without_date(send(gateway, post(token))))
        assert answers[0] == answers[1]
        assert answers[0].startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
        assert b'"error": "upstream_unreachable"' in answers[0]

    def test_a_slow_upstream(self, start_gateway, upstream):
        """504 once the call's cap (connect + read timeouts) passes."""
        upstream.delay = 3.0
        answers = []
        for lane in (True, False):
            gateway, token = start(
                start_gateway,
                upstream.url,
                gateway_lane=lane,
                connect_timeout=0.5,
                read_timeout=1.0,
            )
            gateway.warm(token, PATH)
            started = time.monotonic()
            answers.append(without_date(send(gateway, post(token))))
            assert time.monotonic() - started < 2.5
        assert answers[0] == answers[1]
        assert answers[0].startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")

    def test_a_broken_answer(self, start_gateway):
        """An answer with no status to relay is a 502."""
        raw = RawUpstream(b"HTTP/1.1 0200 OK\r\nContent-Length: 0\r\n\r\n")
        try:
            gateway, token = start(start_gateway, raw.url)
            gateway.warm(token, PATH)
            answer = send(gateway, post(token))
        finally:
            raw.close()
        assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
        assert taken(gateway) == 1


class TestConnections:
    """The caller's connection around a call the lane took."""

    def test_pipelined_calls_are_answered_in_order(self, start_gateway, upstream):
        """Three calls sent at once get three answers, in the order sent."""
        gateway, token = start(start_gateway, upstream.url)
        gateway.warm(token, PATH)
        request = b"".join(
            post(token, extra=f"X-N: {n}\r\n").replace(
                b"fixed-id-1", f"id-{n}".encode()
            )
            for n in range(3)
        )
        answers = _answers(send(gateway, request, answers=3))
        ids = [re.search(rb"X-Request-Id: ([^\r]+)", a).group(1) for a in answers]
        assert ids == [b"id-0", b"id-1", b"id-2"]
        assert [call.headers["x-n"] for call in upstream.calls] == ["0", "1", "2"]

    def test_a_request_waiting_to_continue_is_invited_after_the_call(
        self, start_gateway, upstream
    ):
        """``Expect: 100-continue`` behind a call the lane took gets its 100."""
        upstream.delay = 0.3
        gateway, token = start(start_gateway, upstream.url)
        gateway.warm(token, PATH)
        port = int(gateway.url.rsplit(":", 1)[1])
        waiting = (
            b"POST /admin/v1/keys HTTP/1.1\r\nHost: gw\r\nContent-Type: "
            b"application/json\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(post(token) + waiting)
            received = b""
            while b"100 Continue" not in received:
                chunk = sock.recv(65536)
                assert chunk, received
                received += chunk
            sock.sendall(b"{}")
            while not received.endswith(b"}"):
                received += sock.recv(65536)
        assert received.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 401 " in received
        assert taken(gateway) == 1

    def test_a_connection_carries_call_after_call(self, start_gateway, upstream):
        """Ten calls, one after the other, on one kept connection."""
        gateway, token = start(start_gateway, upstream.url)
        gateway.warm(token, PATH)
        port = int(gateway.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            for _ in range(10):
                sock.sendall(post(token))
                received = b""
                while not _answers(received):
                    received += sock.recv(65536)
                assert received.startswith(b"HTTP/1.1 200 OK\r\n")
        assert taken(gateway) == 10
        assert len({call.peer for call in upstream.calls}) == 1

    def test_a_caller_that_leaves_mid_call_harms_nothing(self, start_gateway, upstream):
        """The call still reaches the upstream and is recorded; the server goes on."""
        upstream.delay = 0.5
        gateway, token = start(start_gateway, upstream.url)
        gateway.warm(token, PATH)
        port = int(gateway.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(post(token))
            time.sleep(0.1)
        time.sleep(0.8)
        upstream.delay = 0
        assert send(gateway, post(token)).startswith(b"HTTP/1.1 200 OK\r\n")
        assert taken(gateway) == 2
        gateway.flush()
        assert len(upstream.calls) == 2

    def test_connections_to_upstreams_leave_callers_their_limit(
        self, start_gateway, upstream
    ):
        """``connection_limit`` counts callers only: a call's upstream socket is not one."""
        upstream.delay = 0.5
        gateway, token = start(start_gateway, upstream.url, connection_limit=2)
        gateway.warm(token, PATH)
        port = int(gateway.url.rsplit(":", 1)[1])
        health = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"
        first = socket.create_connection(("127.0.0.1", port), timeout=10)
        second = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            first.sendall(post(token))
            time.sleep(0.2)  # the call is with the upstream
            second.sendall(health)
            assert second.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
            with socket.create_connection(("127.0.0.1", port), timeout=10) as third:
                third.sendall(health)
                third.settimeout(0.5)
                with pytest.raises(TimeoutError):
                    third.recv(65536)
                assert first.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
                first.close()
                third.settimeout(10)
                assert third.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
        finally:
            first.close()
            second.close()
        assert taken(gateway) == 1


class TestStopping:
    """A stop drains the calls the lane took."""

    def test_a_stop_answers_a_call_in_flight(self, tmp_path):
        """The caller gets the upstream's answer, sent after the stop."""
        from dais_adapters.hooks import plugin_manager
        from dais_wsgi.bootstrap import admin_store, bootstrap
        from dais_wsgi.settings import Settings
        from tests.integration.conftest import Gateway as Running

        upstream = Upstream()
        upstream.delay = 1.0
        settings = Settings(home=tmp_path / "home", port=0, upload_rate=None)
        runtime = bootstrap(settings, plugin_manager())
        server = make_server(runtime)
        stopping = threading.Event()
        loop = threading.Thread(target=run_until, args=(server, stopping, 5.0))
        loop.start()
        admin = admin_store(settings)
        try:
            gateway = Running(
                f"http://127.0.0.1:{server.effective_port}",
                settings,
                admin,
                None,
                runtime,
            )
            gateway.add_service("p1", 1, "svc", upstream.url)
            _, token = gateway.make_key(permissions=(("svc", "/api/webhook"),))
            gateway.warm(token, PATH)
            answers: list[bytes] = []
            caller = threading.Thread(
                target=lambda: answers.append(send(gateway, post(token)))
            )
            caller.start()
            deadline = time.monotonic() + 5
            while not upstream.calls and time.monotonic() < deadline:
                time.sleep(0.02)
            stopping.set()
            wake(server)
            caller.join(10)
            loop.join(10)
        finally:
            stopping.set()
            wake(server)
            loop.join(10)
            runtime.close()
            admin.close()
            upstream.close()
        assert server.dais_lane.taken == 1
        assert answers and answers[0].startswith(b"HTTP/1.1 200 OK\r\n")
        assert not loop.is_alive()


class TestOutOfDescriptors:
    """A call the lane cannot start goes to the application, not astray."""

    def test_a_call_the_lane_cannot_start_is_answered(self, tmp_path):
        """Out of file descriptors: an answer, and the key's places given back."""
        home = tmp_path / "home"
        upstream = Upstream()
        try:
            _, token = key_for_service(home, upstream.url, prefix="/api")
            with serving_process(home) as (line, process):
                port = int(line.split()[3].rsplit(":", 1)[1])
                request = post(token)
                first = _answers(_exchange(port, request))
                # No descriptor to spare past the caller's connection.
                held = len(os.listdir(f"/proc/{process.pid}/fd"))
                limit = resource.prlimit(process.pid, resource.RLIMIT_NOFILE)
                resource.prlimit(
                    process.pid, resource.RLIMIT_NOFILE, (held + 1, limit[1])
                )
                starved = [_answers(_exchange(port, request)) for _ in range(5)]
                resource.prlimit(process.pid, resource.RLIMIT_NOFILE, limit)
                after = [_answers(_exchange(port, request)) for _ in range(5)]
                metrics = _exchange(port, b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")
        finally:
            upstream.close()
        assert first[0].startswith(b"HTTP/1.1 200 OK\r\n")
        for answers in starved:
            assert len(answers) == 1 and re.match(rb"HTTP/1.1 (200|502) ", answers[0])
        # Five starved calls left no place taken: the key's cap is four.
        assert all(a[0].startswith(b"HTTP/1.1 200 OK\r\n") for a in after)
        assert b"dais_webhook_calls_in_loop_total" in metrics


def _exchange(port: int, request: bytes) -> bytes:
    """Send one request on a new connection; read its whole answer."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        while not _answers(received):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    return received
