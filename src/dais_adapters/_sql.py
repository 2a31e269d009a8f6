"""Queries shared by the SQL key stores (SQLite and PostgreSQL).

A store subclass supplies connections, its schema and the translation of
its driver's errors; everything it says to the database is written here
once, with ``?`` placeholders that the subclass adapts to its driver.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from dais_core.admin import AdminSession, AdminToken, AuditRecord, Role
from dais_core.errors import NotFound
from dais_core.policies import reaches
from dais_core.values import (
    ApiKey,
    Credential,
    DataType,
    ForwardRecord,
    Grant,
    KeyRequest,
    Permission,
    PublishRecord,
    ServiceEndpoint,
)

__all__ = ["SqlStore", "migrations"]

Row = Mapping[str, Any]


def _folder_pattern(project: str) -> str:
    """A LIKE pattern (escape ``!``) for text holding the project's folder."""
    escaped = project.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    return f"%filemanager://{escaped}/%"


def _methods(text: str) -> frozenset[str]:
    return frozenset(m for m in text.split(",") if m)


def _key(row: Row) -> ApiKey:
    return ApiKey(
        id=row["id"],
        secret_hash=row["secret_hash"],
        project=row["project"],
        label=row["label"],
        request=KeyRequest(
            requestor=row["requestor"],
            approver=row["approver"],
            app_ids=tuple(json.loads(row["app_ids"])),
            case_code=row["case_code"],
            lighthouse=bool(row["lighthouse"]),
            business_case=row["business_case"],
        ),
        created=row["created"],
        expires=row["expires"],
        revoked=row["revoked"],
        last_used=row["last_used"],
    )


def _publish_row(record: PublishRecord) -> tuple[Any, ...]:
    return (
        record.key_id,
        record.resource,
        record.size,
        record.sha256,
        json.dumps(record.locations),
        record.outcome,
        record.duration,
        record.request_id,
        record.at,
    )


def _forward_row(record: ForwardRecord) -> tuple[Any, ...]:
    return (
        record.key_id,
        record.project,
        record.service,
        record.lineage_version,
        record.method,
        record.route,
        record.status,
        record.latency,
        record.bytes_in,
        record.request_id,
        record.at,
    )


_INSERT_PUBLISH = (
    "INSERT INTO publishes (key_id, resource, size, sha256, locations, outcome,"
    " duration, request_id, at) VALUES (?,?,?,?,?,?,?,?,?)"
)
_INSERT_FORWARD = (
    "INSERT INTO forwards (key_id, project, service, lineage_version, method, route,"
    " status, latency, bytes_in, request_id, at) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
)
_TOUCH = (
    "UPDATE keys SET last_used = ? WHERE id = ?"
    " AND (last_used IS NULL OR last_used < ?)"
)


