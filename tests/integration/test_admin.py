"""The admin API and the project admin area, over a real server."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest
import urllib3

from dais_core.admin import Role
from dais_wsgi.admin import make_admin
from tests.integration.conftest import Gateway

pytestmark = pytest.mark.integration


class Admin:
    """A client holding one admin token."""

    def __init__(self, gateway: Gateway, token: str) -> None:
        self.gateway = gateway
        self.token = token
        self.http = urllib3.PoolManager(retries=False)

    def call(self, method: str, path: str, body: Any = None, **headers: str) -> Any:
        payload = None if body is None else json.dumps(body).encode()
        return self.http.request(
            method,
            self.gateway.url + path,
            body=payload,
            headers={
                "Authorization": f"Bearer {self.token}",
                "Content-Type": "application/json",
                "Accept": "application/json",
                **headers,
            },
        )


@pytest.fixture
def platform(gateway: Gateway) -> Admin:
    made = make_admin(gateway.store, Role.PLATFORM, None, "ops", time.time())
    return Admin(gateway, made["token"])


def project_admin(gateway: Gateway, project: str) -> Admin:
    made = make_admin(gateway.store, Role.PROJECT, project, "lead", time.time())
    return Admin(gateway, made["token"])


def create_key(platform: Admin, project: str = "p1", **extra: Any) -> dict[str, Any]:
    response = platform.call(
        "POST",
        "/admin/v1/keys",
        {
            "project": project,
            "label": "nightly",
            "requestor": "alice@example.org",
            "approver": "bob@example.org",
            "app_ids": ["app-1"],
            "case_code": "C-9",
            "lighthouse": True,
            "business_case": "exports",
            **extra,
        },
    )
    assert response.status == 201, response.data
    return dict(response.json())


def log_in(
    http: urllib3.PoolManager,
    gateway: Gateway,
    fields: dict[str, str],
    headers: dict[str, str] | None = None,
) -> urllib3.BaseHTTPResponse:
    """Post the project area's login form, without following its redirect."""
    return http.request(
        "POST",
        f"{gateway.url}/app/login",
        fields=fields,
        headers=headers,
        encode_multipart=False,
        redirect=False,
    )


