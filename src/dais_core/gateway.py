"""Pure rules of the project gateway: reading the target, cleaning headers."""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

import attrs

from dais_core.errors import InvalidData, InvalidRoute, UpstreamUnreachable
from dais_core.keys import holds_token
from dais_core.rules import check_name, normalise_route

__all__ = [
    "GATEWAY_PREFIX",
    "HOP_BY_HOP",
    "GatewayCall",
    "parse_gateway_path",
    "relayable_status",
    "routed_to_gateway",
    "split_target",
    "upstream_headers",
    "upstream_url",
    "valid_host",
    "valid_request_id",
]

GATEWAY_PREFIX = "/project-gateway/webhooks/"
_GATEWAY_ROUTED = re.compile(r"/+project-gateway/webhooks(?:/|$)")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Caller headers never passed on: credentials, framing the forwarder sets
# itself, and anything the gateway itself asserts to the upstream.
_DROPPED = frozenset(
    {
        "authorization",
        "cookie",
        "host",
        "content-length",
        "expect",
        "forwarded",
        "x-real-ip",
        "x-request-id",
        # Method overrides: the upstream must act on the method that was
        # checked against the key's permission, not on another one.
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-method",
        # Path overrides: some frameworks and rewrite modules route on these
        # instead of the request line, which is what the permission checked.
        "x-original-url",
        "x-rewrite-url",
        "x-original-uri",
        "x-override-url",
        "x-original-path",
        "x-request-uri",
        "x-envoy-original-path",
        # Host overrides: the upstream learns the caller's host from
        # X-Forwarded-Host, which the gateway sets itself.
        "x-original-host",
        "x-host",
        # Client address claims: the upstream learns the caller's address
        # from X-Forwarded-For, which the gateway sets (or extends, from a
        # trusted proxy) itself.
        "client-ip",
        "true-client-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
        "x-envoy-external-address",
        # CGI-style upstreams would read it as HTTP_PROXY ("httpoxy").
        "proxy",
    }
)
_HOST = re.compile(
    r"[A-Za-z0-9.-]{1,253}(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](?::[0-9]{1,5})?"
)
# Prefixes of headers the gateway asserts itself (or that only a trusted
# proxy may assert), and of the proxy's own fields (Proxy-Authorization,
# Proxy-Status, ...), which concern the hop to the gateway: the caller's are
# dropped, whatever follows the prefix.
_DROPPED_PREFIXES = ("x-dais-", "dais-", "x-forwarded-", "proxy-")
#: A Host field value (RFC 9112, section 3.2): an RFC 3986 host, then an
#: optional port; empty when the target has no authority. A comma, which
#: RFC 3986 allows in a name but no DNS name holds, is refused: two Host
#: lines joined by a proxy would read as one.
_HOST_FIELD = re.compile(
    r"(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9\-._~!$&'()*+;=%]{1,255})(?::[0-9]{0,5})?|"
)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: A query a URL can carry as it is: visible ASCII but ``#``, and ``%`` only
#: as the start of an escape of two hex digits (RFC 3986, sections 2.1, 3.4).
_QUERY = re.compile(r"(?:[\x21\x22\x24\x26-\x7e]|%[0-9A-Fa-f]{2})*")
#: The statuses an answer relayed to the caller may have.
_FINAL_STATUSES = range(200, 600)
_VERSION = re.compile(r"[1-9][0-9]{0,9}")


@attrs.frozen
class GatewayCall:
    """A gateway request target, checked.

    ``lineage_version`` is ``None`` for ``latest``; ``route`` is canonical.
    """

    project: str
    lineage_version: int | None
    service: str
    route: str


def routed_to_gateway(path: str) -> bool:
    """Return whether the server hands a raw path to the gateway at all.

    It routes on the decoded path, leading slashes taken as one; the gateway
    then reads the path as sent, so a routed path that is no gateway path
    as sent is a 400 there, and an unrouted one the server's 404.
    """
    return _GATEWAY_ROUTED.match(unquote(path)) is not None


def split_target(target: str) -> tuple[str, str | None]:
    """Split a request target into its raw path and query, as the gateway does.

    The gateway takes a target in origin form (``/path?query``) or in
    absolute form (``http(s)://host[:port]/path?query``); nothing in either
    is decoded here. Anything else with no scheme (``*``, a path without
    its leading ``/``) is returned as a path that no route takes.

    Returns:
        The percent-encoded path, and the query (``None`` without a ``?``).

    Raises:
        InvalidRoute: The target holds a ``#``, a space or a control
            character, or is absolute with another scheme, no host, user
            information or a host that is not one host[:port]: the gateway
            answers such a target 400.
    """
    if "#" in target:
        raise InvalidRoute("a request target cannot hold a fragment ('#')")
    if any(ch <= " " or ch == "\x7f" for ch in target):
        # URL parsers drop tabs and line breaks silently (WHATWG), which
        # would make another target of this one.
        raise InvalidRoute("a request target holds no spaces or control characters")
    if not target.startswith("/") and ":" in target.partition("/")[0]:
        try:
            parts = urlsplit(target)
        except ValueError:
            parts = None
        if (
            parts is None
            or parts.scheme not in ("http", "https")
            or not valid_host(parts.netloc)
            or not parts.netloc
        ):
            raise InvalidRoute(
                "an absolute request target must be http(s)://host[:port]/path"
            )
        target = target[len(parts.scheme) + len("://") + len(parts.netloc) :]
    path, mark, query = target.partition("?")
    return path, (query if mark else None)


