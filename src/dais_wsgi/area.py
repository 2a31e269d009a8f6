"""The project admin area: a login form and the page of a project's keys.

Plain server-rendered HTML that reads well without JavaScript; the same
URL answers JSON to API clients (``Accept: application/json``). Everything
shown is escaped; the pages forbid scripts, framing and caching.
"""

from __future__ import annotations

import html
import math
import re
from typing import Any
from urllib.parse import quote, urlsplit

import falcon

from dais_core.admin import (
    AdminSession,
    AdminToken,
    AuditRecord,
    authenticate_admin,
    authenticate_session,
    open_session,
    require_project,
)
from dais_core.errors import Forbidden, InvalidData, Unauthenticated
from dais_core.keys import SESSION_PREFIX, new_key
from dais_core.policies import in_project_folder
from dais_wsgi.bodies import read_media
from dais_wsgi.bootstrap import Runtime
from dais_wsgi.present import credential_json, iso

__all__ = [
    "ApiKeysPage",
    "Login",
    "Logout",
    "area_error",
    "bearer_admin",
    "cookie_session",
    "presented_admin",
]

COOKIE = "dais_admin"
_RECENT = 20
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: with no-referrer browsers post forms with
    # "Origin: null", and the login checks the origin.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}
_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:72rem;
padding:0 1rem;color:#1d2430}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem}
table{border-collapse:collapse;width:100%;margin:.5rem 0 1rem}
th,td{border-bottom:1px solid #d8dde6;padding:.35rem .5rem;text-align:left;
vertical-align:top}th{background:#f3f5f9}
.revoked,.expired{color:#a01c1c;font-weight:600}.active{color:#17692b;font-weight:600}
code{font-size:.9em}section{border:1px solid #d8dde6;border-radius:6px;
padding:0 1rem 1rem;margin:1rem 0}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<meta name=viewport content='width=device-width'><title>{_e(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def _secure(req: falcon.Request) -> bool:
    # As the caller sees it: behind a TLS proxy the connection itself is http.
    return bool(req.context.get("scheme", req.scheme) == "https")


class Login:
    """``/app/login``: a form for an admin token, which opens a session."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Show the form, or who is logged in when the session is valid.

        A platform admin's login comes back here (there is no page of all
        projects): it says so, and how to reach a project's page.
        """
        req.context.template = "area"
        try:
            _, admin = cookie_session(req, self.runtime)
        except Unauthenticated:
            _form(resp, _safe_next(req.get_param("next")), "")
            return
        _logged_in(resp, admin)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Check the token; on success, open a session and go on.

        The cookie holds the session's own secret, never the admin token.
        A browser posting from another site's page (its ``Origin`` is not
        this host) is refused, so no page elsewhere can log a visitor in.
        """
        req.context.template = "area"
        _same_origin(req)
        form = read_media(req, (falcon.MEDIA_URLENCODED, falcon.MEDIA_JSON))
        if not isinstance(form, dict):
            raise InvalidData("send the login form")
        token = str(form.get("token", "")).strip()
        target = _safe_next(str(form.get("next", "")))
        try:
            admin = authenticate_admin(self.runtime.admin, token, self.runtime.clock())
        except Unauthenticated as exc:
            if _posted_json(req):
                # An API client, not a form: the refusal as JSON.
                raise
            resp.status = 401
            _form(resp, target, exc.message)
            return
        if target == "/app/login" and admin.project:
            target = f"/app/{quote(admin.project)}/admin/apikeys"
        cookie = self._open(admin)
        resp.set_headers(_HEADERS)
        resp.set_cookie(
            COOKIE,
            cookie,
            max_age=math.ceil(self.runtime.settings.admin_session),
            path="/app/",
            http_only=True,
            secure=_secure(req),
            same_site="Strict",
        )
        resp.status = 303
        resp.set_header("Location", target)

    def _open(self, admin: AdminToken) -> str:
        """Store a new session for ``admin``, audit it, return its token."""
        now = self.runtime.clock()
        made = new_key(prefix=SESSION_PREFIX)
        lifetime = self.runtime.settings.admin_session
        session = open_session(admin, made, now, lifetime)
        store = self.runtime.admin
        store.add_session(session)
        detail = {"expires": iso(session.expires)}
        store.record_audit(AuditRecord(now, admin.id, "session.open", made.id, detail))
        return made.token


class Logout:
    """``/app/logout``: end the session and forget the cookie."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        """End the session the cookie names, if it is still valid; drop it.

        Like the login, a post from another site's page is refused.
        """
        req.context.template = "area"
        _same_origin(req, "the logout")
        store = self.runtime.admin
        now = self.runtime.clock()
        try:
            session, admin = cookie_session(req, self.runtime)
        except Unauthenticated:
            pass  # nothing to end: the cookie is dropped all the same
        else:
            store.end_session(session.id)
            store.record_audit(AuditRecord(now, admin.id, "session.end", session.id))
        resp.set_headers(_HEADERS)
        resp.unset_cookie(COOKIE, path="/app/", same_site="Strict")
        resp.status = 303
        resp.set_header("Location", "/app/login")


def _same_origin(req: falcon.Request, what: str = "the login form") -> None:
    """Refuse a post a browser says came from another site's page.

    ``Origin`` decides when sent; without it, ``Sec-Fetch-Site`` (anything
    but ``same-origin`` or ``none``, a request the user made) and then the
    ``Referer``. Either names this host, with ``http`` or ``https``, and
    only ``https`` when this server is reached over HTTPS itself (behind a
    proxy that ends TLS it cannot tell, and takes either). A client that is
    no browser sends none of them.
    """
    refused = Forbidden(f"{what} was posted from another site")
    origin = req.get_header("Origin")
    if origin is not None:
        if not _this_site(req, origin):
            raise refused
        return
    site = req.get_header("Sec-Fetch-Site")
    if site is not None and site.strip().lower() not in {"same-origin", "none"}:
        raise refused
    referer = req.get_header("Referer")
    if referer is not None and not _this_site(req, referer):
        raise refused


def _this_site(req: falcon.Request, url: str) -> bool:
    parts = urlsplit(url)
    allowed = {"https"} if _secure(req) else {"http", "https"}
    return parts.scheme in allowed and parts.netloc == req.get_header("Host")


def _form(resp: falcon.Response, target: str, problem: str) -> None:
    resp.set_headers(_HEADERS)
    resp.content_type = falcon.MEDIA_HTML
    notice = f"<p class=revoked role=alert>{_e(problem)}</p>" if problem else ""
    resp.text = _page(
        "Dais admin login",
        f"<h1>Dais admin</h1>{notice}<form method=post action='/app/login'>"
        f"<input type=hidden name=next value='{_e(target)}'>"
        "<p><label for=token>Admin token</label><br>"
        "<input id=token name=token type=password size=70 autocomplete=off required>"
        "</p><p><button type=submit>Log in</button></p></form>",
    )


def _logged_in(resp: falcon.Response, admin: AdminToken) -> None:
    resp.set_headers(_HEADERS)
    resp.content_type = falcon.MEDIA_HTML
    if admin.project:
        where = f"/app/{quote(admin.project)}/admin/apikeys"
        reach = f"<p><a href='{_e(where)}'>The keys of {_e(admin.project)}</a></p>"
    else:
        reach = (
            "<p>A platform admin may open any project's page: "
            "<code>/app/&lt;project&gt;/admin/apikeys</code>.</p>"
        )
    resp.text = _page(
        "Dais admin",
        f"<h1>Dais admin</h1><p>Logged in as {_e(admin.role.value)} admin "
        f"<code>{_e(admin.id)}</code>.</p>{reach}"
        "<form method=post action='/app/logout'><button>Log out</button></form>",
    )


def _posted_json(req: falcon.Request) -> bool:
    """Whether the body was sent as JSON (by a program, not a form)."""
    media_type = (req.content_type or "").partition(";")[0].strip().lower()
    return media_type == falcon.MEDIA_JSON


def area_error(req: falcon.Request, resp: falcon.Response, message: str) -> None:
    """Give an error answer of the area its headers, and a page to a browser.

    The status and the JSON body are already set; a browser that prefers
    HTML gets a short page with the same message instead.
    """
    resp.set_headers(_HEADERS)
    if req.client_prefers(["application/json", "text/html"]) == "text/html":
        resp.content_type = falcon.MEDIA_HTML
        resp.media = None
        resp.text = _page(
            "Dais admin",
            f"<h1>Not available</h1><p>{_e(message)}</p>"
            "<p><a href='/app/login'>Log in with another token</a></p>",
        )


_NEXT = re.compile(r"/app/[A-Za-z0-9._~%/-]*")


def _safe_next(target: str | None) -> str:
    # Only paths of this area: never another host, a scheme or a header break.
    if target and _NEXT.fullmatch(target) and "//" not in target:
        return target
    return "/app/login"


class ApiKeysPage:
    """``/app/{project}/admin/apikeys``: a project's keys, for its admins."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.store = runtime.admin

    def on_get(self, req: falcon.Request, resp: falcon.Response, project: str) -> None:
        """List the project's keys with their recent use; JSON or HTML."""
        req.context.template = "area"
        wants_json = (
            req.client_prefers(["application/json", "text/html"]) == "application/json"
        )
        try:
            admin = presented_admin(req, self.runtime)
        except Unauthenticated:
            if wants_json:
                raise
            resp.set_headers(_HEADERS)
            resp.status = 303
            resp.set_header("Location", "/app/login?next=" + quote(req.path))
            return
        require_project(admin, project)
        keys = [self._item(c, project) for c in self.store.keys_reaching(project)]
        resp.set_headers(_HEADERS)
        if wants_json:
            resp.media = {"project": project, "keys": keys}
            return
        resp.content_type = falcon.MEDIA_HTML
        resp.text = _page(f"API keys of {project}", _render(project, keys))

    def _item(self, credential: Any, project: str) -> dict[str, Any]:
        key_id = credential.key.id
        # Another project's key: its latest records here, not its latest
        # anywhere (those would push these off, and tell of its traffic).
        here = None if credential.key.project == project else project
        publishes = self.store.publishes(key_id, _RECENT, here)
        forwards = self.store.forwards(key_id, _RECENT, here)
        for record in (*publishes, *forwards):
            record["at"] = iso(record["at"])
            record.pop("id", None)
        item = credential_json(credential, self.runtime.clock()) | {
            "publishes": publishes,
            "forwards": forwards,
        }
        return item if credential.key.project == project else _within(item, project)


def _within(item: dict[str, Any], project: str) -> dict[str, Any]:
    """Keep of another project's key what concerns ``project`` only.

    Its admins see that the key reaches them, and how; not what else it
    may do, or did, in its own project: other locations of its grants and
    records, and when it was last used (perhaps elsewhere), are left out.
    """

    def here(entry: dict[str, Any]) -> dict[str, Any] | None:
        kept = [at for at in entry["locations"] if in_project_folder(at, project)]
        return entry | {"locations": kept} if kept else None

    def only_here(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [kept for entry in entries if (kept := here(entry)) is not None]

    return item | {
        "last_used": None,
        "permissions": [p for p in item["permissions"] if p["project"] == project],
        "grants": only_here(item["grants"]),
        "publishes": only_here(item["publishes"]),
        "forwards": [r for r in item["forwards"] if r["project"] == project],
    }


def bearer_admin(req: falcon.Request, runtime: Runtime) -> AdminToken:
    """Return the admin whose token the ``Authorization`` header carries.

    Raises:
        Unauthenticated: No bearer token, or not a valid admin token.
    """
    scheme, _, token = (req.get_header("Authorization") or "").partition(" ")
    bearer = token if scheme.lower() == "bearer" else None
    return authenticate_admin(runtime.admin, bearer, runtime.clock())


def presented_admin(req: falcon.Request, runtime: Runtime) -> AdminToken:
    """Return the admin behind an area request: a bearer token, or a session.

    A request with an ``Authorization`` header is judged by it alone.

    Raises:
        Unauthenticated: Neither is valid.
    """
    if req.get_header("Authorization") is not None:
        return bearer_admin(req, runtime)
    return cookie_session(req, runtime)[1]


def cookie_session(
    req: falcon.Request, runtime: Runtime
) -> tuple[AdminSession, AdminToken]:
    """Return the session the ``dais_admin`` cookie holds, and its admin.

    Raises:
        Unauthenticated: No cookie, or not a live session.
    """
    values = req.get_cookie_values(COOKIE)
    cookie = values[0] if values else None
    return authenticate_session(runtime.admin, cookie, runtime.clock())


def _render(project: str, keys: list[dict[str, Any]]) -> str:
    parts = [
        f"<h1>API keys of <code>{_e(project)}</code></h1>",
        f"<p>{len(keys)} key(s). Secrets are never shown.</p>",
        "<form method=post action='/app/logout'><button>Log out</button></form>",
    ]
    parts += [_render_key(key) for key in keys]
    return "".join(parts)


def _render_key(key: dict[str, Any]) -> str:
    state = key["state"]
    rows = [
        ("Project", key["project"]),
        ("Label", key["label"]),
        ("Requestor", key["requestor"]),
        ("Approver", key["approver"]),
        ("App ids", ", ".join(key["app_ids"])),
        ("Case code", key["case_code"]),
        ("Lighthouse case", "yes" if key["lighthouse"] else "no"),
        ("Business case", key["business_case"]),
        ("Created", key["created"]),
        ("Expires", key["expires"] or "never"),
        ("Last used", key["last_used"] or "never"),
        ("Revoked", key["revoked"] or "no"),
    ]
    facts = "".join(
        f"<tr><th scope=row>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows
    )
    permissions = _table(
        ["Project", "Service", "Route prefix", "Methods"],
        [
            [p["project"], p["service"], p["prefix"], ", ".join(p["methods"]) or "any"]
            for p in key["permissions"]
        ],
    )
    grants = _table(
        ["Resource", "Locations", "Type"],
        [[g["resource"], ", ".join(g["locations"]), g["type"]] for g in key["grants"]],
    )
    publishes = _table(
        ["At", "Resource", "Size", "Outcome", "Request id"],
        [
            [r["at"], r["resource"], r["size"], r["outcome"], r["request_id"]]
            for r in key["publishes"]
        ],
    )
    forwards = _table(
        ["At", "Method", "Service", "Route", "Status", "Request id"],
        [
            [
                r["at"],
                r["method"],
                r["service"],
                r["route"],
                r["status"],
                r["request_id"],
            ]
            for r in key["forwards"]
        ],
    )
    return (
        f"<section class=key id='key-{_e(key['id'])}'><h2><code>{_e(key['id'])}</code> "
        f"<span class={state}>{state}</span></h2><table>{facts}</table>"
        f"<h3>Gateway permissions</h3>{permissions}<h3>Resource grants</h3>{grants}"
        f"<h3>Recent uploads</h3>{publishes}<h3>Recent webhook calls</h3>{forwards}"
        "</section>"
    )


def _table(headings: list[str], rows: list[list[Any]]) -> str:
    if not rows:
        return "<p>None.</p>"
    head = "".join(f"<th>{_e(h)}</th>" for h in headings)
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
