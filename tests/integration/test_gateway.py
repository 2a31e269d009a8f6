"""Project gateway webhooks over a real waitress server and a real upstream."""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any

import pytest
import urllib3

from tests.integration.conftest import FAST, Gateway
from tests.upstream import RawUpstream, Upstream

pytestmark = pytest.mark.integration

BASE = "/project-gateway/webhooks"


@pytest.fixture(params=["lane", "worker"])
def gateway(request: pytest.FixtureRequest, start_gateway: Any) -> Gateway:
    """A gateway forwarding warm calls from its event loop, or every call
    from worker threads (``gateway_lane`` off): both must behave the same."""
    return start_gateway(**FAST, gateway_lane=request.param == "lane")


@pytest.fixture
def caller(gateway: Gateway, upstream: Upstream) -> str:
    """A key of project p1 that may call svc under /api/webhook."""
    gateway.add_service("p1", 1, "svc", upstream.url + "/v1-base")
    gateway.add_service("p1", 3, "svc", upstream.url)
    gateway.add_service("p1", 4, "other", upstream.url)
    gateway.add_service("p1", 2, "svc", upstream.url + "/v2-base")
    _, token = gateway.make_key(permissions=(("svc", "/api/webhook"),))
    return token


def call(
    http: urllib3.PoolManager,
    gateway: Gateway,
    token: str | None,
    path: str,
    method: str = "POST",
    **kw: object,
) -> urllib3.BaseHTTPResponse:
    headers = dict(kw.pop("headers", {}) or {})  # type: ignore[call-overload]
    gateway.warm(token, path)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return http.request(method, gateway.url + path, headers=headers, **kw)  # type: ignore[arg-type]


def raw_call(gateway: Gateway, token: str, target: str) -> tuple[int, bytes]:
    """Send a request target exactly as written, with no client-side clean-up."""
    host, port = gateway.url.removeprefix("http://").split(":")
    gateway.warm(token, target)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.putrequest("POST", target, skip_accept_encoding=True)
        connection.putheader("Authorization", f"Bearer {token}")
        connection.putheader("Content-Length", "0")
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def exchange(gateway: Gateway, request: bytes) -> bytes:
    """Send raw bytes and read the answer until the server closes."""
    port = int(gateway.url.rsplit(":", 1)[1])
    head = request.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    target = head[0].split(" ")[1] if head[0].count(" ") >= 2 else ""
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name.lower() == "authorization":
            gateway.warm(value.strip().removeprefix("Bearer "), target)
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        while chunk := sock.recv(4096):
            answer += chunk
    return answer


def post_target(gateway: Gateway, token: str, target: str, host: str = "x") -> bytes:
    """POST to a request target written as is, with no body; return the answer."""
    gateway.warm(token, target)
    return exchange(
        gateway,
        f"POST {target} HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {token}\r\n"
        "Content-Length: 0\r\nConnection: close\r\n\r\n".encode(),
    )


def forwarded_with(
    http: urllib3.PoolManager,
    gateway: Gateway,
    upstream: Upstream,
    name: str,
    value: str,
) -> Any:
    """Call svc's /api/webhook with one more header; return what arrived."""
    gateway.add_service("p1", 1, "svc", upstream.url)
    _, token = gateway.make_key(permissions=(("svc", "/api/webhook"),))
    call(
        http,
        gateway,
        token,
        f"{BASE}/p1/lineage-version/1/svc/api/webhook",
        headers={name: value},
    )
    return upstream.calls[-1]


