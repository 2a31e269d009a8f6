"""The admin API (``/admin/v1``) and the project admin area (``/app``).

Admin tokens come as ``Authorization: Bearer daisadm_...``, the only
credential ``/admin/v1`` takes. A browser that logged in at ``/app/login``
holds a session in the ``dais_admin`` cookie (HttpOnly, SameSite=Strict)
instead, never the token itself, and it opens the project area only.
Request bodies are read whole (:mod:`dais_wsgi.bodies`) and structured with
cattrs into frozen attrs classes, so an unknown or mistyped field is a 400,
never ignored. Every change is recorded in the audit log.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import cattrs
import falcon
from falcon.routing import BaseConverter

from dais_core.admin import (
    AdminToken,
    AuditRecord,
    Role,
    require_platform,
    successor,
)
from dais_core.errors import InvalidData, NotFound
from dais_core.keys import ADMIN_PREFIX, holds_secret, key_id_of, new_key
from dais_core.rules import (
    MAX_LABEL,
    check_grant_locations,
    check_key_details,
    check_lineage_version,
    check_methods,
    check_name,
    check_resource_id,
    check_service_url,
    check_text,
    check_time,
    normalise_prefix,
)
from dais_core.usecases import explain
from dais_core.values import (
    ApiKey,
    DataType,
    Grant,
    KeyRequest,
    Permission,
    ServiceEndpoint,
)
from dais_wsgi.area import ApiKeysPage, Login, Logout, bearer_admin
from dais_wsgi.bodies import read_media
from dais_wsgi.bootstrap import Runtime
from dais_wsgi.present import audit_json, credential_json, iso, parse_iso

__all__ = ["add_admin_routes", "make_admin"]

_converter = cattrs.Converter(forbid_extra_keys=True)
#: The longest overlap of a rotation: ten years, in seconds.
MAX_OVERLAP = 10 * 366 * 86400.0


def _strict(kind: type[Any]) -> Callable[[Any, type[Any]], Any]:
    # cattrs would turn 7 into "7" and "false" into True: JSON types must match.
    def structure(value: Any, _: type[Any]) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    return structure


for _kind in (str, bool, int, float):
    _converter.register_structure_hook(_kind, _strict(_kind))


def _strict_list(value: Any, _: type[Any]) -> list[str]:
    # cattrs would read the string "abc" as the list ["a", "b", "c"].
    if not isinstance(value, list):
        raise TypeError(f"expected list, got {type(value).__name__}")
    return [_converter.structure(item, str) for item in value]


_converter.register_structure_hook_func(lambda t: t == list[str], _strict_list)


@attrs.frozen
class KeyCreation:
    """``POST /admin/v1/keys``."""

    project: str
    label: str = ""
    requestor: str = ""
    approver: str = ""
    app_ids: list[str] = attrs.field(factory=list)
    case_code: str = ""
    lighthouse: bool = False
    business_case: str = ""
    expires: str | None = None


@attrs.frozen
class Rotation:
    """``POST /admin/v1/keys/{id}/rotate``: seconds the old key keeps working."""

    overlap_seconds: float = 86400.0


@attrs.frozen
class Expiry:
    """``POST /admin/v1/keys/{id}/expiry``: an ISO 8601 time, or null."""

    expires: str | None


@attrs.frozen
class PermissionBody:
    """A gateway permission on the wire."""

    project: str
    service: str
    prefix: str
    methods: list[str] = attrs.field(factory=list)


@attrs.frozen
class GrantBody:
    """A resource grant on the wire."""

    resource: str
    locations: list[str]
    type: str = "binary"


@attrs.frozen
class ServiceBody:
    """A service registration on the wire."""

    project: str
    lineage_version: int
    service: str
    url: str


@attrs.frozen
class ExplainBody:
    """``POST /admin/v1/explain``."""

    key_id: str
    method: str
    url: str


@attrs.frozen
class AdminCreation:
    """``POST /admin/v1/admins``: platform admins create project admins."""

    project: str
    label: str = ""


def _body(req: falcon.Request, cls: type[Any]) -> Any:
    media = read_media(req, (falcon.MEDIA_JSON,))
    if media is None:
        media = {}
    if not isinstance(media, dict):
        raise InvalidData("the body must be a JSON object")
    try:
        return _converter.structure(media, cls)
    except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
        notes = (
            "; ".join(cattrs.transform_error(exc))
            if isinstance(exc, cattrs.BaseValidationError)
            else str(exc)
        )
        if holds_secret(notes):
            # A field named, or valued, with a key: not repeated back.
            notes = "a field or value is not what it should be"
        raise InvalidData(f"the body does not fit: {notes}") from None


def _time(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        when = parse_iso(text)
    except (ValueError, OverflowError):
        raise InvalidData("times are ISO 8601, e.g. 2027-01-31T00:00:00Z") from None
    return check_time(when)


class _AdminResource:
    """Shared plumbing: authenticate, audit, invalidate caches."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.store = runtime.admin

    def admin(self, req: falcon.Request) -> AdminToken:
        req.context.template = "admin"
        # Bearer tokens only: a browser session (the area's cookie) is no
        # credential for the platform API, so a stolen cookie mints nothing.
        found = bearer_admin(req, self.runtime)
        req.context.key_id = f"admin:{found.id}"
        return found

    def platform(self, req: falcon.Request) -> AdminToken:
        found = self.admin(req)
        require_platform(found)
        return found

    def audit(self, admin: AdminToken, action: str, target: str, **detail: Any) -> None:
        record = AuditRecord(self.runtime.clock(), admin.id, action, target, detail)
        self.store.record_audit(record)

    def answer_change(
        self,
        resp: falcon.Response,
        admin: AdminToken,
        action: str,
        key_id: str,
        **detail: Any,
    ) -> None:
        """Drop the key's cached copy, audit the change, answer the key as now."""
        self.changed(key_id)
        self.audit(admin, action, key_id, **detail)
        resp.media = credential_json(self.credential(key_id), self.runtime.clock())

    def changed(self, key_id: str) -> None:
        invalidate: Callable[[str], None] | None = getattr(
            self.runtime.keys, "invalidate", None
        )
        if invalidate is not None:
            invalidate(key_id)

    def credential(self, key_id: str) -> Any:
        found = self.store.load(key_id)
        if found is None:
            raise NotFound(f"no key {key_id!r}")
        return found