# The schema, one script per version, in SQL both databases read; the few
# types that differ are named in braces and filled in by each store.
_SCHEMA = (
    """
    CREATE TABLE keys (
        id TEXT PRIMARY KEY,
        secret_hash TEXT NOT NULL,
        project TEXT NOT NULL,
        label TEXT NOT NULL DEFAULT '',
        requestor TEXT NOT NULL DEFAULT '',
        approver TEXT NOT NULL DEFAULT '',
        app_ids TEXT NOT NULL DEFAULT '[]',
        case_code TEXT NOT NULL DEFAULT '',
        lighthouse INTEGER NOT NULL DEFAULT 0,
        business_case TEXT NOT NULL DEFAULT '',
        created {real} NOT NULL,
        expires {real},
        revoked {real},
        last_used {real}
    );
    CREATE INDEX keys_project ON keys (project);
    CREATE TABLE permissions (
        id {serial},
        key_id TEXT NOT NULL REFERENCES keys (id),
        project TEXT NOT NULL,
        service TEXT NOT NULL,
        prefix TEXT NOT NULL,
        methods TEXT NOT NULL DEFAULT '',
        UNIQUE (key_id, project, service, prefix, methods)
    );
    CREATE TABLE grants (
        id {serial},
        key_id TEXT NOT NULL REFERENCES keys (id),
        resource TEXT NOT NULL,
        locations TEXT NOT NULL,
        data_type TEXT NOT NULL,
        UNIQUE (key_id, resource)
    );
    CREATE TABLE services (
        project TEXT NOT NULL,
        lineage_version INTEGER NOT NULL,
        service TEXT NOT NULL,
        base_url TEXT NOT NULL,
        PRIMARY KEY (project, lineage_version, service)
    );
    CREATE TABLE publishes (
        id {serial},
        key_id TEXT NOT NULL,
        resource TEXT NOT NULL,
        size {bigint} NOT NULL,
        sha256 TEXT NOT NULL,
        locations TEXT NOT NULL,
        outcome TEXT NOT NULL,
        duration {real} NOT NULL,
        request_id TEXT NOT NULL,
        at {real} NOT NULL
    );
    CREATE INDEX publishes_key ON publishes (key_id, id);
    CREATE TABLE forwards (
        id {serial},
        key_id TEXT NOT NULL,
        project TEXT NOT NULL,
        service TEXT NOT NULL,
        lineage_version INTEGER NOT NULL,
        method TEXT NOT NULL,
        route TEXT NOT NULL,
        status INTEGER NOT NULL,
        latency {real} NOT NULL,
        bytes_in {bigint} NOT NULL,
        request_id TEXT NOT NULL,
        at {real} NOT NULL
    );
    CREATE INDEX forwards_key ON forwards (key_id, id)
    """,
    """
    CREATE TABLE admins (
        id TEXT PRIMARY KEY,
        secret_hash TEXT NOT NULL,
        role TEXT NOT NULL,
        project TEXT,
        label TEXT NOT NULL DEFAULT '',
        created {real} NOT NULL,
        revoked {real}
    );
    CREATE TABLE audit (
        id {serial},
        at {real} NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '{{}}'
    )
    """,
    """
    CREATE TABLE admin_sessions (
        id TEXT PRIMARY KEY,
        secret_hash TEXT NOT NULL,
        admin_id TEXT NOT NULL REFERENCES admins (id),
        created {real} NOT NULL,
        expires {real} NOT NULL
    );
    CREATE INDEX admin_sessions_expires ON admin_sessions (expires)
    """,
)


def migrations(types: Mapping[str, str]) -> tuple[str, ...]:
    """Return the schema scripts with a database's own type names."""
    return tuple(script.format_map(types) for script in _SCHEMA)


