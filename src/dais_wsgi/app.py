"""The Falcon application: the two endpoints, one error handler, one log line.

Both endpoints are sinks that read the raw request target (``REQUEST_URI``)
themselves, so the route is checked in exactly the form the client sent, not
in the form a router decoded.
"""

from __future__ import annotations

import email.message
import importlib.resources
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Iterator
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

import falcon
import http_sf
from falcon.media.multipart import MultipartForm, MultipartParseOptions
from falcon.util import BufferedReader

from dais_adapters.cache import cause_of
from dais_core.errors import (
    Busy,
    DaisError,
    InvalidData,
    InvalidResourceId,
    InvalidRoute,
    NotFound,
    Throttled,
    TooLarge,
    Unavailable,
    UnsupportedType,
    status_for,
)
from dais_core.gateway import (
    parse_gateway_path,
    relayable_status,
    split_target,
    upstream_headers,
    valid_request_id,
)
from dais_core.keys import shown
from dais_core.policies import Decision, RatePolicy, Target, Throttler, map_resource
from dais_core.ports import ForwardRequest
from dais_core.rules import resource_id_from_target
from dais_core.usecases import PublishResult, authenticate, authorise_call, publish
from dais_core.values import Credential, ForwardRecord, PublishRecord
from dais_wsgi.admin import add_admin_routes
from dais_wsgi.affinity import widened
from dais_wsgi.area import area_error
from dais_wsgi.bodies import strict_json
from dais_wsgi.bootstrap import Runtime
from dais_wsgi.metrics import Health, Metrics, MetricsResource, Readiness

__all__ = ["UPLOAD_PREFIX", "caller_scheme", "create_app", "log_request"]

#: Codes of Falcon's own errors (a bad query parameter, an unrouted path),
#: the same as the domain errors' of the same status.
_FALCON_CODES = {
    400: InvalidData.code,
    404: NotFound.code,
    413: TooLarge.code,
    415: UnsupportedType.code,
}

log = logging.getLogger("dais.access")
errors_log = logging.getLogger("dais.errors")

UPLOAD_PREFIX = "/integration/v1/resources/"
SHA256_BYTES = 32
_HEX_SHA256 = re.compile(r"[0-9A-Fa-f]{64}")
CHUNK_SIZE = 1024 * 1024
READ_SIZE = 256 * 1024
#: A multipart boundary's characters (RFC 2046, section 5.1.1); the last is
#: not a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,./:=? -]*[0-9A-Za-z'()+_,./:=?-]")
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[\t -~])*"'
_PARAMETER = rf"[ \t]*;[ \t]*(?:{_TOKEN}=(?:{_TOKEN}|{_QUOTED}))?"
#: A multipart/form-data media type and its parameters, each a token or a
#: quoted string (RFC 9110, sections 5.6 and 8.3.1).
_FORM_DATA = re.compile(rf"(?i)multipart/form-data(?:{_PARAMETER})*[ \t]*")


def _parameter_names(content_type: str) -> list[str]:
    """Return the names of a media type's parameters, in lower case, in order."""
    message = email.message.Message()
    message["Content-Type"] = content_type
    params = message.get_params(header="content-type") or []
    return [name.lower() for name, _ in params[1:]]


def raw_path(req: falcon.Request) -> str:
    """Return the request target's path exactly as the client sent it."""
    target = req.env.get("REQUEST_URI")
    if target is None:
        # Not behind waitress: rebuild a percent-encoded path from PATH_INFO.
        return quote(req.env.get("SCRIPT_NAME", "") + req.env.get("PATH_INFO", ""))
    if not target.startswith("/"):
        # Absolute form, read as the gateway reads every target.
        return split_target(str(target))[0] or "/"
    return str(target).partition("?")[0]


def raw_query(req: falcon.Request) -> str | None:
    """Return the query string exactly as the client sent it.

    ``None`` when the target has no ``?``; ``""`` when it ends in one.
    """
    target = req.env.get("REQUEST_URI")
    if target is None:
        return str(req.query_string) or None
    _, question, query = str(target).partition("?")
    if "#" in query:
        # A request target has no fragment (RFC 9112, 3.2): dropping it
        # silently would forward another query than the caller wrote.
        raise InvalidRoute("the request target may not hold a fragment ('#')")
    return query if question else None