class Keys(_AdminResource):
    """``/admin/v1/keys``: list and create."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """List keys, optionally of one project."""
        self.platform(req)
        project = req.get_param("project")
        resp.media = {
            "keys": [
                credential_json(c, self.runtime.clock())
                for c in self.store.list_keys(project)
            ]
        }

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Create a key; the secret is in this answer only."""
        admin = self.platform(req)
        body: KeyCreation = _body(req, KeyCreation)
        check_name(body.project, "project")
        made = new_key()
        request = KeyRequest(
            body.requestor,
            body.approver,
            tuple(body.app_ids) or (body.project,),
            body.case_code,
            body.lighthouse,
            body.business_case,
        )
        check_key_details(body.label, request)
        key = ApiKey(
            made.id,
            made.secret_hash,
            body.project,
            body.label,
            request,
            self.runtime.clock(),
            _time(body.expires),
        )
        self.store.add_key(key)
        self.audit(admin, "key.create", made.id, project=body.project, label=body.label)
        resp.status = 201
        resp.media = {"id": made.id, "key": made.token}


class Key(_AdminResource):
    """``/admin/v1/keys/{key_id}``: show one key."""

    def on_get(self, req: falcon.Request, resp: falcon.Response, key_id: str) -> None:
        """Show a key, never its secret."""
        self.platform(req)
        resp.media = credential_json(self.credential(key_id), self.runtime.clock())


class Revoke(_AdminResource):
    """``/admin/v1/keys/{key_id}/revoke``."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, key_id: str) -> None:
        """Revoke a key now."""
        admin = self.platform(req)
        self.store.revoke(key_id, self.runtime.clock())
        self.answer_change(resp, admin, "key.revoke", key_id)


class Rotate(_AdminResource):
    """``/admin/v1/keys/{key_id}/rotate``."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, key_id: str) -> None:
        """Make a successor with the same reach; the old key works for a while."""
        admin = self.platform(req)
        body: Rotation = _body(req, Rotation)
        old = self.credential(key_id)
        if old.key.revoked is not None:
            raise InvalidData("a revoked key cannot be rotated")
        made = new_key()
        if not 0 <= body.overlap_seconds <= MAX_OVERLAP:
            raise InvalidData(f"overlap_seconds is from 0 to {MAX_OVERLAP:.0f}")
        key, ends = successor(old, made, self.runtime.clock(), body.overlap_seconds)
        self.store.rotate(key, key_id, ends)
        self.changed(key_id)
        self.audit(admin, "key.rotate", key_id, successor=made.id, until=iso(ends))
        resp.status = 201
        resp.media = {
            "id": made.id,
            "key": made.token,
            "predecessor_expires": iso(ends),
        }