class TestForwarding:
    """What reaches the upstream, and what the caller gets back."""

    def test_post_reaches_the_service_unchanged(self, http, gateway, upstream, caller):
        """Method, path, query and body arrive; Authorization does not."""
        response = call(
            http,
            gateway,
            caller,
            f"{BASE}/p1/lineage-version/3/svc/api/webhook/schedule?at=now&x=%20y",
            body=b'{"run": 1}',
            headers={"Content-Type": "application/json", "Cookie": "session=1"},
        )
        assert response.status == 200
        assert response.data == b""
        (seen,) = upstream.calls
        assert seen.method == "POST"
        assert seen.target == "/api/webhook/schedule?at=now&x=%20y"
        assert seen.body == b'{"run": 1}'
        assert seen.headers["content-type"] == "application/json"
        assert "authorization" not in seen.headers
        assert "cookie" not in seen.headers
        assert seen.headers["x-dais-project"] == "p1"
        assert seen.headers["x-forwarded-for"] == "127.0.0.1"
        assert seen.headers["x-request-id"] == response.headers["X-Request-Id"]

    @pytest.mark.parametrize(
        ("suffix", "target"),
        [
            ("", "/api/webhook/x"),
            ("?", "/api/webhook/x?"),
            ("?a=", "/api/webhook/x?a="),
        ],
        ids=["no-query", "bare-question-mark", "empty-value"],
    )
    def test_the_target_keeps_even_a_bare_question_mark(
        self, gateway, upstream, caller, suffix, target
    ):
        """``/x?`` reaches the upstream as ``/x?``, not as ``/x``."""
        status, _ = raw_call(
            gateway, caller, f"{BASE}/p1/lineage-version/3/svc/api/webhook/x{suffix}"
        )
        assert status == 200
        assert upstream.calls[-1].target == target

    @pytest.mark.parametrize(
        ("host", "forwarded"),
        [
            ("example.org:8443", "example.org:8443"),
            ("example.org", "example.org"),
            ("[::1]:19080", "[::1]:19080"),
            ("odd!host", None),
        ],
    )
    def test_x_forwarded_host_is_the_host_the_caller_sent(
        self, http, gateway, upstream, caller, host, forwarded
    ):
        """The port and an IPv6 literal's brackets stay; an unusual Host is left out."""
        response = call(
            http,
            gateway,
            caller,
            f"{BASE}/p1/lineage-version/3/svc/api/webhook",
            headers={"Host": host},
        )
        assert response.status == 200
        assert upstream.calls[-1].headers.get("x-forwarded-host") == forwarded

    def test_an_absolute_target_names_the_host(self, gateway, upstream, caller):
        """http://host/... is taken (RFC 9112, 3.2.2): its host, not Host, counts."""
        path = f"{BASE}/p1/lineage-version/3/svc/api/webhook"
        answer = post_target(gateway, caller, f"http://example.org:8443{path}", "other")
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert upstream.calls[-1].target == "/api/webhook"
        assert upstream.calls[-1].headers["x-forwarded-host"] == "example.org:8443"

    @pytest.mark.parametrize(
        "target",
        [
            "http://h{path}#f?q=1",
            "{path}#f?q=1",
            "http://h/integration/v1/resources/exports/h3#/../../two/x.bin",
        ],
        ids=["absolute", "origin", "upload"],
    )
    def test_a_fragment_in_the_target_is_400(self, gateway, upstream, caller, target):
        """A target has no fragment; nothing after a '#' is read or repaired."""
        path = f"{BASE}/p1/lineage-version/3/svc/api/webhook"
        answer = post_target(gateway, caller, target.format(path=path))
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert upstream.calls == []

    @pytest.mark.parametrize(
        "prefix",
        [
            "ftp://example.org",
            "gopher://example.org",
            "x:",
            "http:",
            "http://user:pw@example.org",
            "http://exa mple.org",
        ],
    )
    def test_an_absolute_target_of_another_kind_is_400(
        self, gateway, upstream, caller, prefix
    ):
        """Only http(s)://host[:port] is a target this server takes."""
        path = f"{BASE}/p1/lineage-version/3/svc/api/webhook"
        answer = post_target(gateway, caller, prefix + path)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert upstream.calls == []

    def test_a_proxy_header_is_not_passed_on(self, http, gateway, upstream, caller):
        """``Proxy`` (httpoxy in a CGI-style upstream) and ``Proxy-*`` stay here."""
        response = call(
            http,
            gateway,
            caller,
            f"{BASE}/p1/lineage-version/3/svc/api/webhook",
            headers={
                "Proxy": "http://127.0.0.1:9/",
                "Proxy-Status": "x",
                "Proxy-A": "y",
            },
        )
        assert response.status == 200
        forwarded = upstream.calls[-1].headers
        assert not [name for name in forwarded if name.lower().startswith("proxy")]

    def test_caller_gets_the_upstream_status_with_an_empty_body(
        self, http, gateway, upstream, caller
    ):
        """An upstream 409 with a body becomes a bare 409."""
        upstream.status = "409 Conflict"
        response = call(
            http, gateway, caller, f"{BASE}/p1/lineage-version/3/svc/api/webhook"
        )
        assert response.status == 409
        assert response.data == b""

    @pytest.mark.parametrize("status", ["204 No Content", "304 Not Modified"])
    def test_a_bodiless_answer_keeps_the_connection(
        self, gateway, upstream, caller, status
    ):
        """After a relayed 204 or 304 the caller's connection stays open."""
        upstream.status = status
        host, port = gateway.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        target = f"{BASE}/p1/lineage-version/3/svc/api/webhook"
        try:
            sockets = []
            for _ in range(3):
                connection.request(
                    "POST", target, b"{}", {"Authorization": f"Bearer {caller}"}
                )
                response = connection.getresponse()
                assert (response.status, response.read()) == (int(status[:3]), b"")
                assert response.getheader("Connection") is None
                sockets.append(connection.sock)
        finally:
            connection.close()
        assert sockets[0] is not None
        assert sockets == [sockets[0]] * 3

    @pytest.mark.parametrize(
        "options", ["close", "Close", "x-trace, close", "close,foo"]
    )
    @pytest.mark.parametrize("status", ["200 OK", "204 No Content"])
    def test_the_connection_closes_when_the_caller_asks(
        self, gateway, upstream, caller, options, status
    ):
        """A ``close`` option anywhere in ``Connection`` closes it after the answer."""
        upstream.status = status
        request = (
            f"POST {BASE}/p1/lineage-version/3/svc/api/webhook HTTP/1.1\r\n"
            f"Host: x\r\nAuthorization: Bearer {caller}\r\n"
            f"Content-Length: 0\r\nConnection: {options}\r\n\r\n"
        ).encode()
        answer = exchange(gateway, request)
        assert answer.startswith(f"HTTP/1.1 {status[:3]} ".encode())
        assert b"\r\nConnection: close\r\n" in answer

    @pytest.mark.parametrize(
        "method", ["GET", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE"]
    )
    def test_every_method_is_forwarded(self, http, gateway, upstream, caller, method):
        """The upstream sees the caller's method."""
        response = call(
            http,
            gateway,
            caller,
            f"{BASE}/p1/lineage-version/3/svc/api/webhook/x",
            method,
        )
        assert response.status == 200
        assert upstream.calls[-1].method == method

    def test_latest_resolves_to_the_highest_version_with_the_service(
        self, http, gateway, upstream, caller
    ):
        """Version 4 lacks svc, so latest is 3."""
        response = call(
            http, gateway, caller, f"{BASE}/p1/lineage-version/latest/svc/api/webhook"
        )
        assert response.status == 200
        assert response.headers["Dais-Lineage-Version"] == "3"
        assert upstream.calls[-1].target == "/api/webhook"

    def test_an_explicit_version_uses_its_base_url(
        self, http, gateway, upstream, caller
    ):
        """Version 2's base URL has a path; the route is appended to it."""
        call(http, gateway, caller, f"{BASE}/p1/lineage-version/2/svc/api/webhook/a")
        assert upstream.calls[-1].target == "/v2-base/api/webhook/a"


class TestRefusals:
    """Refused calls never reach the upstream."""

    @pytest.mark.parametrize(
        ("path", "status"),
        [
            ("/p1/lineage-version/3/nosuch/api/webhook", 404),
            ("/p1/lineage-version/9/svc/api/webhook", 404),
            ("/p2/lineage-version/1/svc/api/webhook", 403),
            ("/p1/lineage-version/3/svc/api/other", 403),
            ("/p1/lineage-version/3/svc/api/webhookx", 403),
            ("/p1/lineage-version/3/svc/API/webhook", 403),
            ("/p1/lineage-version/3/svc/api/webhook/../../admin", 400),
            ("/p1/lineage-version/3/svc/api/webhook/%2e%2e/admin", 400),
            ("/p1/lineage-version/3/svc/api/webhook%2f..%2fadmin", 400),
            ("/p1/lineage-version/3/svc/api/webhook/a%5cb", 400),
            ("/p1/lineage-version/3/svc/api/webhook/%252e%252e", 400),
            ("/p1/lineage-version/3/svc/api/webhook/..%E2%88%95admin", 400),
            ("/p1/lineage-version/3/svc/api/webhook/..%C2%A5admin", 400),
            ("/p1/lineage-version/3/svc/api/webhook/a%00", 400),
            ("/p1/lineage-version/3/svc/api/webhook;x=1/a", 400),
            ("/p1/lineage-version/3/svc/api//webhook", 400),
            ("/p1/lineage-version/0/svc/api/webhook", 400),
            ("/p1/lineage-version/01/svc/api/webhook", 400),
            ("/p1/lineage-version/-1/svc/api/webhook", 400),
        ],
    )
    def test_refused(self, http, gateway, upstream, caller, path, status):
        """Each bad call gets its status and the upstream is never called."""
        got, body = raw_call(gateway, caller, BASE + path)
        assert got == status, body
        assert json.loads(body)["error"]
        assert upstream.calls == []

    @pytest.mark.parametrize("query", ["a=\x01", "a=\x7f", "a=b\tc", "x=%zz", "x=%"])
    def test_a_query_that_is_not_percent_encoded_is_400(
        self, gateway, upstream, caller, query
    ):
        """Clients would send such a query differently: it is refused, not sent."""
        request = (
            f"POST {BASE}/p1/lineage-version/3/svc/api/webhook?{query} HTTP/1.1\r\n"
            f"Host: x\r\nAuthorization: Bearer {caller}\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n"
        ).encode("latin-1")
        answer = exchange(gateway, request)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert b'"invalid_route"' in answer
        assert upstream.calls == []

    @pytest.mark.parametrize("forwarder", ["curl", "urllib3"])
    @pytest.mark.parametrize(
        "answer",
        [
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n",
        ],
        ids=["101-only", "2000", "999"],
    )
    def test_an_answer_that_cannot_be_relayed_is_502(
        self, http, start_gateway, forwarder, answer
    ):
        """A status that is not final, or not a status, is the upstream's fault."""
        gateway = start_gateway(forwarder=forwarder)
        upstream = RawUpstream(answer, close_after=0.5)
        try:
            gateway.add_service("p1", 1, "svc", upstream.url)
            _, token = gateway.make_key(permissions=(("svc", "/"),))
            started = time.monotonic()
            response = call(http, gateway, token, f"{BASE}/p1/lineage-version/1/svc/x")
        finally:
            upstream.close()
        assert (response.status, response.json()["error"]) == (
            502,
            "upstream_unreachable",
        )
        assert time.monotonic() - started < 5.0

    def test_missing_and_bad_keys_are_401(self, http, gateway, upstream, caller):
        """No key, or a garbled one, is 401."""
        path = f"{BASE}/p1/lineage-version/3/svc/api/webhook"
        assert call(http, gateway, None, path).status == 401
        # A different last character (a random key may end in "x" already).
        garbled = caller[:-1] + ("y" if caller.endswith("x") else "x")
        assert call(http, gateway, garbled, path).status == 401
        assert upstream.calls == []

    def test_unreachable_upstream_is_502(self, http, gateway, caller):
        """A service whose port is closed gives 502."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            closed = probe.getsockname()[1]
        gateway.add_service("p1", 7, "svc", f"http://127.0.0.1:{closed}")
        response = call(
            http, gateway, caller, f"{BASE}/p1/lineage-version/7/svc/api/webhook"
        )
        assert (response.status, response.json()["error"]) == (
            502,
            "upstream_unreachable",
        )

    def test_slow_upstream_is_504(self, http, start_gateway, upstream):
        """An upstream slower than the read timeout gives 504."""
        # libcurl counts a stall in whole seconds.
        gateway = start_gateway(read_timeout=1.0)
        gateway.add_service("p1", 1, "svc", upstream.url)
        _, token = gateway.make_key(permissions=(("svc", "/"),))
        upstream.delay = 2.0
        response = call(http, gateway, token, f"{BASE}/p1/lineage-version/1/svc/x")
        assert (response.status, response.json()["error"]) == (504, "upstream_timeout")

    def test_body_over_the_limit_is_413(self, http, start_gateway, upstream):
        """A webhook body over the gateway limit is refused before forwarding."""
        gateway = start_gateway(max_gateway_body=1000)
        gateway.add_service("p1", 1, "svc", upstream.url)
        _, token = gateway.make_key(permissions=(("svc", "/"),))
        response = call(
            http, gateway, token, f"{BASE}/p1/lineage-version/1/svc/x", body=b"x" * 1001
        )
        assert response.status == 413
        assert upstream.calls == []


class TestPermissionsAndRecords:
    """Method-restricted permissions, spoofed headers, and the forward record."""

    def test_a_method_restricted_permission_covers_only_its_methods(
        self, http, gateway, upstream
    ):
        """A POST-only permission refuses GET with 403."""
        from dais_core.values import Permission

        gateway.add_service("p1", 1, "svc", upstream.url)
        key_id, token = gateway.make_key()
        gateway.store.add_permission(
            key_id, Permission("p1", "svc", "/hook", frozenset({"POST"}))
        )
        path = f"{BASE}/p1/lineage-version/1/svc/hook"
        assert call(http, gateway, token, path, "POST").status == 200
        assert call(http, gateway, token, path, "GET").status == 403
        assert [c.method for c in upstream.calls] == ["POST"]

    def test_caller_identity_and_forwarding_headers_are_replaced(
        self, http, gateway, upstream, caller
    ):
        """A caller cannot assert a key id, a project or a forwarding chain."""
        call(
            http,
            gateway,
            caller,
            f"{BASE}/p1/lineage-version/3/svc/api/webhook",
            headers={
                "X-Dais-Key-Id": "someone-else",
                "X-Dais-Project": "p2",
                "X-Forwarded-For": "10.9.9.9",
                "X-Forwarded-Port": "1",
                "Forwarded": "for=10.9.9.9",
                "Connection": "X-Custom",
                "X-Custom": "hop",
                "X-Kept": "yes",
            },
        )
        seen = upstream.calls[-1].headers
        assert seen["x-dais-project"] == "p1"
        assert seen["x-dais-key-id"] != "someone-else"
        assert seen["x-forwarded-for"] == "127.0.0.1"
        assert "x-forwarded-port" not in seen
        assert "forwarded" not in seen
        assert "x-custom" not in seen
        assert seen["x-kept"] == "yes"

    def test_every_forwarded_call_is_recorded(self, http, gateway, upstream):
        """The record has key, project, service, version, method, route and status."""
        gateway.add_service("p1", 5, "svc", upstream.url)
        key_id, token = gateway.make_key(permissions=(("svc", "/"),))
        upstream.status = "202 Accepted"
        call(
            http,
            gateway,
            token,
            f"{BASE}/p1/lineage-version/latest/svc/a/b?q=1",
            body=b"12345",
            headers={"X-Request-Id": "trace-7"},
        )
        gateway.flush()
        (record,) = gateway.store.forwards(key_id)  # type: ignore[attr-defined]
        assert (record["project"], record["service"], record["lineage_version"]) == (
            "p1",
            "svc",
            5,
        )
        assert (record["method"], record["route"], record["status"]) == (
            "POST",
            "/a/b",
            202,
        )
        assert (record["bytes_in"], record["request_id"]) == (5, "trace-7")

    def test_webhook_calls_can_be_throttled(self, http, start_gateway, upstream):
        """With a gateway rate set, the second call in a second is 429."""
        from dais_core.policies import RatePolicy

        gateway = start_gateway(gateway_rate=RatePolicy(1, 1.0, 1))
        gateway.add_service("p1", 1, "svc", upstream.url)
        _, token = gateway.make_key(permissions=(("svc", "/"),))
        path = f"{BASE}/p1/lineage-version/1/svc/x"
        first, second = (
            call(http, gateway, token, path),
            call(http, gateway, token, path),
        )
        assert first.status == 200
        assert first.headers["RateLimit-Policy"] == '"gateway";q=1;w=1'
        assert second.status == 429
        assert second.headers["Retry-After"] == "1"
        assert len(upstream.calls) == 1


class TestBodies:
    """Chunked and sized bodies are streamed upstream and limited."""

    def test_a_chunked_body_is_forwarded(self, http, gateway, upstream, caller):
        """A body without Content-Length arrives whole."""
        body = (bytes(range(256)) * 1000 for _ in range(4))
        response = http.request(
            "PUT",
            f"{gateway.url}{BASE}/p1/lineage-version/3/svc/api/webhook",
            body=body,
            chunked=True,
            headers={"Authorization": f"Bearer {caller}"},
        )
        assert response.status == 200
        assert upstream.calls[-1].body == bytes(range(256)) * 4000

    def test_a_body_sent_a_short_line_a_chunk_is_forwarded(
        self, http, gateway, upstream, caller
    ):
        """A generator of NDJSON lines makes a chunk per line: taken whole."""
        line = b'{"n":12345}\n'
        response = http.request(
            "POST",
            f"{gateway.url}{BASE}/p1/lineage-version/3/svc/api/webhook",
            body=(line for _ in range(80_000)),
            chunked=True,
            headers={"Authorization": f"Bearer {caller}"},
        )
        assert response.status == 200, response.data
        assert upstream.calls[-1].body == line * 80_000

    def test_a_chunked_body_over_the_limit_is_413_and_never_delivered(
        self, http, start_gateway, upstream
    ):
        """The forward is cut off; the upstream application never sees it."""
        gateway = start_gateway(max_gateway_body=100_000)
        gateway.add_service("p1", 1, "svc", upstream.url)
        _, token = gateway.make_key(permissions=(("svc", "/"),))
        response = http.request(
            "POST",
            f"{gateway.url}{BASE}/p1/lineage-version/1/svc/x",
            body=(b"z" * 50_000 for _ in range(10)),
            chunked=True,
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status == 413
        assert upstream.calls == []

    def test_head_is_forwarded(self, http, gateway, upstream, caller):
        """HEAD reaches the upstream and its status comes back."""
        response = call(
            http,
            gateway,
            caller,
            f"{BASE}/p1/lineage-version/3/svc/api/webhook",
            "HEAD",
        )
        assert response.status == 200
        assert upstream.calls[-1].method == "HEAD"

    def test_a_dripping_upstream_body_does_not_hold_the_caller(
        self, http, gateway, upstream, caller
    ):
        """The status comes back at once; the unread body is not waited for."""
        upstream.drip = 25
        started = time.monotonic()
        response = call(
            http, gateway, caller, f"{BASE}/p1/lineage-version/3/svc/api/webhook"
        )
        assert response.status == 200
        assert time.monotonic() - started < 2.0


class TestSmugglingAndOverrides:
    """Framing tricks and method overrides never reach the upstream."""

    def test_content_length_with_chunked_is_refused_and_closed(
        self, gateway, upstream, caller
    ):
        """Both framings at once: 400, the connection closed, the upstream untouched."""
        smuggled = b"GET /api/admin/delete-everything HTTP/1.1\r\nHost: x\r\n\r\n"
        chunk = b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled)
        head = (
            "POST /project-gateway/webhooks/p1/lineage-version/3/svc/api/webhook/x"
            f" HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {caller}\r\n"
            "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
        answer = exchange(gateway, head + chunk)
        assert answer.startswith(b"HTTP/1.1 400")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"Content-Type: application/json" in head
        assert json.loads(body)["error"] == "invalid_data"
        assert upstream.calls == []

    @pytest.mark.parametrize(
        "target",
        [
            f"http://127.0.0.1{BASE}/p1/lineage-version/3/svc/api/web\thook/x",
            f"{BASE}/p1/lineage-version/3/svc/api/web\thook/x",
            f"http://127.0.0.1{BASE}/p1/lineage-version/3/svc/api/webhook/x\x7f",
        ],
        ids=["absolute-tab", "origin-tab", "absolute-delete"],
    )
    def test_a_control_character_in_the_target_is_refused(
        self, gateway, upstream, caller, target
    ):
        """A tab a URL parser would drop makes no other path: 400, nothing sent."""
        answer = post_target(gateway, caller, target, host="127.0.0.1")
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert upstream.calls == []

    @pytest.mark.parametrize(
        "framing",
        [
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            b"Transfer-Encoding: chunked, chunked\r\n",
            b"Transfer-Encoding: chunked\r\n  , chunked\r\n",
        ],
        ids=["two-lines", "one-line", "folded"],
    )
    def test_chunked_twice_is_refused_and_closed(
        self, gateway, upstream, caller, framing
    ):
        """A body cannot be chunked twice (RFC 9112, 6.1): 400 and close."""
        head = (
            "POST /project-gateway/webhooks/p1/lineage-version/3/svc/api/webhook/x"
            f" HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {caller}\r\n"
        ).encode()
        body = b'7\r\n{"x":1}\r\n0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n'
        answer = exchange(gateway, head + framing + b"\r\n" + body)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert answer.count(b"HTTP/1.1 ") == 1, answer
        assert upstream.calls == []

    @pytest.mark.parametrize(
        "framing",
        [
            b"Transfer-Encoding: chunked\r\nContent-Length: 17\r\n",
            b"Transfer-Encoding: chunked\r\n",
        ],
        ids=["with-length", "alone"],
    )
    def test_http_1_0_with_a_transfer_encoding_is_refused_and_closed(
        self, gateway, upstream, caller, framing
    ):
        """HTTP/1.0 has no chunked framing: its body cannot be told from the next."""
        head = (
            "POST /project-gateway/webhooks/p1/lineage-version/3/svc/api/webhook/x"
            f" HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {caller}\r\n"
            "Connection: keep-alive\r\n"
        ).encode()
        body = b'7\r\n{"x":1}\r\n0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n'
        answer = exchange(gateway, head + framing + b"\r\n" + body)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert answer.count(b"HTTP/1.1 ") == 1, answer
        assert upstream.calls == []

    def test_a_length_past_anything_the_server_takes_is_413(self, gateway, caller):
        """2**62 bytes on a streamed path: 413, naming no internal number."""
        answer = exchange(
            gateway,
            f"POST {BASE}/p1/lineage-version/3/svc/api/webhook HTTP/1.1\r\n"
            f"Host: x\r\nAuthorization: Bearer {caller}\r\n"
            f"Content-Length: {2**62}\r\n\r\n".encode(),
        )
        assert answer.startswith(b"HTTP/1.1 413 "), answer
        body = json.loads(answer.partition(b"\r\n\r\n")[2])
        assert body["message"] == "the body is over the server's limit"

    def test_a_content_length_of_thousands_of_digits_is_400(self, gateway):
        """A length no integer parser takes is a 400, not a dropped connection."""
        answer = exchange(
            gateway,
            b"POST /admin/v1/explain HTTP/1.1\r\nHost: x\r\nContent-Length: "
            + b"9" * 5000
            + b"\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "invalid_data"

    @pytest.mark.parametrize(
        "host_lines",
        [
            b"Host: 127.0.0.1\r\nHost: elsewhere.example\r\n",
            b"Host: a b\r\n",
            b"Host: elsewhere.example:80@127.0.0.1\r\n",
            b"Host: 127.0.0.1:99999999\r\n",
            b"Host: 127.0.0.1,elsewhere.example\r\n",
        ],
        ids=["two-hosts", "space", "userinfo", "long-port", "comma"],
    )
    def test_a_bad_or_second_host_is_400(self, gateway, upstream, caller, host_lines):
        """RFC 9112, section 3.2: one Host, a host[:port], or a 400 and no call."""
        request = (
            b"POST /project-gateway/webhooks/p1/lineage-version/3/svc/api/webhook/x"
            b" HTTP/1.1\r\n" + host_lines + b"Authorization: Bearer %s\r\n"
            b"Content-Length: 0\r\n\r\n" % caller.encode()
        )
        answer = exchange(gateway, request)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 ")
        assert json.loads(body)["error"] == "invalid_data"
        assert upstream.calls == []

    def test_a_refused_http_1_0_request_is_answered_in_http_1_1(self, gateway):
        """The answer names the version this server speaks, and closes."""
        answer = exchange(
            gateway, b"GET /healthz HTTP/1.0\r\nContent-Length: x\r\n\r\n"
        )
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 ")
        assert b"Connection: close" in head
        assert json.loads(body)["error"] == "invalid_data"

    def test_an_unknown_transfer_coding_is_a_json_400(self, gateway):
        """waitress' 501 for a coding it does not know is a plain bad request here."""
        request = (
            b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"
        )
        answer = exchange(gateway, request)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split()[1] == b"400"
        assert json.loads(body)["error"] == "invalid_data"

    def test_oversized_headers_get_a_json_error(self, gateway):
        """What waitress refuses itself is answered in the same JSON shape."""
        # Just over waitress' 256 KiB of headers, and no more: the server has
        # read everything sent when it answers, so it closes without a reset.
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 262_200
        answer = exchange(gateway, request)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431 ")
        assert json.loads(body)["error"] == "headers_too_large"

    def test_method_override_headers_are_dropped(self, http, gateway, upstream):
        """A POST-only key cannot ask the upstream for DELETE through a header."""
        from dais_core.values import Permission

        gateway.add_service("p1", 1, "svc", upstream.url)
        key_id, token = gateway.make_key()
        gateway.store.add_permission(
            key_id, Permission("p1", "svc", "/", frozenset({"POST"}))
        )
        call(
            http,
            gateway,
            token,
            f"{BASE}/p1/lineage-version/1/svc/x",
            headers={
                "X-HTTP-Method-Override": "DELETE",
                "X-Method-Override": "DELETE",
                "X-Original-Method": "DELETE",
            },
        )
        seen = upstream.calls[-1].headers
        assert "x-http-method-override" not in seen
        assert "x-method-override" not in seen
        assert "x-original-method" not in seen

    @pytest.mark.parametrize(
        "name",
        [
            "X-Original-URL",
            "X-Rewrite-URL",
            "X-Original-URI",
            "X-Override-URL",
            "X-Original-Path",
            "X-Request-URI",
            "X-Envoy-Original-Path",
            "X-Original-Host",
            "X-Host",
        ],
    )
    def test_path_override_headers_are_dropped(self, http, gateway, upstream, name):
        """A key for /api/webhook cannot point the upstream's router elsewhere."""
        seen = forwarded_with(http, gateway, upstream, name, "/admin/drop-everything")
        assert seen.target == "/api/webhook"
        assert name.lower() not in seen.headers

    @pytest.mark.parametrize(
        "name",
        [
            "Client-IP",
            "True-Client-IP",
            "X-Client-IP",
            "X-Cluster-Client-IP",
            "CF-Connecting-IP",
            "Fastly-Client-IP",
            "X-Envoy-External-Address",
        ],
    )
    def test_client_address_claims_are_dropped(self, http, gateway, upstream, name):
        """The upstream learns the caller's address from X-Forwarded-For only."""
        seen = forwarded_with(http, gateway, upstream, name, "10.0.0.1").headers
        assert name.lower() not in seen
        assert seen["x-forwarded-for"] == "127.0.0.1"

    def test_the_query_is_forwarded_as_sent(self, gateway, upstream, caller):
        """The query reaches the upstream byte for byte: nothing decoded or added."""
        status, _ = raw_call(
            gateway,
            caller,
            f"{BASE}/p1/lineage-version/3/svc/api/webhook?a=%2F%2e&b=x+y&c=%7e",
        )
        assert status == 200
        assert upstream.calls[-1].target == "/api/webhook?a=%2F%2e&b=x+y&c=%7e"


class TestPerKeyCap:
    """One key cannot hold every worker."""

    def test_calls_in_flight_are_capped_per_key(self, start_gateway, upstream):
        """With one slow call of a key in flight, its next call is 429."""
        import concurrent.futures

        gateway = start_gateway(gateway_in_flight=1)
        gateway.add_service("p1", 1, "svc", upstream.url)
        _, token = gateway.make_key(permissions=(("svc", "/"),))
        upstream.delay = 1.0
        path = f"{BASE}/p1/lineage-version/1/svc/x"
        pool = urllib3.PoolManager(retries=False)
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            slow = executor.submit(call, pool, gateway, token, path)
            time.sleep(0.3)
            second = call(pool, gateway, token, path)
            assert slow.result().status == 200
        assert second.status == 429
        assert second.headers["Retry-After"] == "1"
        assert "1 webhook calls in flight" in second.json()["message"]
        metrics = pool.request("GET", f"{gateway.url}/metrics").data.decode()
        assert (
            'dais_throttle_decisions_total{outcome="throttled",'
            'policy="gateway_in_flight"} 1.0'
        ) in metrics
        assert 'policy="upload"' not in metrics


class TestReservedWorkers:
    """Webhook calls and uploads together never hold every worker."""

    def test_past_the_cap_a_call_is_503_and_health_still_answers(
        self, start_gateway, upstream
    ):
        """Two keys' slow calls fill the cap; /healthz is answered at once.

        Only calls forwarded from worker threads count: with the event
        loop's lane off, every call is one.
        """
        import concurrent.futures

        gateway = start_gateway(
            threads=4, reserved_threads=2, gateway_in_flight=0, gateway_lane=False
        )
        gateway.add_service("p1", 1, "svc", upstream.url)
        tokens = [gateway.make_key(permissions=(("svc", "/"),))[1] for _ in range(3)]
        upstream.delay = 1.5
        path = f"{BASE}/p1/lineage-version/1/svc/x"
        pool = urllib3.PoolManager(retries=False, maxsize=4)
        with concurrent.futures.ThreadPoolExecutor(2) as executor:
            slow = [executor.submit(call, pool, gateway, t, path) for t in tokens[:2]]
            time.sleep(0.4)
            refused = call(pool, gateway, tokens[2], path)
            started = time.monotonic()
            health = pool.request("GET", f"{gateway.url}/healthz")
            waited = time.monotonic() - started
            assert [f.result().status for f in slow] == [200, 200]
        assert refused.status == 503
        assert refused.json()["error"] == "busy"
        assert refused.headers["Retry-After"] == "1"
        assert health.status == 200
        assert waited < 1.0, waited
        assert len(upstream.calls) == 2

    def test_calls_in_the_event_loop_hold_no_worker(self, start_gateway, upstream):
        """Slow calls the lane took leave every worker free: none is 503."""
        import concurrent.futures

        gateway = start_gateway(threads=4, reserved_threads=2, gateway_in_flight=0)
        gateway.add_service("p1", 1, "svc", upstream.url)
        tokens = [gateway.make_key(permissions=(("svc", "/"),))[1] for _ in range(4)]
        upstream.delay = 1.0
        path = f"{BASE}/p1/lineage-version/1/svc/x"
        pool = urllib3.PoolManager(retries=False, maxsize=4)
        with concurrent.futures.ThreadPoolExecutor(4) as executor:
            slow = [executor.submit(call, pool, gateway, t, path) for t in tokens]
            assert [f.result().status for f in slow] == [200] * 4
        assert gateway.lane.taken == 4
        assert len(upstream.calls) == 4

    def test_quick_calls_past_the_cap_wait_their_turn(self, start_gateway, upstream):
        """More quick calls at once than the cap: each waits a moment, none is 503."""
        import concurrent.futures

        gateway = start_gateway(threads=4, reserved_threads=2, gateway_in_flight=0)
        gateway.add_service("p1", 1, "svc", upstream.url)
        _, token = gateway.make_key(permissions=(("svc", "/"),))
        upstream.delay = 0.05
        path = f"{BASE}/p1/lineage-version/1/svc/x"
        pool = urllib3.PoolManager(retries=False, maxsize=4)
        with concurrent.futures.ThreadPoolExecutor(4) as executor:
            calls = [
                executor.submit(call, pool, gateway, token, path) for _ in range(8)
            ]
            assert [f.result().status for f in calls] == [200] * 8

    def test_the_cap_frees_as_calls_end(self, http, start_gateway, upstream):
        """A call after the slow ones ended is forwarded as usual."""
        gateway = start_gateway(threads=2, reserved_threads=1, gateway_in_flight=0)
        gateway.add_service("p1", 1, "svc", upstream.url)
        _, token = gateway.make_key(permissions=(("svc", "/"),))
        path = f"{BASE}/p1/lineage-version/1/svc/x"
        statuses = [call(http, gateway, token, path).status for _ in range(3)]
        assert statuses == [200, 200, 200]


class TestForwardingHeaders:
    """The forwarding chain and the request id."""

    def test_a_trusted_chain_is_extended(self, http, start_gateway, upstream):
        """Behind a trusted proxy, the caller's X-Forwarded-For is kept and extended."""
        gateway = start_gateway(trust_forwarded=True)
        gateway.add_service("p1", 1, "svc", upstream.url)
        _, token = gateway.make_key(permissions=(("svc", "/"),))
        call(
            http,
            gateway,
            token,
            f"{BASE}/p1/lineage-version/1/svc/x",
            headers={"X-Forwarded-For": "203.0.113.7"},
        )
        assert upstream.calls[-1].headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"

    @pytest.mark.parametrize(
        ("trusted", "sent", "forwarded"),
        [
            (True, "https", "https"),
            (True, "http, https", "https"),
            (False, "https", "http"),
        ],
        ids=["trusted", "trusted-chain", "untrusted"],
    )
    def test_the_proto_behind_a_trusted_proxy_is_the_proxys(
        self, http, start_gateway, upstream, trusted, sent, forwarded
    ):
        """A TLS proxy's X-Forwarded-Proto is passed on when trusted, else not."""
        gateway = start_gateway(trust_forwarded=trusted)
        gateway.add_service("p1", 1, "svc", upstream.url)
        _, token = gateway.make_key(permissions=(("svc", "/"),))
        call(
            http,
            gateway,
            token,
            f"{BASE}/p1/lineage-version/1/svc/x",
            headers={"X-Forwarded-Proto": sent},
        )
        assert upstream.calls[-1].headers["x-forwarded-proto"] == forwarded

    def test_a_malformed_request_id_is_replaced(self, http, gateway, upstream, caller):
        """An id with spaces or too long is not passed on; a fresh one is."""
        response = call(
            http,
            gateway,
            caller,
            f"{BASE}/p1/lineage-version/3/svc/api/webhook",
            headers={"X-Request-Id": "not ok <script>"},
        )
        sent = upstream.calls[-1].headers["x-request-id"]
        assert sent != "not ok <script>"
        assert sent == response.headers["X-Request-Id"]
        assert len(sent) == 32
