"""Reading gateway targets and cleaning headers (dais_core.gateway)."""

from __future__ import annotations

import pytest
from hypothesis import given

from dais_core.errors import InvalidRoute, UpstreamUnreachable, status_for
from dais_core.gateway import (
    GATEWAY_PREFIX,
    HOP_BY_HOP,
    GatewayCall,
    parse_gateway_path,
    relayable_status,
    upstream_headers,
    upstream_url,
    valid_request_id,
)
from dais_core.keys import new_key
from dais_core.rules import normalise_route
from tests import strategies

BASE = GATEWAY_PREFIX + "p1/lineage-version/"

ADDED = {
    "client": "203.0.113.7",
    "proto": "https",
    "host": "gateway.example",
    "request_id": "req-1",
    "key_id": "ab" * 8,
    "project": "p1",
}


def _headers(incoming, **overrides):
    return upstream_headers(incoming, **(ADDED | overrides))


def _names(headers):
    return [name.lower() for name, _ in headers]


class TestParseGatewayPath:
    @pytest.mark.parametrize(
        ("path", "call"),
        [
            (
                BASE + "3/scheduler/api/webhooks/schedule",
                GatewayCall("p1", 3, "scheduler", "/api/webhooks/schedule"),
            ),
            (
                BASE + "latest/scheduler/api/x",
                GatewayCall("p1", None, "scheduler", "/api/x"),
            ),
            (BASE + "1/scheduler", GatewayCall("p1", 1, "scheduler", "/")),
            (BASE + "1/scheduler/", GatewayCall("p1", 1, "scheduler", "/")),
            (BASE + "1/scheduler/api/", GatewayCall("p1", 1, "scheduler", "/api/")),
            (BASE + "12/svc_2/caf%c3%a9", GatewayCall("p1", 12, "svc_2", "/caf%C3%A9")),
            (BASE + "9999999999/s/x", GatewayCall("p1", 9999999999, "s", "/x")),
        ],
    )
    def test_reads_project_version_service_and_canonical_route(self, path, call):
        """A well-formed target splits into its checked parts, route canonical."""
        assert parse_gateway_path(path) == call

    @pytest.mark.parametrize(
        "version",
        ["0", "01", "-1", "+1", "1.0", "1e3", "Latest", "LATEST", "", "12345678901"],
    )
    def test_refuses_a_version_that_is_not_positive_or_latest(self, version):
        """lineageVersion is a positive integer without leading zeros, or 'latest'."""
        with pytest.raises(InvalidRoute, match="lineageVersion") as caught:
            parse_gateway_path(f"{BASE}{version}/svc/x")
        assert status_for(caught.value) == 400

    @pytest.mark.parametrize(
        "path",
        [
            "/project-gateway/webhook/p1/lineage-version/1/svc/x",
            "/PROJECT-GATEWAY/webhooks/p1/lineage-version/1/svc/x",
            GATEWAY_PREFIX + "p1/lineage/1/svc/x",
            GATEWAY_PREFIX + "p1/lineage-version/1",
            GATEWAY_PREFIX + "p1",
            GATEWAY_PREFIX,
            GATEWAY_PREFIX + "p1/lineage-version/1/",
            GATEWAY_PREFIX + "p.1/lineage-version/1/svc/x",
            GATEWAY_PREFIX + "%2e%2e/lineage-version/1/svc/x",
            GATEWAY_PREFIX + "/p1/lineage-version/1/svc/x",
            GATEWAY_PREFIX + "p1/lineage-version/1/sv%63/x",
            GATEWAY_PREFIX + "p1/lineage-version/1/svc.internal/x",
        ],
    )
    def test_refuses_a_path_of_another_shape(self, path):
        """Anything but prefix/project/lineage-version/version/service is 400."""
        with pytest.raises(InvalidRoute):
            parse_gateway_path(path)

    @pytest.mark.parametrize(
        "route", ["../admin", "a/%2e%2e/admin", "a%2Fb", "a//b", "a;x=1", "a\\b", "%00"]
    )
    def test_refuses_a_route_that_could_be_reread(self, route):
        """The route tail obeys normalise_route: no traversal, no smuggling."""
        with pytest.raises(InvalidRoute):
            parse_gateway_path(f"{BASE}1/svc/{route}")

    @given(strategies.raw_routes())
    def test_the_route_is_exactly_the_normalised_tail(self, raw):
        """The checked route is normalise_route of everything after the service."""
        tail = raw.removeprefix("/")
        try:
            expected = normalise_route("/" + tail)
        except InvalidRoute:
            with pytest.raises(InvalidRoute):
                parse_gateway_path(f"{BASE}1/svc/{tail}")
            return
        assert parse_gateway_path(f"{BASE}1/svc/{tail}").route == expected