def _rate_headers(
    resp: falcon.Response, name: str, policy: RatePolicy, d: Decision
) -> None:
    resp.set_header(
        "RateLimit-Policy", f'"{name}";q={policy.burst};w={math.ceil(policy.period)}'
    )
    resp.set_header(
        "RateLimit", f'"{name}";r={d.remaining};t={math.ceil(d.reset_after)}'
    )


def _handle_dais_error(
    req: falcon.Request, resp: falcon.Response, exc: DaisError, params: Any
) -> None:
    resp.status = status_for(exc)
    resp.media = exc.body()
    req.context.error = exc.code
    if isinstance(exc, (Throttled, Busy)):
        resp.set_header("Retry-After", str(max(1, math.ceil(exc.retry_after))))
    if isinstance(exc, Busy):
        req.context.metrics.throttle.labels("busy", "throttled").inc()
    if isinstance(exc, Throttled):
        if isinstance(exc.decision, Decision):
            rate: tuple[str, RatePolicy] = getattr(req.context, "rate", None) or (
                req.context.template,
                RatePolicy(),
            )
            policy_name = rate[0]
            _rate_headers(resp, rate[0], rate[1], exc.decision)
        else:
            # A cap on calls in flight at once, not a rate.
            policy_name = f"{req.context.template}_in_flight"
        req.context.metrics.throttle.labels(policy_name, "throttled").inc()
    if resp.status == 500 or (
        isinstance(exc, Unavailable) and not isinstance(exc, Busy)
    ):
        # The driver's own words say why, where the caller's message may not.
        errors_log.warning(
            "request %s failed: %s%s",
            req.context.request_id,
            exc.message,
            cause_of(exc),
        )
    if req.path.startswith("/app/"):
        area_error(req, resp, exc.message)


def _handle_http_error(
    req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError, params: Any
) -> None:
    resp.status = exc.status
    status = exc.status_code
    # The domain's code where the spec's table names the status; otherwise
    # the status's name ("method_not_allowed").
    code = _FALCON_CODES.get(status) or HTTPStatus(status).phrase.lower().replace(
        " ", "_"
    )
    message = exc.description or exc.title
    resp.media = {"error": code, "message": message}
    if exc.headers:
        resp.set_headers(exc.headers)
    if req.path.startswith("/app/"):
        area_error(req, resp, message)


def _handle_unexpected(
    req: falcon.Request, resp: falcon.Response, exc: Exception, params: Any
) -> None:
    errors_log.exception("request %s crashed", req.context.get("request_id"))
    resp.status = 500
    resp.media = {"error": "internal_error", "message": "internal error"}


class CallerScheme:
    """Note how the caller reached the gateway, ``http`` or ``https``.

    Behind a trusted proxy (``trust_forwarded``), which terminates TLS, that
    is the last ``X-Forwarded-Proto`` value, the one the proxy set; otherwise
    it is the connection's own scheme. Stored as ``req.context.scheme``.

    Args:
        trusted: Whether a proxy in front sets ``X-Forwarded-Proto``.
    """

    def __init__(self, trusted: bool) -> None:
        self.trusted = trusted

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Set ``req.context.scheme``."""
        req.context.scheme = caller_scheme(
            req.scheme, req.get_header("X-Forwarded-Proto"), self.trusted
        )


def caller_scheme(own: str, forwarded_proto: str | None, trusted: bool) -> str:
    """Return how the caller reached the gateway (see :class:`CallerScheme`).

    Args:
        own: The connection's own scheme.
        forwarded_proto: The request's ``X-Forwarded-Proto``, if any.
        trusted: Whether a proxy in front sets that header.
    """
    if trusted:
        last = (forwarded_proto or "").rpartition(",")[2].strip().lower()
        if last in {"http", "https"}:
            return last
    return own


class AccessLog:
    """Give each request an id, count it, and write one INFO line for it.

    Args:
        metrics: Where requests are counted.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        caller_id = req.get_header("X-Request-Id")
        req.context.request_id = (
            caller_id if valid_request_id(caller_id) else uuid.uuid4().hex
        )
        req.context.started = time.perf_counter()
        req.context.key_id = "-"
        req.context.template = "-"
        req.context.metrics = self.metrics
        resp.set_header("X-Request-Id", req.context.request_id)

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, ok: bool
    ) -> None:
        status = str(resp.status)[:3]
        self.metrics.requests.labels(req.context.template, status).inc()
        log_request(
            req.method,
            req.context.template,
            status,
            req.content_length or 0,
            req.context.started,
            req.context.key_id,
            req.context.request_id,
        )