def lead_logs_in(gateway: Gateway, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
    """A new project admin of p1 posts the login form with ``headers``."""
    lead = project_admin(gateway, "p1")
    fields = {"token": lead.token, "next": "/app/p1/admin/apikeys"}
    return log_in(urllib3.PoolManager(retries=False), gateway, fields, headers)


def session_of(gateway: Gateway, admin: Admin) -> str:
    """Log ``admin`` in through the form; return the ``Cookie`` header to send."""
    fields = {"token": admin.token, "next": "/app/login"}
    login = log_in(urllib3.PoolManager(retries=False), gateway, fields)
    assert login.status == 303
    return str(login.headers["Set-Cookie"]).split(";")[0]


def area_page(
    gateway: Gateway, cookie: str, accept: str = "text/html"
) -> urllib3.BaseHTTPResponse:
    """Ask for p1's key page with only a cookie, without following redirects."""
    return urllib3.PoolManager(retries=False).request(
        "GET",
        f"{gateway.url}/app/p1/admin/apikeys",
        headers={"Cookie": cookie, "Accept": accept},
        redirect=False,
    )


def send_in_pieces(
    gateway: Gateway, method: str, path: str, head: dict[str, str], *pieces: bytes
) -> tuple[int, dict[str, Any]]:
    """Send the head, then each piece of the body 0.2 s apart; return the answer.

    So the body arrives after its head, in several reads, as from a client
    that streams its body.
    """
    port = int(gateway.url.rsplit(":", 1)[1])
    lines = "".join(f"{name}: {value}\r\n" for name, value in head.items())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n{lines}\r\n".encode())
        for piece in pieces:
            time.sleep(0.2)
            sock.sendall(piece)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    status = int(answer.split()[1])
    return status, json.loads(answer.partition(b"\r\n\r\n")[2] or b"{}")


def read_json_answer(sock: socket.socket) -> bytes:
    """Read an answer whose JSON body ends it, or what came before a close."""
    answer = b""
    while not answer.endswith(b"}"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    return answer


def chunked(*parts: bytes) -> list[bytes]:
    """The pieces of a chunked body carrying ``parts``, then its end."""
    return [b"%x\r\n%s\r\n" % (len(part), part) for part in parts] + [b"0\r\n\r\n"]


def upload(gateway: Gateway, token: str, resource: str = "x") -> int:
    http = urllib3.PoolManager(retries=False)
    return int(
        http.request(
            "POST",
            f"{gateway.url}/integration/v1/resources/{resource}",
            fields={"data": ("f", b"content", "application/octet-stream")},
            headers={"Authorization": f"Bearer {token}"},
        ).status
    )


class TestKeyLifecycle:
    """Platform admins create, show, grant, rotate, expire and revoke keys."""

    def test_create_shows_the_secret_once(self, platform):
        """The 201 has the key; show and list never do."""
        created = create_key(platform)
        shown = platform.call("GET", f"/admin/v1/keys/{created['id']}")
        listed = platform.call("GET", "/admin/v1/keys?project=p1")
        for response in (shown, listed):
            assert response.status == 200
            assert created["key"] not in response.data.decode()
        body = shown.json()
        assert (body["requestor"], body["approver"], body["app_ids"]) == (
            "alice@example.org",
            "bob@example.org",
            ["app-1"],
        )
        assert (body["case_code"], body["lighthouse"], body["business_case"]) == (
            "C-9",
            True,
            "exports",
        )

    def test_a_whole_key_in_place_of_its_id_names_it_unrepeated(self, platform):
        """A pasted key reaches its own key; the secret comes back nowhere."""
        created = create_key(platform)
        secret = created["key"].split("_")[2][:32]
        revoked = platform.call("POST", f"/admin/v1/keys/{created['key']}/revoke")
        assert revoked.status == 200, revoked.data
        assert revoked.json()["id"] == created["id"]
        assert revoked.json()["revoked"] is not None
        damaged = created["key"][:-1] + ("0" if created["key"][-1] != "0" else "1")
        paths = [
            f"/admin/v1/keys/{damaged}",
            f"/admin/v1/keys/{created['key']}",
            f"/admin/v1/keys/{created['key']}x",
            f"/admin/v1/keys/Bearer%20{created['key']}%20",
        ]
        for path in paths:
            answer = platform.call("GET", path)
            assert secret not in answer.data.decode(), path
        spaced = platform.call("GET", f"/admin/v1/keys/{created['key']}%20")
        assert spaced.json()["id"] == created["id"]
        audit = platform.call("GET", "/admin/v1/audit").data.decode()
        assert secret not in audit

    def test_a_key_in_a_body_is_never_repeated_back(self, platform):
        """As a method, a field's name or a duplicate name: refused unrepeated."""
        created = create_key(platform)
        key, secret = created["key"], created["key"].split("_")[2][:32]
        explain = {"key_id": created["id"], "method": key, "url": "/x"}
        bodies = [
            ("/admin/v1/explain", json.dumps(explain).encode()),
            ("/admin/v1/keys", json.dumps({"project": "p1", key: 1}).encode()),
            ("/admin/v1/keys", b'{"%s": 1, "%s": 2}' % (key.encode(), key.encode())),
        ]
        for path, body in bodies:
            answer = platform.http.request(
                "POST",
                platform.gateway.url + path,
                body=body,
                headers={
                    "Authorization": f"Bearer {platform.token}",
                    "Content-Type": "application/json",
                },
            )
            assert answer.status == 400, (path, answer.data)
            assert secret not in answer.data.decode(), path

    def test_grants_permissions_and_revocation_take_effect(self, platform, gateway):
        """A granted key publishes; once revoked it is refused at once."""
        created = create_key(platform)
        key_id, token = created["id"], created["key"]
        granted = platform.call(
            "POST",
            f"/admin/v1/keys/{key_id}/grants",
            {"resource": "x", "locations": ["filemanager://p1/x"]},
        )
        assert granted.status == 200
        assert upload(gateway, token) == 200
        assert platform.call("POST", f"/admin/v1/keys/{key_id}/revoke").status == 200
        assert upload(gateway, token) == 401

    def test_a_grant_to_a_scheme_no_storage_serves_is_400(self, platform, gateway):
        """``foo://`` locations would fail every upload; the grant is refused."""
        key_id = create_key(platform)["id"]
        refused = platform.call(
            "POST",
            f"/admin/v1/keys/{key_id}/grants",
            {"resource": "x", "locations": ["filemanager://p1/x", "foo://x/w"]},
        )
        assert refused.status == 400
        assert "no storage serves foo://" in refused.json()["message"]
        shown = platform.call("GET", f"/admin/v1/keys/{key_id}").json()
        assert shown["grants"] == []

    def test_rotation_keeps_the_reach_and_ends_the_predecessor(self, platform, gateway):
        """The successor has the same grants; the old key stops after the overlap."""
        created = create_key(platform)
        key_id = created["id"]
        platform.call(
            "POST",
            f"/admin/v1/keys/{key_id}/grants",
            {"resource": "x", "locations": ["filemanager://p1/x"]},
        )
        rotated = platform.call(
            "POST", f"/admin/v1/keys/{key_id}/rotate", {"overlap_seconds": 0}
        )
        assert rotated.status == 201
        successor = rotated.json()
        assert upload(gateway, successor["key"]) == 200
        assert upload(gateway, created["key"]) == 401
        shown = platform.call("GET", f"/admin/v1/keys/{successor['id']}").json()
        assert shown["grants"] == [
            {"resource": "x", "locations": ["filemanager://p1/x"], "type": "binary"}
        ]

    def test_a_rotation_body_streamed_late_still_counts(self, platform, gateway):
        """A chunked body sent after its head is read whole: no default applies."""
        created = create_key(platform)
        platform.call(
            "POST",
            f"/admin/v1/keys/{created['id']}/grants",
            {"resource": "x", "locations": ["filemanager://p1/x"]},
        )
        assert upload(gateway, created["key"]) == 200
        auth = {"Authorization": f"Bearer {platform.token}"}
        status, rotated = send_in_pieces(
            gateway,
            "POST",
            f"/admin/v1/keys/{created['id']}/rotate",
            auth | {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
            *chunked(b'{"overlap_', b'seconds": 0}'),
        )
        assert status == 201, rotated
        time.sleep(1.1)  # one upload a second per key
        assert upload(gateway, created["key"]) == 401
        assert upload(gateway, rotated["key"]) == 200

    def test_a_body_in_several_reads_is_read_whole(self, platform, gateway):
        """A Content-Length body that arrives in pieces is parsed once it is in."""
        body = json.dumps({"project": "p1", "label": "late"}).encode()
        status, made = send_in_pieces(
            gateway,
            "POST",
            "/admin/v1/keys",
            {
                "Authorization": f"Bearer {platform.token}",
                "Content-Type": "application/json",
                "Content-Length": str(len(body)),
            },
            body[:10],
            body[10:],
        )
        assert status == 201, made
        shown = platform.call("GET", f"/admin/v1/keys/{made['id']}").json()
        assert shown["label"] == "late"

    def test_expiry_and_removal(self, platform, gateway):
        """A past expiry refuses the key; removed grants and permissions are gone."""
        created = create_key(platform)
        key_id = created["id"]
        base = f"/admin/v1/keys/{key_id}"
        permission = {
            "project": "p1",
            "service": "svc",
            "prefix": "/api",
            "methods": ["post"],
        }
        assert platform.call("POST", f"{base}/permissions", permission).status == 200
        assert platform.call("DELETE", f"{base}/permissions", permission).status == 200
        platform.call(
            "POST",
            f"{base}/grants",
            {"resource": "x", "locations": ["filemanager://p1/x"]},
        )
        assert platform.call("DELETE", f"{base}/grants?resource=x").status == 200
        assert platform.call("DELETE", f"{base}/grants?resource=x").status == 404
        shown = platform.call("GET", base).json()
        assert (shown["permissions"], shown["grants"]) == ([], [])
        assert shown["state"] == "active"
        expired = platform.call(
            "POST", f"{base}/expiry", {"expires": "2020-01-01T00:00:00Z"}
        )
        assert expired.json()["expires"] == "2020-01-01T00:00:00+00:00"
        assert expired.json()["state"] == "expired"
        page = project_admin(gateway, "p1").call("GET", "/app/p1/admin/apikeys")
        assert [key["state"] for key in page.json()["keys"]] == ["expired"]
        html = project_admin(gateway, "p1").call(
            "GET", "/app/p1/admin/apikeys", Accept="text/html"
        )
        assert "<span class=expired>expired</span>" in html.data.decode()

    def test_a_removed_service_is_no_longer_reached(self, platform, gateway):
        """After removal the gateway answers 404; removing it again is 404 too."""
        from tests.upstream import Upstream

        upstream = Upstream()
        try:
            created = create_key(platform)
            platform.call(
                "POST",
                f"/admin/v1/keys/{created['id']}/permissions",
                {"project": "p1", "service": "svc", "prefix": "/"},
            )
            service = {"project": "p1", "lineage_version": 1, "service": "svc"}
            platform.call("POST", "/admin/v1/services", service | {"url": upstream.url})
            hook = f"{gateway.url}/project-gateway/webhooks/p1/lineage-version/1/svc/x"
            auth = {"Authorization": f"Bearer {created['key']}"}
            http = urllib3.PoolManager(retries=False)
            assert http.request("POST", hook, headers=auth).status == 200
            query = "project=p1&lineage_version=1&service=svc"
            removed = platform.call("DELETE", f"/admin/v1/services?{query}")
            assert removed.status == 200
            assert removed.json() == {"removed": service}
            assert http.request("POST", hook, headers=auth).status == 404
            again = platform.call("DELETE", f"/admin/v1/services?{query}")
            assert again.status == 404
            actions = platform.call("GET", "/admin/v1/audit").json()["actions"]
            assert actions[0]["action"] == "service.remove"
        finally:
            upstream.close()

    def test_services_and_explain(self, platform):
        """A registered service is explained for a key that may call it."""
        created = create_key(platform)
        platform.call(
            "POST",
            f"/admin/v1/keys/{created['id']}/permissions",
            {"project": "p1", "service": "svc", "prefix": "/api/webhook"},
        )
        registered = platform.call(
            "POST",
            "/admin/v1/services",
            {
                "project": "p1",
                "lineage_version": 2,
                "service": "svc",
                "url": "http://127.0.0.1:9",
            },
        )
        assert registered.status == 201
        explained = platform.call(
            "POST",
            "/admin/v1/explain",
            {
                "key_id": created["id"],
                "method": "POST",
                "url": "/project-gateway/webhooks/p1/lineage-version/latest/svc/api/webhook/a",
            },
        ).json()
        assert explained["allowed"] is True
        assert explained["upstream"] == "http://127.0.0.1:9/api/webhook/a"

    def test_every_action_is_audited(self, platform):
        """The audit log names the actor, the action and the target."""
        created = create_key(platform)
        platform.call("POST", f"/admin/v1/keys/{created['id']}/revoke")
        actions = platform.call("GET", "/admin/v1/audit").json()["actions"]
        assert [(a["action"], a["target"]) for a in actions[:2]] == [
            ("key.revoke", created["id"]),
            ("key.create", created["id"]),
        ]
        assert actions[0]["actor"] != ""


class TestRefusals:
    """Bad bodies are 400; wrong or missing tokens 401; wrong roles 403."""

    @pytest.mark.parametrize(
        "body",
        [
            {"label": "no project"},
            {"project": "p1", "colour": "red"},
            {"project": 7},
            [],
        ],
    )
    def test_bad_bodies_are_400(self, platform, body):
        """Missing, unknown or mistyped fields are refused."""
        response = platform.call("POST", "/admin/v1/keys", body)
        assert response.status == 400
        assert response.json()["error"] == "invalid_data"

    @pytest.mark.parametrize(
        ("raw", "said"),
        [
            ('{"project": "p1", "label": "%s"}' % ("n" * 201), "longer than 200"),
            (
                '{"project": "p1", "label": "\\u001b[2J"}',
                "control or invisible characters",
            ),
            ('{"project": "p1", "label": "\\ud800"}', "lone UTF-16 surrogate"),
            ('{"project": "p1", "app_ids": "p1p2"}', "expected list"),
            ('{"project": "p1", "label": "a", "label": "b"}', "'label' twice"),
            (
                '{"project": "p1", "permissions": [{"service": "s", '
                '"prefix": "/", "prefix": "/x"}]}',
                "'prefix' twice",
            ),
        ],
        ids=[
            "long-label",
            "escape",
            "lone-surrogate",
            "app-ids-string",
            "duplicate-key",
            "nested-duplicate-key",
        ],
    )
    def test_key_metadata_is_checked(self, platform, raw, said):
        """Overlong or unprintable metadata, or a mistyped list, is a 400."""
        response = platform.http.request(
            "POST",
            platform.gateway.url + "/admin/v1/keys",
            body=raw.encode(),
            headers={
                "Authorization": f"Bearer {platform.token}",
                "Content-Type": "application/json",
            },
        )
        assert response.status == 400, response.data
        assert said in response.json()["message"]
        assert platform.call("GET", "/admin/v1/keys").json()["keys"] == []

    def test_an_admin_label_is_checked(self, platform):
        """A project admin's label follows the same rule as a key's."""
        made = platform.call(
            "POST", "/admin/v1/admins", {"project": "p1", "label": "a\u202eb"}
        )
        assert made.status == 400
        assert "control or invisible characters" in made.json()["message"]

    @pytest.mark.parametrize(
        ("grant", "said"),
        [
            (
                {"resource": "x", "locations": ["filemanager://p1/x"] * 2},
                "twice",
            ),
            (
                {"resource": "dir/", "locations": ["filemanager://p1/file"]},
                "needs folder locations",
            ),
        ],
        ids=["twice", "file-for-prefix"],
    )
    def test_unusable_grant_locations_are_400(self, platform, grant, said):
        """The API refuses what the command line refuses."""
        created = create_key(platform)
        added = platform.call("POST", f"/admin/v1/keys/{created['id']}/grants", grant)
        assert added.status == 400
        assert said in added.json()["message"]

    def test_admin_and_area_calls_are_named_in_the_log(self, platform, caplog):
        """The access line names the endpoint, not '-', for the API and the area."""
        import logging

        with caplog.at_level(logging.INFO, logger="dais.access"):
            platform.call("GET", "/admin/v1/keys")
            platform.call("GET", "/app/p1/admin/apikeys")
            platform.call("GET", "/admin/v1/keys", Authorization="Bearer nope")
        lines = [r.getMessage() for r in caplog.records if r.name == "dais.access"]
        assert [line.split()[1:3] for line in lines] == [
            ["admin", "200"],
            ["area", "200"],
            ["admin", "401"],
        ]

    def test_a_bad_query_parameter_is_invalid_data(self, platform):
        """Falcon's own 400 has the same code as every other 400."""
        response = platform.call("GET", "/admin/v1/audit?limit=lots")
        assert response.status == 400
        assert response.json()["error"] == "invalid_data"

    def test_a_wrong_method_on_the_area_keeps_its_headers(self, gateway):
        """A 405 of the area is named for its status and forbids caching."""
        response = urllib3.PoolManager(retries=False).request(
            "PUT", f"{gateway.url}/app/p1/admin/apikeys"
        )
        assert response.status == 405
        assert response.json()["error"] == "method_not_allowed"
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["X-Frame-Options"] == "DENY"

    def test_a_form_body_is_415(self, platform):
        """The admin API takes JSON only: no form a browser may post cross-site."""
        response = platform.http.request(
            "POST",
            platform.gateway.url + "/admin/v1/keys",
            fields={"project": "p1", "label": "form"},
            encode_multipart=False,
            headers={"Authorization": f"Bearer {platform.token}"},
        )
        assert response.status == 415
        assert platform.call("GET", "/admin/v1/keys").json()["keys"] == []

    def test_a_body_over_a_mib_is_413(self, platform, gateway):
        """An admin body is small; a larger one is refused, even without a length."""
        big = b'{"project": "p1", "label": "' + b"n" * (1024 * 1024) + b'"}'
        status, answer = send_in_pieces(
            gateway,
            "POST",
            "/admin/v1/keys",
            {
                "Authorization": f"Bearer {platform.token}",
                "Content-Type": "application/json",
                "Transfer-Encoding": "chunked",
            },
            *chunked(big[:600_000], big[600_000:]),
        )
        assert status == 413
        assert answer["error"] == "too_large"

    def test_a_length_over_a_mib_is_413_before_the_body(self, gateway):
        """Outside webhooks and uploads, a large Content-Length is refused at once."""
        port = int(gateway.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(
                b"POST /app/login HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n"
                b"Content-Length: %d\r\n\r\n" % (1024 * 1024 + 1)
            )
            answer = read_json_answer(sock)
        # The name RFC 9110 gives 413, as the application's own 413s say it.
        assert answer.startswith(b"HTTP/1.1 413 Content Too Large\r\n")
        message = json.loads(answer.partition(b"\r\n\r\n")[2])["message"]
        assert message == "the body is over the limit of 1048576 bytes"

    def test_slow_login_bodies_hold_no_worker(self, start_gateway):
        """Anyone may post a login form; dripping it must not stall the server."""
        gateway = start_gateway(threads=2)
        port = int(gateway.url.rsplit(":", 1)[1])
        stalled = []
        for _ in range(6):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(
                b"POST /app/login HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n"
                b"Content-Length: 100\r\n\r\ntoken="
            )
            stalled.append(sock)
        try:
            time.sleep(0.3)
            started = time.monotonic()
            health = urllib3.PoolManager(retries=False).request(
                "GET", f"{gateway.url}/healthz", timeout=5.0
            )
            assert health.status == 200
            assert time.monotonic() - started < 2.0
        finally:
            for sock in stalled:
                sock.close()

    @pytest.mark.parametrize("path", ["/admin/v1/keys", "/app/login"])
    @pytest.mark.parametrize("depth", [100_000, 700])
    def test_json_nested_too_deeply_is_400(self, platform, path, depth):
        """Deep JSON is refused, not a 500, whether or not the parser takes it."""
        response = platform.http.request(
            "POST",
            platform.gateway.url + path,
            body=b"[" * depth + b"]" * depth,
            headers={
                "Authorization": f"Bearer {platform.token}",
                "Content-Type": "application/json",
            },
        )
        assert response.status == 400, response.data[:200]
        if depth > 1000:
            assert "nests too deeply" in response.json()["message"]

    @staticmethod
    def _explain_in_chunks(platform, gateway, size: int, chunk: int) -> bytes:
        """Send an explain body of about ``size`` bytes in ``chunk``-byte chunks."""
        body = json.dumps({"key_id": "k" * size, "method": "POST", "url": "/x"})
        data = body.encode()
        pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)]
        wire = b"".join(chunked(*pieces))
        port = int(gateway.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /admin/v1/explain HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" % platform.token.encode() + wire
            )
            return read_json_answer(sock)

    def test_a_chunked_body_is_held_to_its_decoded_size(self, platform, gateway):
        """Framing does not count: 1,000,000 bytes in 64-byte chunks are parsed."""
        head = self._explain_in_chunks(platform, gateway, 1_000_000, 64)
        assert head.startswith(b"HTTP/1.1 404 "), head  # parsed: no such key

    def test_framing_that_outweighs_the_body_is_400(self, platform, gateway):
        """300 KB sent a byte a chunk is five times its size in framing: refused."""
        head = self._explain_in_chunks(platform, gateway, 300_000, 1)
        assert head.startswith(b"HTTP/1.1 400 "), head
        assert b"framing outweighs its content" in head

    def test_a_lone_surrogate_anywhere_is_400(self, platform):
        """Text no store can encode is refused at the door, not as a 500."""
        response = platform.http.request(
            "POST",
            platform.gateway.url + "/admin/v1/explain",
            body=b'{"key_id": "\\ud800", "method": "GET", "url": "/x"}',
            headers={
                "Authorization": f"Bearer {platform.token}",
                "Content-Type": "application/json",
            },
        )
        assert response.status == 400
        assert "surrogate" in response.json()["message"]

    def test_no_token_or_an_api_key_is_401(self, gateway, platform):
        """Only admin tokens open the admin API."""
        created = create_key(platform)
        assert Admin(gateway, "").call("GET", "/admin/v1/keys").status == 401
        assert (
            Admin(gateway, created["key"]).call("GET", "/admin/v1/keys").status == 401
        )

    def test_a_project_admin_cannot_use_the_platform_api(self, gateway):
        """Project admins get 403 from /admin/v1."""
        lead = project_admin(gateway, "p1")
        assert lead.call("GET", "/admin/v1/keys").status == 403
        assert lead.call("POST", "/admin/v1/keys", {"project": "p1"}).status == 403

    def test_platform_admins_make_project_admins(self, platform, gateway):
        """POST /admin/v1/admins returns a working project-admin token."""
        made = platform.call("POST", "/admin/v1/admins", {"project": "p1"})
        assert made.status == 201
        lead = Admin(gateway, made.json()["token"])
        assert lead.call("GET", "/app/p1/admin/apikeys").status == 200


class TestProjectArea:
    """Project admins see their own project's keys, never another's."""

    def test_json_lists_the_projects_keys_and_their_records(self, platform, gateway):
        """Keys of p1 with their grants and recent uploads; no secrets."""
        mine = create_key(platform, "p1")
        theirs = create_key(platform, "p2")
        platform.call(
            "POST",
            f"/admin/v1/keys/{mine['id']}/grants",
            {"resource": "x", "locations": ["filemanager://p1/x"]},
        )
        assert upload(gateway, mine["key"]) == 200
        gateway.flush()
        lead = project_admin(gateway, "p1")
        response = lead.call("GET", "/app/p1/admin/apikeys")
        assert response.status == 200
        text = response.data.decode()
        assert mine["key"] not in text and theirs["id"] not in text
        (key,) = response.json()["keys"]
        assert key["id"] == mine["id"]
        assert [p["outcome"] for p in key["publishes"]] == ["published"]

    def test_a_key_of_another_project_that_reaches_this_one_is_listed(
        self, platform, gateway
    ):
        """Shown with what it may do here only; a look-alike project's is not."""
        reaching = create_key(platform, "p2")
        elsewhere = create_key(platform, "p2")
        base = f"/admin/v1/keys/{reaching['id']}"
        for project in ("q_1", "p2"):
            permission = {"project": project, "service": "svc", "prefix": "/api"}
            assert (
                platform.call("POST", f"{base}/permissions", permission).status == 200
            )
        grants = {
            reaching["id"]: ("filemanager://q_1/inbox/f", "filemanager://p2/own/f"),
            elsewhere["id"]: ("filemanager://qx1/inbox/f",),
        }
        for key_id, locations in grants.items():
            for n, location in enumerate(locations):
                grant = {"resource": f"r{n}", "locations": [location]}
                path = f"/admin/v1/keys/{key_id}/grants"
                assert platform.call("POST", path, grant).status == 200

        page = project_admin(gateway, "q_1").call("GET", "/app/q_1/admin/apikeys")

        (key,) = page.json()["keys"]
        assert (key["id"], key["project"]) == (reaching["id"], "p2")
        assert [p["project"] for p in key["permissions"]] == ["q_1"]
        assert [g["locations"] for g in key["grants"]] == [
            ["filemanager://q_1/inbox/f"]
        ]

    def test_another_projects_admin_gets_403_and_learns_nothing(
        self, platform, gateway
    ):
        """The refusal is the same for a project with keys and one without."""
        create_key(platform, "p2")
        lead = project_admin(gateway, "p1")
        with_keys = lead.call("GET", "/app/p2/admin/apikeys")
        without = lead.call("GET", "/app/nosuch/admin/apikeys")
        assert with_keys.status == without.status == 403
        assert with_keys.json()["message"] == without.json()["message"]

    def test_the_html_page_escapes_what_it_shows(self, platform, gateway):
        """A label with markup is shown as text."""
        create_key(platform, "p1", label="<script>alert(1)</script>")
        lead = project_admin(gateway, "p1")
        page = lead.call("GET", "/app/p1/admin/apikeys", Accept="text/html")
        assert page.status == 200
        text = page.data.decode()
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
        assert "<script>" not in text
        assert "script-src" not in page.headers["Content-Security-Policy"]
        assert page.headers["X-Frame-Options"] == "DENY"

    def test_login_sets_a_strict_http_only_cookie(self, gateway):
        """The form login gives a session cookie, not the token, that opens the page."""
        lead = project_admin(gateway, "p1")
        http = urllib3.PoolManager(retries=False)
        login = log_in(
            http, gateway, {"token": lead.token, "next": "/app/p1/admin/apikeys"}
        )
        assert login.status == 303
        assert login.headers["Location"] == "/app/p1/admin/apikeys"
        cookie = login.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert "Max-Age=28800" in cookie
        session = cookie.split(";")[0]
        assert session.startswith("dais_admin=daisses_")
        assert lead.token.rpartition("_")[2] not in cookie
        assert area_page(gateway, session).status == 200
        assert "API keys of" in area_page(gateway, session).data.decode()

    @pytest.mark.parametrize(
        ("trusted", "proto", "secure"),
        [(True, "https", True), (True, "http", False), (False, "https", False)],
        ids=["trusted-https", "trusted-http", "untrusted-claim"],
    )
    def test_the_cookie_is_secure_behind_a_trusted_tls_proxy(
        self, start_gateway, trusted, proto, secure
    ):
        """A trusted proxy's X-Forwarded-Proto: https makes the cookie Secure."""
        gateway = start_gateway(trust_forwarded=trusted)
        login = lead_logs_in(gateway, {"X-Forwarded-Proto": proto})
        assert login.status == 303, login.data
        assert ("; Secure" in login.headers["Set-Cookie"]) is secure

    def test_behind_a_trusted_tls_proxy_only_an_https_origin_may_log_in(
        self, start_gateway
    ):
        """The form posted from an http page of the same host is refused."""
        gateway = start_gateway(trust_forwarded=True)
        host = gateway.url.removeprefix("http://")
        over_tls = {"X-Forwarded-Proto": "https", "Host": host}
        refused = lead_logs_in(gateway, over_tls | {"Origin": f"http://{host}"})
        taken = lead_logs_in(gateway, over_tls | {"Origin": f"https://{host}"})
        assert (refused.status, taken.status) == (403, 303)

    def test_logout_ends_the_session_for_good(self, gateway, platform):
        """After logout, a copy of the old cookie opens nothing; both are audited."""
        session = session_of(gateway, project_admin(gateway, "p1"))
        http = urllib3.PoolManager(retries=False)
        out = http.request(
            "POST",
            f"{gateway.url}/app/logout",
            headers={"Cookie": session},
            redirect=False,
        )
        assert out.status == 303
        assert "Max-Age=0" in out.headers["Set-Cookie"] or "expires=" in (
            out.headers["Set-Cookie"].lower()
        )
        assert "SameSite=Strict" in out.headers["Set-Cookie"]
        assert out.headers["Cache-Control"] == "no-store"
        replayed = area_page(gateway, session)
        assert replayed.status == 303
        assert replayed.headers["Location"].startswith("/app/login?next=")
        actions = platform.call("GET", "/admin/v1/audit").json()["actions"]
        assert [a["action"] for a in actions[:2]] == ["session.end", "session.open"]

    def test_the_login_page_says_who_is_logged_in(self, gateway):
        """With a valid session, /app/login names the admin and where to go."""
        made = make_admin(gateway.store, Role.PLATFORM, None, "ops", time.time())
        session = session_of(gateway, Admin(gateway, made["token"]))
        page = urllib3.PoolManager(retries=False).request(
            "GET", f"{gateway.url}/app/login", headers={"Cookie": session}
        )
        text = page.data.decode()
        assert page.status == 200
        assert f"Logged in as platform admin <code>{made['id']}</code>" in text
        assert "/app/&lt;project&gt;/admin/apikeys" in text
        assert page.headers["Cache-Control"] == "no-store"
        lead = project_admin(gateway, "p1")
        page = urllib3.PoolManager(retries=False).request(
            "GET",
            f"{gateway.url}/app/login",
            headers={"Cookie": session_of(gateway, lead)},
        )
        assert "href='/app/p1/admin/apikeys'" in page.data.decode()

    def test_a_session_is_no_credential_for_the_admin_api(self, gateway):
        """A platform admin's session cookie, even sent by hand, mints nothing."""
        made = make_admin(gateway.store, Role.PLATFORM, None, "ops", time.time())
        session = session_of(gateway, Admin(gateway, made["token"]))
        http = urllib3.PoolManager(retries=False)
        for headers in ({"Cookie": session}, {"Cookie": session, "Authorization": ""}):
            for method, path in (
                ("GET", "/admin/v1/keys"),
                ("POST", "/admin/v1/admins"),
            ):
                response = http.request(
                    method,
                    f"{gateway.url}{path}",
                    body=b'{"project": "p1"}',
                    headers={**headers, "Content-Type": "application/json"},
                )
                assert response.status == 401, (method, path, headers)

    def test_revoking_the_admin_token_ends_its_sessions(self, gateway):
        """A session lasts no longer than the admin token it was opened with."""
        made = make_admin(gateway.store, Role.PROJECT, "p1", "lead", time.time())
        session = session_of(gateway, Admin(gateway, made["token"]))
        assert area_page(gateway, session).status == 200
        gateway.store.revoke_admin(made["id"], time.time())
        assert area_page(gateway, session).status == 303

    def test_the_admin_token_itself_is_no_session(self, gateway):
        """A cookie holding an admin token (the old form) is refused."""
        lead = project_admin(gateway, "p1")
        page = area_page(gateway, f"dais_admin={lead.token}", "application/json")
        assert page.status == 401
        assert lead.token not in page.data.decode()

    def test_a_login_form_in_several_reads_logs_in(self, gateway):
        """The form is read whole even when it arrives after its head."""
        lead = project_admin(gateway, "p1")
        form = f"token={lead.token}&next=/app/login".encode()
        port = int(gateway.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /app/login HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n"
                b"Content-Length: %d\r\n\r\n" % len(form)
            )
            for piece in (form[:20], form[20:]):
                time.sleep(0.2)
                sock.sendall(piece)
            head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 303 "), head[:200]
        assert b"Set-Cookie: dais_admin=daisses_" in head

    def test_a_browser_without_a_session_is_sent_to_login(self, gateway):
        """No cookie: a redirect to the login form, not an error page."""
        http = urllib3.PoolManager(retries=False)
        page = http.request(
            "GET",
            f"{gateway.url}/app/p1/admin/apikeys",
            headers={"Accept": "text/html"},
            redirect=False,
        )
        assert page.status == 303
        assert page.headers["Location"].startswith("/app/login?next=")

    def test_login_never_redirects_elsewhere(self, gateway):
        """A next parameter pointing off the area is ignored."""
        lead = project_admin(gateway, "p1")
        http = urllib3.PoolManager(retries=False)
        login = log_in(
            http, gateway, {"token": lead.token, "next": "//elsewhere.example/app/"}
        )
        assert login.headers["Location"] == "/app/p1/admin/apikeys"

    def test_a_browser_refused_gets_a_page_with_the_area_headers(self, gateway):
        """A 403 to a browser is a short HTML page that forbids framing and caching."""
        lead = project_admin(gateway, "p1")
        page = lead.call("GET", "/app/p2/admin/apikeys", Accept="text/html")
        assert page.status == 403
        assert page.headers["Content-Type"].startswith("text/html")
        assert page.headers["X-Frame-Options"] == "DENY"
        assert page.headers["Cache-Control"] == "no-store"
        assert "may not see that project" in page.data.decode()

    def test_a_wrong_token_at_login_shows_the_form_again(self, gateway):
        """The form comes back with a 401 and says why."""
        http = urllib3.PoolManager(retries=False)
        login = log_in(
            http,
            gateway,
            {
                "token": "daisadm_0000000000000000_nope",
                "next": "/app/p1/admin/apikeys",
            },
        )
        assert login.status == 401
        text = login.data.decode()
        assert "the admin token is malformed" in text
        assert "<form method=post" in text
        assert "Set-Cookie" not in login.headers

    def test_a_wrong_token_posted_as_json_gets_a_json_error(self, gateway):
        """An API client asking for JSON gets the 401 as JSON, not the form."""
        http = urllib3.PoolManager(retries=False)
        login = http.request(
            "POST",
            f"{gateway.url}/app/login",
            body=json.dumps({"token": "daisadm_0000000000000000_nope"}).encode(),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            redirect=False,
        )
        assert login.status == 401
        assert login.headers["Content-Type"] == "application/json"
        assert login.json()["error"] == "unauthenticated"
        assert "Set-Cookie" not in login.headers

    @pytest.mark.parametrize(
        "headers",
        [
            {"Origin": "https://elsewhere.example"},
            {"Referer": "https://elsewhere.example/page"},
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site"},
        ],
        ids=["origin", "referer", "fetch-cross-site", "fetch-same-site"],
    )
    def test_a_login_posted_from_another_site_is_refused(self, gateway, headers):
        """A foreign Origin, Referer or fetch site cannot log a browser in."""
        login = lead_logs_in(gateway, headers)
        assert login.status == 403
        assert "Set-Cookie" not in login.headers

    @pytest.mark.parametrize("scheme", ["evil", "file", "ftp"])
    def test_a_login_from_another_scheme_on_this_host_is_refused(self, gateway, scheme):
        """Only an http or https page of this host may post the form."""
        netloc = gateway.url.split("://", 1)[1]
        login = lead_logs_in(gateway, {"Origin": f"{scheme}://{netloc}"})
        assert login.status == 403

    def test_an_https_page_of_this_host_may_log_in(self, gateway):
        """Behind a proxy that ends TLS, the page is https and the server http."""
        netloc = gateway.url.split("://", 1)[1]
        login = lead_logs_in(gateway, {"Origin": f"https://{netloc}"})
        assert login.status == 303

    def test_a_logout_posted_from_another_site_is_refused(self, gateway):
        """No page elsewhere can end an admin's session."""
        session = session_of(gateway, project_admin(gateway, "p1"))
        out = urllib3.PoolManager(retries=False).request(
            "POST",
            f"{gateway.url}/app/logout",
            headers={"Cookie": session, "Origin": "http://elsewhere.example"},
            redirect=False,
        )
        assert out.status == 403
        assert "Set-Cookie" not in out.headers
        assert area_page(gateway, session).status == 200

    @pytest.mark.parametrize(
        "headers",
        [{}, {"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}],
        ids=["no-browser-headers", "fetch-same-origin", "fetch-typed-by-hand"],
    )
    def test_a_login_from_this_site_or_no_browser_passes(self, gateway, headers):
        """A same-origin form, a URL typed by hand, or a script gets its cookie."""
        login = lead_logs_in(gateway, headers)
        assert login.status == 303
        assert "Set-Cookie" in login.headers