class TestUpstreamUrl:
    @pytest.mark.parametrize(
        ("base", "route", "query", "url"),
        [
            ("http://svc:8080", "/api/x", None, "http://svc:8080/api/x"),
            ("http://svc:8080/", "/api/x", None, "http://svc:8080/api/x"),
            ("http://svc/base/", "/", None, "http://svc/base/"),
            ("http://svc", "/api/x", "a=1&b=%2F", "http://svc/api/x?a=1&b=%2F"),
            ("http://svc", "/api/x", "", "http://svc/api/x?"),
        ],
    )
    def test_appends_route_and_untouched_query(self, base, route, query, url):
        """The route goes after the base URL; the query, even empty, unchanged."""
        assert upstream_url(base, route, query) == url

    @pytest.mark.parametrize(
        "query",
        ['a="<>{}|\\^[]`', "x=%7e%2F", "q=a+b&c=;:@/?", "empty=&=", "%41%41"],
    )
    def test_keeps_any_query_a_url_can_carry(self, query):
        """Visible ASCII and well-formed escapes pass byte for byte."""
        assert upstream_url("http://svc", "/x", query) == f"http://svc/x?{query}"

    @pytest.mark.parametrize(
        "query",
        ["a=\x01", "a=\x7f", "a=b c", "a=\tb", "a=\xe9", "x=%zz", "x=%", "x=%4", "a#b"],
    )
    def test_refuses_a_query_clients_would_send_differently(self, query):
        """Control bytes, spaces, raw non-ASCII and stray ``%`` are 400."""
        with pytest.raises(InvalidRoute) as raised:
            upstream_url("http://svc", "/x", query)
        assert status_for(raised.value) == 400


class TestRelayableStatus:
    @pytest.mark.parametrize("status", [200, 204, 304, 418, 599])
    def test_final_statuses_are_relayed(self, status):
        """Any status from 200 to 599 goes back to the caller."""
        assert relayable_status(status) == status

    @pytest.mark.parametrize("status", [0, 100, 101, 103, 199, 600, 999, 2000])
    def test_anything_else_is_a_broken_answer(self, status):
        """Interim and impossible statuses are the upstream's fault: 502."""
        with pytest.raises(UpstreamUnreachable) as raised:
            relayable_status(status)
        assert status_for(raised.value) == 502


class TestValidRequestId:
    @pytest.mark.parametrize(
        "value",
        [
            "req-1",
            "a.b:c_d",
            "x" * 128,
            "123e4567-e89b-12d3-a456-426614174000",
            "01HGW2XQ7Z8YABCDEFGHJKMNPQ",
            "0ujsswThIGTUYm2K8FjOOfXtY1K",
        ],
        ids=["short", "punctuation", "longest", "uuid", "ulid", "ksuid"],
    )
    def test_accepts_safe_ids(self, value):
        """Ids of letters, digits and '._:-' are kept, random ones of any case too."""
        assert valid_request_id(value)

    @pytest.mark.parametrize("value", [None, "", "x" * 129, "a b", "a\nb", "ü", "a/b"])
    def test_refuses_anything_else(self, value):
        """Missing, empty, long or unusual ids are replaced by the gateway."""
        assert not valid_request_id(value)

    @pytest.mark.parametrize(
        "extra", ["", ".", "x:", "a" * 70], ids=["whole", "dot", "prefix", "letters"]
    )
    def test_refuses_an_id_holding_a_key(self, extra):
        """A key sent as a request id would be logged and forwarded: it is not kept."""
        token = new_key().token
        glued = extra + token if extra.endswith((":", "a")) else token + extra
        assert not valid_request_id(glued)