def log_request(
    method: str,
    template: str,
    status: str,
    length: int,
    started: float,
    key_id: str,
    request_id: str,
) -> None:
    """Write a request's one access log line.

    Args:
        method: The request's method.
        template: The endpoint (``gateway``, ``upload``, a route template).
        status: The status answered, three digits.
        length: The request body's declared length.
        started: ``time.perf_counter()`` when the request was read.
        key_id: The verified key's id, or ``-``.
        request_id: The request's id.
    """
    log.info(
        "%s %s %s %d %.1fms key=%s id=%s",
        method,
        template,
        status,
        length,
        (time.perf_counter() - started) * 1000,
        key_id,
        request_id,
    )


def _expected_digest(req: falcon.Request) -> str | None:
    """Return the SHA-256 the client announced, hex, if it announced one.

    ``Content-Digest`` (RFC 9530, ``sha-256`` only; other algorithms are not
    checked) and ``X-Checksum-SHA256`` are both read; when both are sent
    they must agree.
    """
    announced = {
        digest
        for digest in (_content_digest(req), _checksum_header(req))
        if digest is not None
    }
    if len(announced) > 1:
        raise InvalidData("Content-Digest and X-Checksum-SHA256 disagree")
    return announced.pop() if announced else None


def _content_digest(req: falcon.Request) -> str | None:
    """The ``sha-256`` member of ``Content-Digest``, hex, if there is one.

    The field is a structured-field dictionary (RFC 8941), read as that RFC
    says: of members named twice the last counts, parameters after a value
    are ignored, and a comma inside a quoted parameter separates nothing.
    """
    header = req.get_header("Content-Digest")
    if header is None:
        return None
    try:
        members = http_sf.parse(header.encode("latin-1"), tltype="dictionary")
    except http_sf.StructuredFieldError as exc:
        raise InvalidData(f"Content-Digest is not a structured field: {exc}") from None
    if not isinstance(members, dict) or "sha-256" not in members:
        return None
    member = members["sha-256"]
    value = member[0] if isinstance(member, tuple) else None
    if not isinstance(value, bytes):
        raise InvalidData("Content-Digest sha-256 is not a byte sequence (:...:)")
    if len(value) != SHA256_BYTES:
        raise InvalidData(f"Content-Digest sha-256 is not {SHA256_BYTES} bytes")
    return value.hex()


def _checksum_header(req: falcon.Request) -> str | None:
    plain = req.get_header("X-Checksum-SHA256")
    if plain is None:
        return None
    if not _HEX_SHA256.fullmatch(plain.strip(" \t")):
        raise InvalidData("X-Checksum-SHA256 is not 64 hexadecimal digits")
    return plain.strip(" \t").lower()


def _file_chunks(form: MultipartForm) -> Iterator[bytes]:
    """Yield the bytes of the one file part named ``data``, then check the rest."""
    seen = False
    try:
        for part in form:
            if part.filename is None:
                if part.name == "data":
                    raise InvalidData("the 'data' field must be a file")
                continue
            if part.name != "data":
                raise InvalidData(
                    f"unexpected file field {shown(part.name or '')}; use 'data'"
                )
            if seen:
                raise InvalidData("send exactly one file per request")
            if "/" in part.filename:
                # A folder's files come as "folder/name"; a Windows path
                # ("C:\\dir\\name", from older browsers) is one file, and the
                # name is not used anyway.
                raise InvalidData("directory uploads are not supported")
            seen = True
            stream = part.stream
            while chunk := stream.read(CHUNK_SIZE):
                yield chunk
    except falcon.MediaMalformedError as exc:
        raise InvalidData(f"malformed multipart body: {exc.description}") from exc
    except UnicodeDecodeError as exc:
        # Falcon reads a part's name and file name as UTF-8 (RFC 7578).
        raise InvalidData(
            "malformed multipart body: a part header is not UTF-8"
        ) from exc
    if not seen:
        raise InvalidData("the body has no file part named 'data'")


