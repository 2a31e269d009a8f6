"""Admins: who may issue keys, who may see them, and what they did.

Admin tokens are not API keys: they carry their own prefix
(:data:`~dais_core.keys.ADMIN_PREFIX`), are stored hashed like keys, and
have a role. A platform admin may do everything; a project admin may only
look at the keys of one project.

A browser that logs in with an admin token gets a session instead of the
token: a secret of its own (:data:`~dais_core.keys.SESSION_PREFIX`), stored
hashed, that ends at a fixed time, at logout, or when its admin token is
revoked. A stolen session cookie is worth hours, never the token.
"""

from __future__ import annotations

import enum
from typing import Any, Protocol

import attrs

from dais_core.errors import Forbidden, Unauthenticated
from dais_core.keys import (
    ADMIN_PREFIX,
    SESSION_PREFIX,
    NewKey,
    parse_token,
    secret_matches,
)
from dais_core.values import ApiKey, Credential

__all__ = [
    "AdminSession",
    "AdminStore",
    "AdminToken",
    "AuditRecord",
    "Role",
    "authenticate_admin",
    "authenticate_session",
    "open_session",
    "require_platform",
    "require_project",
    "successor",
]


class Role(enum.Enum):
    """What an admin token may do."""

    PLATFORM = "platform"
    PROJECT = "project"


@attrs.frozen
class AdminToken:
    """An admin credential as stored: the secret only as a hash."""

    id: str
    secret_hash: str = attrs.field(repr=False)
    role: Role
    project: str | None = None
    label: str = ""
    created: float = 0.0
    revoked: float | None = None


@attrs.frozen
class AdminSession:
    """A browser's login, as stored: the secret only as a hash."""

    id: str
    secret_hash: str = attrs.field(repr=False)
    admin_id: str
    created: float
    expires: float


@attrs.frozen
class AuditRecord:
    """One admin action: who did what to which target, when."""

    at: float
    actor: str
    action: str
    target: str
    detail: dict[str, Any] = attrs.field(factory=dict)


class AdminStore(Protocol):
    """Where admin tokens are kept."""

    def load_admin(self, admin_id: str) -> AdminToken | None:
        """Return the admin token with that id, or ``None``."""
        ...

    def load_session(self, session_id: str) -> AdminSession | None:
        """Return the session with that id, or ``None``."""
        ...


def authenticate_admin(store: AdminStore, token: str | None, now: float) -> AdminToken:
    """Verify an admin token.

    Args:
        store: Where admin tokens are kept.
        token: The presented token (from a bearer header).
        now: The current time.

    Raises:
        Unauthenticated: No token, a malformed or unknown one, or a revoked one.
    """
    if not token:
        raise Unauthenticated("an admin token is required")
    admin_id, secret = parse_token(token.strip(), ADMIN_PREFIX)
    admin = store.load_admin(admin_id)
    if admin is None or not secret_matches(secret, admin.secret_hash):
        raise Unauthenticated("the admin token is not known")
    if _revoked(admin, now):
        raise Unauthenticated("the admin token has been revoked")
    return admin


def _revoked(admin: AdminToken, now: float) -> bool:
    return admin.revoked is not None and admin.revoked <= now


def open_session(
    admin: AdminToken, made: NewKey, now: float, lifetime: float
) -> AdminSession:
    """Start a browser session for an authenticated admin.

    Args:
        admin: The admin who logged in.
        made: Fresh session material (``new_key(prefix=SESSION_PREFIX)``);
            its token goes to the browser, its hash to the store.
        now: The current time.
        lifetime: Seconds the session lasts.
    """
    return AdminSession(made.id, made.secret_hash, admin.id, now, now + lifetime)


def authenticate_session(
    store: AdminStore, token: str | None, now: float
) -> tuple[AdminSession, AdminToken]:
    """Verify a session token and the admin token behind it.

    Raises:
        Unauthenticated: No token, a malformed or unknown one, an ended
            session, or an admin token that is revoked or gone.
    """
    if not token:
        raise Unauthenticated("an admin token is required")
    session_id, secret = parse_token(token.strip(), SESSION_PREFIX)
    session = store.load_session(session_id)
    if session is None or not secret_matches(secret, session.secret_hash):
        raise Unauthenticated("the session is not known; log in again")
    if session.expires <= now:
        raise Unauthenticated("the session has ended; log in again")
    admin = store.load_admin(session.admin_id)
    if admin is None or _revoked(admin, now):
        raise Unauthenticated("the admin token of this session has been revoked")
    return session, admin


def require_platform(admin: AdminToken) -> None:
    """Let only platform admins through.

    Raises:
        Forbidden: The token is a project admin's.
    """
    if admin.role is not Role.PLATFORM:
        raise Forbidden("only a platform admin may do this")


def require_project(admin: AdminToken, project: str) -> None:
    """Let platform admins and the admins of ``project`` through.

    The message is the same whether or not the project exists, so a project
    admin learns nothing about other projects.

    Raises:
        Forbidden: A project admin of another project.
    """
    if admin.role is Role.PLATFORM:
        return
    if admin.project != project:
        raise Forbidden("this admin token may not see that project")


def successor(
    predecessor: Credential, made: NewKey, now: float, overlap: float
) -> tuple[ApiKey, float]:
    """Plan a key rotation.

    Args:
        predecessor: The key being rotated, with its permissions and grants.
        made: The new key material.
        now: The current time.
        overlap: Seconds the predecessor keeps working.

    Returns:
        The successor key (same project, label, request and expiry) and the
        time at which the predecessor stops working.
    """
    old = predecessor.key
    key = attrs.evolve(
        old,
        id=made.id,
        secret_hash=made.secret_hash,
        created=now,
        revoked=None,
        last_used=None,
    )
    ends = now + max(overlap, 0.0)
    if old.expires is not None:
        ends = min(ends, old.expires)
    return key, ends