class TestUpstreamHeaders:
    def test_keeps_ordinary_headers_in_order(self):
        """End-to-end headers of the caller reach the upstream as they were sent."""
        incoming = [
            ("Content-Type", "application/json"),
            ("X-Custom", "1"),
            ("Accept", "*/*"),
        ]
        assert _headers(incoming)[:3] == tuple(incoming)

    @pytest.mark.parametrize("name", sorted(HOP_BY_HOP))
    def test_drops_hop_by_hop_headers(self, name):
        """Hop-by-hop headers stop at the gateway, whatever their case."""
        assert name not in _names(_headers([(name.title(), "x"), ("Accept", "*/*")]))

    def test_drops_headers_named_by_connection(self):
        """Headers the caller lists in Connection are hop-by-hop too."""
        incoming = [
            ("Connection", "keep-alive, X-Secret-Hop , x-other"),
            ("X-Secret-Hop", "1"),
            ("X-Other", "2"),
            ("X-Kept", "3"),
        ]
        names = _names(_headers(incoming))
        assert "x-secret-hop" not in names
        assert "x-other" not in names
        assert "x-kept" in names

    @pytest.mark.parametrize(
        "name",
        [
            "Authorization",
            "authorization",
            "Proxy-Authorization",
            "Proxy-Status",
            "proxy-anything",
            "Cookie",
            "Host",
            "Content-Length",
            "Expect",
            "Forwarded",
            "X-Real-IP",
            "X-Request-Id",
            "X-Forwarded-For",
            "X-Forwarded-Proto",
            "X-Forwarded-Host",
            "X-Dais-Key-Id",
            "X-Dais-Project",
            "x-dais-anything",
            "Dais-Admin",
        ],
    )
    def test_drops_credentials_and_what_the_gateway_asserts(self, name):
        """The caller cannot pass on its key, cookies or spoof identity headers."""
        headers = _headers([(name, "spoofed")])
        assert all(value != "spoofed" for _, value in headers)

    @pytest.mark.parametrize(
        "name",
        [
            "X-Forwarded-Port",
            "X-Forwarded-Prefix",
            "X-Forwarded-Server",
            "X-Forwarded-Ssl",
        ],
    )
    def test_drops_every_caller_x_forwarded_header(self, name):
        """No X-Forwarded-* header of the caller's reaches the upstream."""
        headers = _headers([(name, "spoofed")])
        assert all(value != "spoofed" for _, value in headers)

    def test_adds_forwarding_and_identity_headers(self):
        """The upstream learns the client, scheme, host, request id and identity."""
        headers = dict(_headers([("Accept", "*/*")]))
        assert headers == {
            "Accept": "*/*",
            "X-Forwarded-For": "203.0.113.7",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "gateway.example",
            "X-Request-Id": "req-1",
            "X-Dais-Key-Id": "ab" * 8,
            "X-Dais-Project": "p1",
        }

    def test_extends_a_trusted_forwarded_chain(self):
        """A chain from a trusted proxy is kept and the client appended."""
        headers = dict(_headers([], trusted_chain="198.51.100.1, 198.51.100.2"))
        assert headers["X-Forwarded-For"] == "198.51.100.1, 198.51.100.2, 203.0.113.7"

    def test_each_added_header_appears_once(self):
        """Spoofed copies never sit beside the gateway's own values."""
        incoming = [(name, "spoofed") for name in ["X-Forwarded-For", "X-Dais-Key-Id"]]
        names = _names(_headers(incoming))
        assert names.count("x-forwarded-for") == 1
        assert names.count("x-dais-key-id") == 1