def _authenticated(req: falcon.Request, runtime: Runtime) -> Credential:
    """Verify the bearer key and name it in the access log."""
    credential = authenticate(
        runtime.keys, req.get_header("Authorization"), runtime.clock()
    )
    req.context.key_id = credential.key.id
    return credential


def _throttled(
    req: falcon.Request, resp: falcon.Response, name: str, throttler: Throttler
) -> None:
    """Take one request from the key's allowance and say what is left."""
    req.context.rate = (name, throttler.policy)
    decision = throttler.check(req.context.key_id)
    req.context.metrics.throttle.labels(name, "allowed").inc()
    _rate_headers(resp, name, throttler.policy, decision)


def _resource_id(path: str) -> str:
    if not path.startswith(UPLOAD_PREFIX):
        raise InvalidResourceId("the resource id must follow " + UPLOAD_PREFIX)
    return resource_id_from_target(path[len(UPLOAD_PREFIX) :])


class UploadSink:
    """``POST /integration/v1/resources/{resourceId...}``."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.options = MultipartParseOptions()
        self.options.max_body_part_count = 16
        self.options.max_body_part_headers_size = 8192
        self.options.max_body_part_buffer_size = 64 * 1024

    def __call__(self, req: falcon.Request, resp: falcon.Response, **_: Any) -> None:
        req.context.template = "upload"
        if req.method != "POST":
            raise falcon.HTTPMethodNotAllowed(["POST"])
        runtime = self.runtime
        credential = _authenticated(req, runtime)
        resource_id = _resource_id(raw_path(req))
        target = map_resource(credential.grants, resource_id)
        _throttled(req, resp, "upload", runtime.upload_throttle)

        form = self._form(req)
        expected = _expected_digest(req)
        key_id = credential.key.id
        in_flight = runtime.uploads_in_flight.held(key_id)
        # Hashing and disk waits run without the GIL: let them use every CPU.
        with in_flight, runtime.slow_requests.held(), widened():
            result = self._publish(req, key_id, resource_id, target, form, expected)
        resp.media = {
            "resource": result.resource,
            "size": result.size,
            "sha256": result.sha256,
            "locations": list(result.locations),
        }

    def _form(self, req: falcon.Request) -> MultipartForm:
        """Check the framing from the headers; return the form to stream."""
        settings = self.runtime.settings
        boundary = self._boundary(req)
        limit = settings.max_upload_bytes + settings.multipart_overhead
        if req.content_length is not None and req.content_length > limit:
            raise TooLarge(f"the body is over the limit of {limit} bytes")
        length = req.content_length or limit
        # Falcon reads 32 KiB at a time by default; uploads are large.
        reader = BufferedReader(req.stream.read, length, chunk_size=READ_SIZE)
        return MultipartForm(reader, boundary, length, self.options)

    def _publish(
        self,
        req: falcon.Request,
        key_id: str,
        resource_id: str,
        target: Target,
        form: MultipartForm,
        expected: str | None,
    ) -> PublishResult:
        """Publish the form's file, and record the attempt, whatever its end."""
        runtime = self.runtime
        started = time.perf_counter()
        outcome, result = "failed", None
        # What is known of the file, should the publish fail after reading it.
        received: dict[str, Any] = {}
        try:
            result = publish(
                resource_id,
                target,
                _file_chunks(form),
                runtime.storages,
                max_size=runtime.settings.max_upload_bytes,
                expected_sha256=expected,
                inspector=runtime.inspector,
                locks=runtime.commit_locks,
            )
            outcome = "published"
            req.context.metrics.uploaded.inc(result.size)
        except DaisError as exc:
            outcome = exc.code
            received = exc.detail
            raise
        finally:
            if result is not None:
                received = {"size": result.size, "sha256": result.sha256}
            self._record(req, key_id, resource_id, target, received, outcome, started)
        return result

    def _boundary(self, req: falcon.Request) -> bytes:
        content_type = req.content_type or ""
        media_type, params = falcon.parse_header(content_type)
        # Media types are case-insensitive (RFC 9110, section 8.3.1).
        if media_type.lower() != "multipart/form-data":
            raise UnsupportedType("send the file as multipart/form-data")
        boundary = params.get("boundary", "")
        if not 1 <= len(boundary) <= 70:
            raise InvalidData("the multipart boundary is missing or too long")
        if not _BOUNDARY.fullmatch(boundary):
            raise InvalidData("the multipart boundary has characters it cannot have")
        if not _FORM_DATA.fullmatch(content_type):
            # Parsers part a value that breaks the grammar in different
            # places (an unquoted ',' or space): each would see another body.
            raise InvalidData("the Content-Type is not well-formed (RFC 9110, 8.3)")
        if _parameter_names(content_type).count("boundary") > 1:
            # Parsers keep one or the other: each would see another body.
            raise InvalidData("the Content-Type names more than one boundary")
        return boundary.encode("ascii")

    def _record(
        self,
        req: falcon.Request,
        key_id: str,
        resource_id: str,
        target: Any,
        received: dict[str, Any],
        outcome: str,
        started: float,
    ) -> None:
        size, sha256 = received.get("size"), received.get("sha256")
        record = PublishRecord(
            key_id=key_id,
            resource=resource_id,
            size=size if isinstance(size, int) else 0,
            sha256=sha256 if isinstance(sha256, str) else "",
            locations=tuple(loc.uri for loc in target.locations),
            outcome=outcome,
            duration=time.perf_counter() - started,
            request_id=req.context.request_id,
            at=self.runtime.clock(),
        )
        try:
            self.runtime.keys.record_publish(record)
            self.runtime.hooks.dais_publish_recorded(record=record)
        except DaisError as exc:
            errors_log.warning(
                "could not record publish %s: %s", record.request_id, exc
            )