def parse_gateway_path(path: str) -> GatewayCall:
    """Read a raw gateway path (no query) into its checked parts.

    Args:
        path: The percent-encoded path of the request target, starting with
            :data:`GATEWAY_PREFIX`.

    Raises:
        InvalidRoute: The path does not have the gateway's shape, a name is
            unsafe, the version is neither a positive integer nor ``latest``,
            or the route breaks :func:`~dais_core.rules.normalise_route`.
    """
    if not path.startswith(GATEWAY_PREFIX):
        raise InvalidRoute("not a gateway path")
    parts = path[len(GATEWAY_PREFIX) :].split("/", 4)
    if len(parts) < 4 or parts[1] != "lineage-version":
        raise InvalidRoute(
            "expected /project-gateway/webhooks/{projectId}/lineage-version/"
            "{lineageVersion}/{serviceName}/{route}"
        )
    project, _, version_text, service = parts[:4]
    try:
        check_name(project, "projectId")
        check_name(service, "serviceName")
    except InvalidData as exc:
        raise InvalidRoute(exc.message) from None
    if version_text == "latest":
        version = None
    elif _VERSION.fullmatch(version_text):
        version = int(version_text)
    else:
        raise InvalidRoute("lineageVersion must be a positive integer or 'latest'")
    raw_route = "/" + parts[4] if len(parts) == 5 else "/"
    return GatewayCall(project, version, service, normalise_route(raw_route))


def upstream_url(base_url: str, route: str, query: str | None) -> str:
    """Append a canonical route and the untouched query to a base URL.

    ``query`` is ``None`` when the target had no ``?`` at all, and ``""``
    when it ended in a bare ``?``, which is kept.

    Raises:
        InvalidRoute: The query holds a byte a URL cannot carry as it is
            (a control character, a space, a non-ASCII byte) or a ``%`` that
            starts no escape. HTTP clients differ on such queries: one
            refuses them, another escapes every ``%`` again and so changes
            what the query means; so neither is sent.
    """
    if query and _QUERY.fullmatch(query) is None:
        raise InvalidRoute(
            "the query string must be percent-encoded (RFC 3986, section 3.4)"
        )
    url = base_url.rstrip("/") + route
    return url if query is None else f"{url}?{query}"


def relayable_status(status: int) -> int:
    """Return an upstream's final status if the caller can be given it.

    Raises:
        UpstreamUnreachable: The status is not a final one (1xx) or not a
            status at all (600 and over); the upstream's answer is broken.
    """
    if status not in _FINAL_STATUSES:
        raise UpstreamUnreachable(
            f"the upstream service answered with status {status}, which "
            "cannot be relayed"
        )
    return status


def valid_host(value: str) -> bool:
    """Return whether a Host header's value is a host and optional port.

    Two ``Host`` lines arrive joined by ", " (or ","), which no host contains.
    """
    return _HOST_FIELD.fullmatch(value) is not None


def valid_request_id(value: str | None) -> bool:
    """Return whether a caller's request id is safe to keep.

    One holding a key or token is not: request ids are logged, forwarded
    and shown to project admins. (Random ids of mixed case, KSUIDs say, are
    kept: only a token's id between its underscores marks one.)
    """
    return (
        value is not None
        and _REQUEST_ID.fullmatch(value) is not None
        and not holds_token(value)
    )


def upstream_headers(
    incoming: Iterable[tuple[str, str]],
    *,
    client: str,
    proto: str,
    host: str,
    request_id: str,
    key_id: str,
    project: str,
    trusted_chain: str | None = None,
) -> tuple[tuple[str, str], ...]:
    """Return the headers to send upstream.

    Hop-by-hop headers (and those ``Connection`` names), the caller's
    credentials and any header the gateway asserts itself are dropped; the
    forwarding and identity headers are added.

    Args:
        incoming: The caller's headers, in order.
        client: The caller's address as the gateway saw it.
        proto: ``http`` or ``https``, as the caller reached the gateway.
        host: The ``Host`` the caller used.
        request_id: The request id for this call.
        key_id: The verified key id.
        project: The verified project.
        trusted_chain: An ``X-Forwarded-For`` chain from a trusted proxy, to
            extend; ``None`` starts a new chain.
    """
    pairs = list(incoming)
    named = {
        token.strip().lower()
        for name, value in pairs
        if name.lower() == "connection"
        for token in value.split(",")
    }
    kept = [
        (name, value)
        for name, value in pairs
        if (low := name.lower()) not in HOP_BY_HOP
        and low not in _DROPPED
        and low not in named
        and not low.startswith(_DROPPED_PREFIXES)
    ]
    chain = f"{trusted_chain}, {client}" if trusted_chain else client
    kept += [("X-Forwarded-For", chain), ("X-Forwarded-Proto", proto)]
    if _HOST.fullmatch(host):
        # A Host that is not a plain host[:port] is not passed on.
        kept.append(("X-Forwarded-Host", host))
    kept += [
        ("X-Request-Id", request_id),
        ("X-Dais-Key-Id", key_id),
        ("X-Dais-Project", project),
    ]
    return tuple(kept)