class SqlStore:
    """Keys, permissions, grants, services and records over SQL.

    Subclasses implement :meth:`_read`, :meth:`_transaction`, :meth:`_exec`
    and :meth:`_changed` (a hook called with a key id after an admin change,
    for cache invalidation across processes).
    """

    # -- what a subclass provides ----------------------------------------

    def _read(self, sql: str, *args: Any) -> list[Row]:
        raise NotImplementedError

    def _transaction(self) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def _exec(self, db: Any, sql: str, args: Sequence[Any] = ()) -> int:
        raise NotImplementedError

    def _execmany(self, db: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        for row in rows:
            self._exec(db, sql, row)

    def _changed(self, db: Any, key_id: str) -> None:
        """Say that a key changed; the default says nothing."""

    def _services_changed(self, db: Any, project: str) -> None:
        """Say that a project's services changed; the default says nothing."""

    @contextlib.contextmanager
    def _change(self, key_id: str) -> Iterator[Any]:
        with self._transaction() as db:
            yield db
            self._changed(db, key_id)

    # -- KeyStore port ----------------------------------------------------

    def load(self, key_id: str) -> Credential | None:
        """Return the key with its permissions and grants, or ``None``."""
        rows = self._read("SELECT * FROM keys WHERE id = ?", key_id)
        if not rows:
            return None
        return self._credential(rows[0])

    def record_publish(self, record: PublishRecord) -> None:
        """Keep a publish attempt and mark the key as used."""
        self.record_batch([record], [])

    def record_forward(self, record: ForwardRecord) -> None:
        """Keep a forwarded webhook call and mark the key as used."""
        self.record_batch([], [record])

    def record_batch(
        self, publishes: Sequence[PublishRecord], forwards: Sequence[ForwardRecord]
    ) -> None:
        """Keep many records in one transaction, and each key's latest use."""
        last_used: dict[str, float] = {}
        uses = [(r.key_id, r.at) for r in publishes] + [
            (r.key_id, r.at) for r in forwards
        ]
        for key_id, at in uses:
            last_used[key_id] = max(at, last_used.get(key_id, 0.0))
        with self._transaction() as db:
            if publishes:
                self._execmany(
                    db, _INSERT_PUBLISH, [_publish_row(r) for r in publishes]
                )
            if forwards:
                self._execmany(db, _INSERT_FORWARD, [_forward_row(r) for r in forwards])
            self._execmany(
                db,
                _TOUCH,
                [(at, key_id, at) for key_id, at in sorted(last_used.items())],
            )

    def _credential(self, row: Row) -> Credential:
        key = _key(row)
        permissions = tuple(
            Permission(p["project"], p["service"], p["prefix"], _methods(p["methods"]))
            for p in self._read(
                "SELECT * FROM permissions WHERE key_id = ? ORDER BY id", key.id
            )
        )
        grants = tuple(
            Grant(
                g["resource"],
                tuple(json.loads(g["locations"])),
                DataType(g["data_type"]),
            )
            for g in self._read(
                "SELECT * FROM grants WHERE key_id = ? ORDER BY id", key.id
            )
        )
        return Credential(key, permissions, grants)

    # -- ServiceRegistry port ---------------------------------------------

    def endpoints(self, project: str) -> Sequence[ServiceEndpoint]:
        """Return every endpoint of a project, all lineage versions."""
        rows = self._read("SELECT * FROM services WHERE project = ?", project)
        return [
            ServiceEndpoint(
                r["project"], r["lineage_version"], r["service"], r["base_url"]
            )
            for r in rows
        ]

    # -- admin ------------------------------------------------------------

    def add_key(self, key: ApiKey) -> None:
        """Store a new key (its secret already hashed)."""
        with self._change(key.id) as db:
            self._insert_key(db, key)

    def _insert_key(self, db: Any, key: ApiKey) -> None:
        request = key.request
        self._exec(
            db,
            "INSERT INTO keys (id, secret_hash, project, label, requestor, approver,"
            " app_ids, case_code, lighthouse, business_case, created, expires)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                key.id,
                key.secret_hash,
                key.project,
                key.label,
                request.requestor,
                request.approver,
                json.dumps(request.app_ids),
                request.case_code,
                int(request.lighthouse),
                request.business_case,
                key.created,
                key.expires,
            ),
        )

    def revoke(self, key_id: str, now: float) -> None:
        """Revoke a key from ``now`` on.

        Raises:
            NotFound: No such key.
        """
        with self._change(key_id) as db:
            changed = self._exec(
                db,
                "UPDATE keys SET revoked = COALESCE(revoked, ?) WHERE id = ?",
                (now, key_id),
            )
            if not changed:
                raise NotFound(f"no key {key_id!r}")

    def list_keys(self, project: str | None = None) -> list[Credential]:
        """Return every key, or those of one project, oldest first."""
        if project is None:
            rows = self._read("SELECT * FROM keys ORDER BY created, id")
        else:
            rows = self._read(
                "SELECT * FROM keys WHERE project = ? ORDER BY created, id", project
            )
        return [self._credential(row) for row in rows]

    def keys_reaching(self, project: str) -> list[Credential]:
        """Return the keys that can act in ``project``, oldest first.

        Its own keys, and keys of other projects that hold a gateway
        permission in it or a grant to its File Manager: its admins see
        every key that reaches their services and files.
        """
        rows = self._read(
            "SELECT * FROM keys WHERE project = ?"
            " OR id IN (SELECT key_id FROM permissions WHERE project = ?)"
            " OR id IN (SELECT key_id FROM grants WHERE locations LIKE ? ESCAPE '!')"
            " ORDER BY created, id",
            project,
            project,
            _folder_pattern(project),
        )
        # LIKE ignores case in SQLite: keep only what truly reaches it.
        return [
            credential
            for credential in map(self._credential, rows)
            if reaches(credential, project)
        ]

    def add_permission(self, key_id: str, permission: Permission) -> None:
        """Give a key a gateway permission.

        Raises:
            NotFound: No such key.
        """
        self._require_key(key_id)
        with self._change(key_id) as db:
            self._exec(
                db,
                "INSERT INTO permissions (key_id, project, service, prefix, methods)"
                " VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING",
                (
                    key_id,
                    permission.project,
                    permission.service,
                    permission.prefix,
                    ",".join(sorted(permission.methods)),
                ),
            )

    def add_grant(self, key_id: str, grant: Grant) -> None:
        """Give a key a resource grant, replacing one for the same resource.

        Raises:
            NotFound: No such key.
        """
        self._require_key(key_id)
        with self._change(key_id) as db:
            self._exec(
                db,
                "INSERT INTO grants (key_id, resource, locations, data_type)"
                " VALUES (?,?,?,?) ON CONFLICT (key_id, resource) DO UPDATE SET"
                " locations = excluded.locations, data_type = excluded.data_type",
                (
                    key_id,
                    grant.resource,
                    json.dumps(grant.locations),
                    grant.data_type.value,
                ),
            )

    def add_service(self, endpoint: ServiceEndpoint) -> None:
        """Register (or move) a service of a project at a lineage version."""
        with self._transaction() as db:
            self._exec(
                db,
                "INSERT INTO services (project, lineage_version, service, base_url)"
                " VALUES (?,?,?,?) ON CONFLICT (project, lineage_version, service)"
                " DO UPDATE SET base_url = excluded.base_url",
                (
                    endpoint.project,
                    endpoint.lineage_version,
                    endpoint.service,
                    endpoint.base_url,
                ),
            )
            self._services_changed(db, endpoint.project)

    def remove_service(self, project: str, lineage_version: int, service: str) -> None:
        """Take a service of a lineage version out of the registry.

        Raises:
            NotFound: No such service is registered.
        """
        with self._transaction() as db:
            if not self._exec(
                db,
                "DELETE FROM services WHERE project = ? AND lineage_version = ?"
                " AND service = ?",
                (project, lineage_version, service),
            ):
                raise NotFound(
                    f"no service {service!r} at {project} v{lineage_version}"
                )
            self._services_changed(db, project)

    def publishes(
        self, key_id: str, limit: int = 100, project: str | None = None
    ) -> list[dict[str, Any]]:
        """Return the latest publish records of a key, newest first.

        With ``project``, only those to its File Manager (a few fewer than
        ``limit``, at worst, where SQLite's LIKE ignores case).
        """
        where, args = "key_id = ?", [key_id]
        if project is not None:
            where += " AND locations LIKE ? ESCAPE '!'"
            args.append(_folder_pattern(project))
        rows = self._read(
            f"SELECT * FROM publishes WHERE {where} ORDER BY id DESC LIMIT ?",
            *args,
            limit,
        )
        return [dict(row) | {"locations": json.loads(row["locations"])} for row in rows]

    def forwards(
        self, key_id: str, limit: int = 100, project: str | None = None
    ) -> list[dict[str, Any]]:
        """Return the latest forward records of a key, newest first.

        With ``project``, only the calls into it.
        """
        where, args = "key_id = ?", [key_id]
        if project is not None:
            where += " AND project = ?"
            args.append(project)
        rows = self._read(
            f"SELECT * FROM forwards WHERE {where} ORDER BY id DESC LIMIT ?",
            *args,
            limit,
        )
        return [dict(row) for row in rows]

    def set_expiry(self, key_id: str, expires: float | None) -> None:
        """Set (or clear) when a key stops working.

        Raises:
            NotFound: No such key.
        """
        with self._change(key_id) as db:
            if not self._exec(
                db, "UPDATE keys SET expires = ? WHERE id = ?", (expires, key_id)
            ):
                raise NotFound(f"no key {key_id!r}")

    def remove_permission(self, key_id: str, permission: Permission) -> None:
        """Take a gateway permission away from a key.

        Raises:
            NotFound: The key has no such permission.
        """
        with self._change(key_id) as db:
            removed = self._exec(
                db,
                "DELETE FROM permissions WHERE key_id = ? AND project = ? AND service = ?"
                " AND prefix = ? AND methods = ?",
                (
                    key_id,
                    permission.project,
                    permission.service,
                    permission.prefix,
                    ",".join(sorted(permission.methods)),
                ),
            )
            if not removed:
                raise NotFound("the key has no such permission")

    def remove_grant(self, key_id: str, resource: str) -> None:
        """Take a resource grant away from a key.

        Raises:
            NotFound: The key has no grant for that resource.
        """
        with self._change(key_id) as db:
            removed = self._exec(
                db,
                "DELETE FROM grants WHERE key_id = ? AND resource = ?",
                (key_id, resource),
            )
            if not removed:
                raise NotFound("the key has no grant for that resource")

    def rotate(self, successor: ApiKey, predecessor_id: str, ends: float) -> None:
        """Store a successor with its predecessor's permissions and grants.

        The predecessor keeps working until ``ends``.

        Raises:
            NotFound: No predecessor with that id.
        """
        with self._change(predecessor_id) as db:
            if not self._exec(
                db,
                "UPDATE keys SET expires = ? WHERE id = ?",
                (ends, predecessor_id),
            ):
                raise NotFound(f"no key {predecessor_id!r}")
            self._insert_key(db, successor)
            self._exec(
                db,
                "INSERT INTO permissions (key_id, project, service, prefix, methods)"
                " SELECT ?, project, service, prefix, methods FROM permissions"
                " WHERE key_id = ?",
                (successor.id, predecessor_id),
            )
            self._exec(
                db,
                "INSERT INTO grants (key_id, resource, locations, data_type)"
                " SELECT ?, resource, locations, data_type FROM grants WHERE key_id = ?",
                (successor.id, predecessor_id),
            )

    def add_admin(self, admin: AdminToken) -> None:
        """Store a new admin token (its secret already hashed)."""
        with self._transaction() as db:
            self._exec(
                db,
                "INSERT INTO admins (id, secret_hash, role, project, label, created)"
                " VALUES (?,?,?,?,?,?)",
                (
                    admin.id,
                    admin.secret_hash,
                    admin.role.value,
                    admin.project,
                    admin.label,
                    admin.created,
                ),
            )

    def revoke_admin(self, admin_id: str, now: float) -> None:
        """Revoke an admin token from ``now`` on.

        Raises:
            NotFound: No such admin token.
        """
        with self._transaction() as db:
            if not self._exec(
                db,
                "UPDATE admins SET revoked = COALESCE(revoked, ?) WHERE id = ?",
                (now, admin_id),
            ):
                raise NotFound(f"no admin token {admin_id!r}")

    def load_admin(self, admin_id: str) -> AdminToken | None:
        """Return the admin token with that id, or ``None``."""
        rows = self._read("SELECT * FROM admins WHERE id = ?", admin_id)
        if not rows:
            return None
        row = rows[0]
        return AdminToken(
            row["id"],
            row["secret_hash"],
            Role(row["role"]),
            row["project"],
            row["label"],
            row["created"],
            row["revoked"],
        )

    def add_session(self, session: AdminSession) -> None:
        """Store a new browser session; sessions that have ended go."""
        with self._transaction() as db:
            self._exec(
                db,
                "DELETE FROM admin_sessions WHERE expires <= ?",
                (session.created,),
            )
            self._exec(
                db,
                "INSERT INTO admin_sessions (id, secret_hash, admin_id, created,"
                " expires) VALUES (?,?,?,?,?)",
                (
                    session.id,
                    session.secret_hash,
                    session.admin_id,
                    session.created,
                    session.expires,
                ),
            )

    def load_session(self, session_id: str) -> AdminSession | None:
        """Return the session with that id, or ``None``."""
        rows = self._read("SELECT * FROM admin_sessions WHERE id = ?", session_id)
        if not rows:
            return None
        row = rows[0]
        return AdminSession(
            row["id"],
            row["secret_hash"],
            row["admin_id"],
            row["created"],
            row["expires"],
        )

    def end_session(self, session_id: str) -> None:
        """Forget a session (logout); an unknown one is already gone."""
        with self._transaction() as db:
            self._exec(db, "DELETE FROM admin_sessions WHERE id = ?", (session_id,))

    def record_audit(self, record: AuditRecord) -> None:
        """Keep one admin action."""
        with self._transaction() as db:
            self._exec(
                db,
                "INSERT INTO audit (at, actor, action, target, detail)"
                " VALUES (?,?,?,?,?)",
                (
                    record.at,
                    record.actor,
                    record.action,
                    record.target,
                    json.dumps(record.detail, sort_keys=True),
                ),
            )

    def audit(self, limit: int = 200) -> list[AuditRecord]:
        """Return the latest admin actions, newest first."""
        rows = self._read("SELECT * FROM audit ORDER BY id DESC LIMIT ?", limit)
        return [
            AuditRecord(
                r["at"], r["actor"], r["action"], r["target"], json.loads(r["detail"])
            )
            for r in rows
        ]

    def ping(self) -> None:
        """Check the database answers, and holds the tables it should.

        Raises:
            Unavailable: It does not.
        """
        self._read("SELECT 1 AS one FROM keys LIMIT 1")

    def _require_key(self, key_id: str) -> None:
        if not self._read("SELECT 1 AS one FROM keys WHERE id = ?", key_id):
            raise NotFound(f"no key {key_id!r}")