class _LimitedBody:
    """A request body that refuses to run past the gateway's limit."""

    def __init__(self, stream: Any, limit: int) -> None:
        self.stream = stream
        self.limit = limit
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        chunk: bytes = self.stream.read(size if size and size > 0 else CHUNK_SIZE)
        self.count += len(chunk)
        if self.count > self.limit:
            raise TooLarge(f"the body is over the limit of {self.limit} bytes")
        return chunk


def _caller_headers(req: falcon.Request) -> Iterator[tuple[str, str]]:
    for name, value in req.env.items():
        if name.startswith("HTTP_"):
            yield name[5:].replace("_", "-").title(), value
    if req.content_type:
        yield "Content-Type", req.content_type


class GatewaySink:
    """``ANY /project-gateway/webhooks/{projectId}/lineage-version/{v}/{service}/...``."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def __call__(self, req: falcon.Request, resp: falcon.Response, **_: Any) -> None:
        req.context.template = "gateway"
        runtime = self.runtime
        credential = _authenticated(req, runtime)
        call = parse_gateway_path(raw_path(req))
        route = authorise_call(
            credential, call, req.method, raw_query(req), runtime.registry
        )
        if runtime.gateway_throttle is not None:
            _throttled(req, resp, "gateway", runtime.gateway_throttle)

        body = self._body(req)
        forwarded = ForwardRequest(
            req.method,
            route.url,
            self._headers(req, credential.key.id, call.project),
            body,
            req.content_length or None,
        )
        started = time.perf_counter()
        in_flight = runtime.gateway_in_flight.held(credential.key.id)
        with in_flight, runtime.slow_requests.held():
            status = runtime.forwarder.forward(forwarded)
        req.context.metrics.upstream.observe(time.perf_counter() - started)

        self._record(req, credential.key.id, call, route, status, started, body)
        resp.status = relayable_status(status)
        resp.set_header("Dais-Lineage-Version", str(route.endpoint.lineage_version))
        resp.data = b""

    def _body(self, req: falcon.Request) -> _LimitedBody | None:
        """Return the body to stream upstream, refused early if over the limit."""
        limit = self.runtime.settings.max_gateway_body
        length = req.content_length
        if length is not None and length > limit:
            raise TooLarge(f"the body is over the limit of {limit} bytes")
        chunked = "chunked" in (req.get_header("Transfer-Encoding") or "").lower()
        return _LimitedBody(req.stream, limit) if length or chunked else None

    def _headers(
        self, req: falcon.Request, key_id: str, project: str
    ) -> tuple[tuple[str, str], ...]:
        """Return the cleaned caller headers plus the gateway's own."""
        trusted = self.runtime.settings.trust_forwarded
        return upstream_headers(
            _caller_headers(req),
            client=req.remote_addr or "",
            proto=req.context.scheme,
            # As sent: Falcon's req.host drops the port and an IPv6 literal's
            # brackets.
            host=req.get_header("Host") or "",
            request_id=req.context.request_id,
            key_id=key_id,
            project=project,
            trusted_chain=req.get_header("X-Forwarded-For") if trusted else None,
        )

    def _record(
        self,
        req: falcon.Request,
        key_id: str,
        call: Any,
        route: Any,
        status: int,
        started: float,
        body: _LimitedBody | None,
    ) -> None:
        record = ForwardRecord(
            key_id=key_id,
            project=call.project,
            service=call.service,
            lineage_version=route.endpoint.lineage_version,
            method=req.method,
            route=call.route,
            status=status,
            latency=time.perf_counter() - started,
            bytes_in=body.count if body else 0,
            request_id=req.context.request_id,
            at=self.runtime.clock(),
        )
        try:
            self.runtime.keys.record_forward(record)
            self.runtime.hooks.dais_forward_recorded(record=record)
        except DaisError as exc:
            errors_log.warning(
                "could not record forward %s: %s", record.request_id, exc
            )