class SetExpiry(_AdminResource):
    """``/admin/v1/keys/{key_id}/expiry``."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, key_id: str) -> None:
        """Set or clear a key's expiry."""
        admin = self.platform(req)
        body: Expiry = _body(req, Expiry)
        self.store.set_expiry(key_id, _time(body.expires))
        self.answer_change(resp, admin, "key.expiry", key_id, expires=body.expires)


def _permission(body: PermissionBody) -> Permission:
    return Permission(
        check_name(body.project, "project"),
        check_name(body.service, "service"),
        normalise_prefix(body.prefix),
        check_methods(body.methods),
    )


class Permissions(_AdminResource):
    """``/admin/v1/keys/{key_id}/permissions``: add (POST), remove (DELETE)."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, key_id: str) -> None:
        """Add a gateway permission."""
        admin = self.platform(req)
        permission = _permission(_body(req, PermissionBody))
        self.store.add_permission(key_id, permission)
        self.answer_change(
            resp, admin, "permission.add", key_id, prefix=permission.prefix
        )

    def on_delete(
        self, req: falcon.Request, resp: falcon.Response, key_id: str
    ) -> None:
        """Remove a gateway permission (the same JSON body as to add it)."""
        admin = self.platform(req)
        permission = _permission(_body(req, PermissionBody))
        self.store.remove_permission(key_id, permission)
        self.answer_change(
            resp, admin, "permission.remove", key_id, prefix=permission.prefix
        )


class Grants(_AdminResource):
    """``/admin/v1/keys/{key_id}/grants``: add (POST), remove (DELETE ?resource=)."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, key_id: str) -> None:
        """Add (or replace) a resource grant."""
        admin = self.platform(req)
        body: GrantBody = _body(req, GrantBody)
        resource = check_resource_id(body.resource, allow_prefix=True)
        schemes = self.runtime.storages.keys()
        locations = check_grant_locations(resource, body.locations, schemes)
        try:
            data_type = DataType(body.type)
        except ValueError:
            raise InvalidData("type is binary, sqlite or csv") from None
        self.store.add_grant(key_id, Grant(resource, locations, data_type))
        self.answer_change(resp, admin, "grant.add", key_id, resource=resource)

    def on_delete(
        self, req: falcon.Request, resp: falcon.Response, key_id: str
    ) -> None:
        """Remove the grant of one resource."""
        admin = self.platform(req)
        resource = req.get_param("resource", required=True)
        self.store.remove_grant(key_id, resource)
        self.answer_change(resp, admin, "grant.remove", key_id, resource=resource)


