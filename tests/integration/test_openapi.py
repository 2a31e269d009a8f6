"""The OpenAPI contract: shipped, served, valid, and kept by a live server."""

from __future__ import annotations

import importlib.resources
import json
import time
import zlib
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from dais_core.admin import Role
from dais_core.values import DataType
from dais_wsgi.admin import make_admin
from tests.integration.conftest import Gateway
from tests.upstream import Upstream

pytestmark = pytest.mark.integration

DOCS_COPY = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
GATEWAY_PATH = (
    "/project-gateway/webhooks/{projectId}/lineage-version/{lineageVersion}"
    "/{serviceName}/{route}"
)
UPLOAD_PATH = "/integration/v1/resources/{resourceId}"
BINARY = DataType.BINARY
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def packaged() -> bytes:
    """The document as the dais_wsgi package ships it."""
    return importlib.resources.files("dais_wsgi").joinpath("openapi.json").read_bytes()


def document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(packaged())
    return loaded


class TestDocument:
    """One document, in the package, in docs/ and on the wire."""

    def test_docs_copy_package_file_and_served_document_are_identical(
        self, http, gateway
    ):
        response = http.request("GET", f"{gateway.url}/openapi.json")
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/json")
        assert response.data == packaged() == DOCS_COPY.read_bytes()

    def test_is_valid_openapi_3_1(self):
        raw = document()
        assert raw["openapi"].startswith("3.1.")
        schemathesis.openapi.from_dict(raw).validate()

    def test_passes_openapi_spec_validator(self):
        validator = pytest.importorskip("openapi_spec_validator")
        validator.validate(document())

    def test_documents_every_endpoint(self):
        paths = document()["paths"]
        assert set(paths) == {
            GATEWAY_PATH,
            UPLOAD_PATH,
            "/admin/v1/keys",
            "/admin/v1/keys/{key_id}",
            "/admin/v1/keys/{key_id}/revoke",
            "/admin/v1/keys/{key_id}/rotate",
            "/admin/v1/keys/{key_id}/expiry",
            "/admin/v1/keys/{key_id}/permissions",
            "/admin/v1/keys/{key_id}/grants",
            "/admin/v1/services",
            "/admin/v1/explain",
            "/admin/v1/admins",
            "/admin/v1/audit",
            "/app/login",
            "/app/logout",
            "/app/{project}/admin/apikeys",
            "/healthz",
            "/readyz",
            "/metrics",
            "/openapi.json",
        }
        methods = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
        assert methods <= set(paths[GATEWAY_PATH])

    def test_every_error_response_is_the_common_error_object(self):
        raw = document()
        shared = raw["components"]["responses"]
        error = {"$ref": "#/components/schemas/Error"}
        # Readiness lists its checks; a failed login shows the form again.
        own_shapes = {("get", "/readyz", "503"), ("post", "/app/login", "401")}
        for path, item in raw["paths"].items():
            for method, operation in item.items():
                if method == "parameters":
                    continue
                for status, response in operation["responses"].items():
                    if not status.isdigit() or int(status) < 400:
                        continue
                    if (method, path, status) in own_shapes:
                        continue
                    if "$ref" in response:
                        response = shared[response["$ref"].rsplit("/", 1)[1]]
                    content = response["content"]
                    where = f"{method.upper()} {path} {status}"
                    assert content["application/json"]["schema"] == error, where
                    assert set(content) <= {"application/json", "text/html"}, where


# ---------------------------------------------------------------- schemathesis


class Live:
    """A live gateway with a service, a key, an admin and the loaded document.

    The key may call every route of service ``svc`` of project ``p1`` (lineage
    version 1, a real upstream on loopback) and publish ``report.bin``. Each
    operation of the admin API gets a fresh key of ``p1`` of its own to change.
    """

    def __init__(self, gateway: Gateway, upstream: Upstream) -> None:
        self.gateway = gateway
        self.upstream = upstream
        gateway.add_service("p1", 1, "svc", upstream.url)
        _, api_key = gateway.make_key(
            "p1",
            permissions=(("svc", "/"),),
            grants=(("report.bin", ("filemanager://p1/inbox/report.bin",), BINARY),),
        )
        admin = make_admin(gateway.store, Role.PLATFORM, None, "openapi", time.time())
        config = schemathesis.Config.from_dict(
            {
                "base-url": gateway.url,
                "request-timeout": 10,
                "auth": {
                    "openapi": {
                        "apiKey": {"bearer": api_key},
                        "adminToken": {"bearer": admin["token"]},
                    }
                },
            }
        )
        self.schema = schemathesis.openapi.from_dict(document(), config=config)
        self.statuses: dict[str, list[int]] = {}

    def target_key(self) -> str:
        key_id, _ = self.gateway.make_key(
            "p1",
            permissions=(("svc", "/api"),),
            grants=(("exports/", ("filemanager://p1/exports/",), BINARY),),
        )
        return key_id


def _half(value: Any) -> bool:
    """Pick about half of the generated values, the same ones on a replay."""
    return zlib.crc32(repr(value).encode()) % 2 == 0


def _aim(case: Any, target_key: str) -> None:
    """Point about half of the cases at things that exist.

    Random names reach nothing but 4xx; the aimed cases call the registered
    service, publish the granted resource, or change the operation's own key.
    """
    path = case.operation.path
    params = case.path_parameters or {}
    if path == GATEWAY_PATH and _half(params["route"]):
        route = "".join(ch for ch in params["route"] if ch.isascii() and ch.isalnum())
        params["projectId"], params["serviceName"] = "p1", "svc"
        if params["lineageVersion"] != "latest":
            params["lineageVersion"] = "1"
        params["route"] = route or "hook"
    elif path == UPLOAD_PATH and _half(params["resourceId"]):
        params["resourceId"] = "report.bin"
    elif "key_id" in params and _half(params["key_id"]):
        params["key_id"] = target_key
    elif path == "/app/{project}/admin/apikeys" and _half(params["project"]):
        params["project"] = "p1"
    elif (
        path == "/admin/v1/explain" and isinstance(case.body, dict) and _half(case.body)
    ):
        case.body["key_id"] = target_key