class OpenAPIDocument:
    """``GET /openapi.json``: the OpenAPI 3.1 contract of this service."""

    def __init__(self) -> None:
        package = importlib.resources.files("dais_wsgi")
        self.document = package.joinpath("openapi.json").read_bytes()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Serve the document as shipped in the package."""
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self.document


def _ready_checks(runtime: Runtime) -> dict[str, Callable[[], Any]]:
    store = getattr(runtime.keys, "store", runtime.keys)
    candidates: dict[str, Any] = {
        "key_store": store,
        "throttle": runtime.upload_throttle.state,
    }
    candidates |= {f"storage:{scheme}": s for scheme, s in runtime.storages.items()}
    checks = {}
    for name, adapter in candidates.items():
        ping = getattr(adapter, "ping", None)
        if callable(ping):
            checks[name] = ping
    return checks


def create_app(
    runtime: Runtime, metrics: Metrics | None = None
) -> falcon.App[falcon.Request, falcon.Response]:
    """Build the WSGI application over a wired runtime.

    Args:
        runtime: The wired gateway.
        metrics: Where requests are counted (new ones, if not given).
    """
    metrics = metrics or Metrics(runtime)
    middleware: list[Any] = [
        AccessLog(metrics),
        CallerScheme(runtime.settings.trust_forwarded),
    ]
    app = falcon.App(middleware=middleware)
    app.req_options.media_handlers[falcon.MEDIA_JSON] = falcon.media.JSONHandler(
        loads=strict_json
    )
    app.req_options.strip_url_path_trailing_slash = False
    app.add_error_handler(Exception, _handle_unexpected)
    app.add_error_handler(falcon.HTTPError, _handle_http_error)
    app.add_error_handler(DaisError, _handle_dais_error)
    add_admin_routes(app, runtime)
    app.add_route("/healthz", Health())
    app.add_route("/openapi.json", OpenAPIDocument())
    app.add_route("/readyz", Readiness(_ready_checks(runtime)))
    app.add_route("/metrics", MetricsResource(metrics))
    app.add_sink(UploadSink(runtime), r"/integration/v1/resources(?:/|$)")
    app.add_sink(GatewaySink(runtime), r"/project-gateway/webhooks(?:/|$)")
    return app