class Services(_AdminResource):
    """``/admin/v1/services``: list a project's services, register or remove one."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """List the services of ``?project=``."""
        self.platform(req)
        project = req.get_param("project", required=True)
        resp.media = {
            "services": [attrs.asdict(e) for e in self.store.endpoints(project)]
        }

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Register (or move) a service of a lineage version."""
        admin = self.platform(req)
        body: ServiceBody = _body(req, ServiceBody)
        endpoint = ServiceEndpoint(
            check_name(body.project, "project"),
            check_lineage_version(body.lineage_version),
            check_name(body.service, "service"),
            check_service_url(body.url),
        )
        self.store.add_service(endpoint)
        self._invalidate(endpoint.project)
        self.audit(admin, "service.add", f"{endpoint.project}/{endpoint.service}")
        resp.status = 201
        resp.media = attrs.asdict(endpoint)

    def on_delete(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Take ``?project=&lineage_version=&service=`` out of the registry."""
        admin = self.platform(req)
        project = check_name(req.get_param("project", required=True), "project")
        version = check_lineage_version(
            req.get_param_as_int("lineage_version", required=True)
        )
        service = check_name(req.get_param("service", required=True), "service")
        self.store.remove_service(project, version, service)
        self._invalidate(project)
        self.audit(
            admin, "service.remove", f"{project}/{service}", lineage_version=version
        )
        resp.media = {
            "removed": {
                "project": project,
                "lineage_version": version,
                "service": service,
            }
        }

    def _invalidate(self, project: str) -> None:
        invalidate = getattr(self.runtime.registry, "invalidate", None)
        if invalidate is not None:
            invalidate(project)


class Explain(_AdminResource):
    """``/admin/v1/explain``."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Say whether a key could make a gateway call, and why."""
        self.platform(req)
        body: ExplainBody = _body(req, ExplainBody)
        found = explain(
            self.credential(key_id_of(body.key_id)),
            body.method,
            body.url,
            self.store,
            self.runtime.clock(),
        )
        resp.media = attrs.asdict(
            found,
            value_serializer=lambda _, __, v: (
                sorted(v) if isinstance(v, frozenset) else v
            ),
        )


class Admins(_AdminResource):
    """``/admin/v1/admins``: a platform admin creates project-admin tokens."""

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Create a project-admin token; it is in this answer only."""
        admin = self.platform(req)
        body: AdminCreation = _body(req, AdminCreation)
        created = make_admin(
            self.store, Role.PROJECT, body.project, body.label, self.runtime.clock()
        )
        self.audit(admin, "admin.create", created["id"], project=body.project)
        resp.status = 201
        resp.media = created


def make_admin(
    store: Any, role: Role, project: str | None, label: str, now: float
) -> dict[str, str]:
    """Create an admin token; return its id and the token (shown once)."""
    check_text(label, "the label", MAX_LABEL)
    if role is Role.PROJECT:
        check_name(project or "", "project")
    elif project:
        # A platform admin reaches every project: a project named here would
        # suggest a bound that does not exist.
        raise InvalidData("a platform admin has no project; leave the project out")
    made = new_key(prefix=ADMIN_PREFIX)
    store.add_admin(AdminToken(made.id, made.secret_hash, role, project, label, now))
    return {"id": made.id, "token": made.token}


class Audit(_AdminResource):
    """``/admin/v1/audit``: the latest admin actions."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """List admin actions, newest first."""
        self.platform(req)
        limit = req.get_param_as_int("limit", min_value=1, max_value=1000, default=200)
        resp.media = {"actions": [audit_json(r) for r in self.store.audit(limit)]}


class KeyIdConverter(BaseConverter):
    """A ``{key_id}`` path field: a key id, or a whole key pasted for one.

    A whole key becomes its id, so that the secret reaches no message, log
    line or audit record; one whose checksum fails matches no route (404).
    """

    def convert(self, value: str) -> str | None:
        """Return the key id ``value`` names, or ``None`` for no match."""
        try:
            return key_id_of(value)
        except InvalidData:
            return None


def add_admin_routes(app: falcon.App[Any, Any], runtime: Runtime) -> None:
    """Mount the admin API and the project admin area on ``app``."""
    routes: list[tuple[str, Any]] = [
        ("/admin/v1/keys", Keys(runtime)),
        ("/admin/v1/keys/{key_id}", Key(runtime)),
        ("/admin/v1/keys/{key_id}/revoke", Revoke(runtime)),
        ("/admin/v1/keys/{key_id}/rotate", Rotate(runtime)),
        ("/admin/v1/keys/{key_id}/expiry", SetExpiry(runtime)),
        ("/admin/v1/keys/{key_id}/permissions", Permissions(runtime)),
        ("/admin/v1/keys/{key_id}/grants", Grants(runtime)),
        ("/admin/v1/services", Services(runtime)),
        ("/admin/v1/explain", Explain(runtime)),
        ("/admin/v1/admins", Admins(runtime)),
        ("/admin/v1/audit", Audit(runtime)),
        ("/app/login", Login(runtime)),
        ("/app/logout", Logout(runtime)),
        ("/app/{project}/admin/apikeys", ApiKeysPage(runtime)),
    ]
    app.router_options.converters["keyid"] = KeyIdConverter
    for template, resource in routes:
        app.add_route(template.replace("{key_id}", "{key_id:keyid}"), resource)