def _run(live: Live, operation: Any, mode: GenerationMode) -> None:
    """Send up to 25 generated requests of one operation and check each answer."""
    target_key = live.target_key()
    statuses = live.statuses.setdefault(operation.label, [])

    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(
        max_examples=25,
        deadline=5000,
        derandomize=True,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    def run(case: Any) -> None:
        _aim(case, target_key)
        statuses.append(case.call_and_validate(checks=CHECKS).status_code)

    run()


def _run_coverage(live: Live, operation: Any) -> None:
    """Send schemathesis' deterministic boundary and near-miss requests."""
    target_key = live.target_key()
    statuses = live.statuses.setdefault(operation.label, [])
    cases = live.schema.iter_coverage_cases(
        operation,
        generation_modes=list(GenerationMode),
        generation_config=live.schema.config.generation_for(operation=operation),
    )
    problems = []
    for case in cases:
        if case.method.upper() != operation.method.upper():
            continue  # probes of undocumented methods: 405 by design
        _aim(case, target_key)
        try:
            statuses.append(case.call_and_validate(checks=CHECKS).status_code)
        except (Exception, BaseExceptionGroup) as exc:
            problems.append(str(exc))
    if problems:
        raise AssertionError("\n".join(problems))


def test_live_server_keeps_the_contract(gateway, upstream):
    """No 5xx, and every status, media type and body is as documented.

    Every operation gets schemathesis' boundary cases, then up to 25 valid
    and 25 invalid generated requests (derandomized, so a run is
    reproducible); every failing operation is reported, not only the first.
    """
    live = Live(gateway, upstream)
    failures = []
    for result in live.schema.get_all_operations():
        operation = result.ok()
        try:
            _run_coverage(live, operation)
        except AssertionError as exc:
            failures.append(f"{operation.label} (coverage):\n{exc}")
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _run(live, operation, mode)
            except hypothesis.errors.Unsatisfiable:
                # Nothing to make invalid: no parameters and no body.
                assert mode is GenerationMode.NEGATIVE, operation.label
            except (Exception, BaseExceptionGroup) as exc:
                failures.append(f"{operation.label} ({mode.value}):\n{exc}")
    assert not failures, "\n\n".join(failures)
    # The requests reached past authentication, and the aimed ones got through.
    for label, statuses in live.statuses.items():
        assert set(statuses) - {401}, f"{label} answered only {set(statuses)}"
    assert upstream.calls, "no generated webhook call reached the service"
    assert 200 in live.statuses[f"POST {UPLOAD_PATH}"], "no upload was published"


# Inputs the document allows (or that are merely malformed) on which the server
# answered 5xx: the first was found by the schemathesis run above when run
# with random seeds, the others by probing around it. Each step is checked like
# a generated case; ``{target}`` and ``{key_id}`` are a fresh key of p1.
PINNED = {
    "service-lineage-version-over-64-bits": [
        (
            "POST",
            "/admin/v1/services",
            {
                "project": "p1",
                "lineage_version": 2**64,
                "service": "svc",
                "url": "http://127.0.0.1:9",
            },
        ),
    ],
    "service-url-unparsable": [
        (
            "POST",
            "/admin/v1/services",
            {
                "project": "p1",
                "lineage_version": 1,
                "service": "svc",
                "url": "http://[",
            },
        ),
    ],
    "explain-url-unparsable": [
        (
            "POST",
            "/admin/v1/explain",
            {"key_id": "{target}", "method": "GET", "url": "http://["},
        ),
    ],
    "rotate-overlap-past-year-9999": [
        ("POST", "/admin/v1/keys/{key_id}/rotate", {"overlap_seconds": 1e300}),
        ("GET", "/admin/v1/keys", None),
    ],
    "expiry-past-year-9999-in-utc": [
        (
            "POST",
            "/admin/v1/keys/{key_id}/expiry",
            {"expires": "9999-12-31T23:59:59-23:59"},
        ),
        ("GET", "/admin/v1/keys/{key_id}", None),
    ],
    "created-expiry-before-year-1-in-utc": [
        (
            "POST",
            "/admin/v1/keys",
            {"project": "p1", "expires": "0001-01-01T00:00+23:59"},
        ),
        ("GET", "/admin/v1/keys", None),
    ],
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_pinned_inputs_keep_the_contract(name, gateway, upstream):
    """Requests once answered 5xx, replayed with the same checks."""
    live = Live(gateway, upstream)
    target = live.target_key()
    admin = make_admin(gateway.store, Role.PLATFORM, None, "pinned", time.time())
    failures = []
    for method, path, body in PINNED[name]:
        operation = live.schema[path][method]
        if isinstance(body, dict):
            body = {k: target if v == "{target}" else v for k, v in body.items()}
        case = operation.Case(
            path_parameters={"key_id": target} if "{key_id}" in path else None,
            headers={"Authorization": f"Bearer {admin['token']}"},
            **(
                {} if body is None else {"body": body, "media_type": "application/json"}
            ),
        )
        try:
            case.call_and_validate(checks=CHECKS)
        except (Exception, BaseExceptionGroup) as exc:
            failures.append(f"{method} {path} {json.dumps(body)}:\n{exc}")
    assert not failures, "\n\n".join(failures)
