"""SQLite key store and service registry: the embedded default.

One file holds keys (the secret only as a hash), permissions, grants,
services and the records of use. The store creates and migrates its schema
itself (``PRAGMA user_version``). Each thread gets its own connection; WAL
mode lets readers go on while one writer writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from dais_adapters.hooks import hookimpl
from dais_core.errors import InvalidData, NotFound, Unavailable
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

__all__ = ["SqliteStore", "path_from_url"]

log = logging.getLogger(__name__)

_MIGRATIONS = (
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
        created REAL NOT NULL,
        expires REAL,
        revoked REAL,
        last_used REAL
    );
    CREATE INDEX keys_project ON keys (project);
    CREATE TABLE permissions (
        id INTEGER PRIMARY KEY,
        key_id TEXT NOT NULL REFERENCES keys (id),
        project TEXT NOT NULL,
        service TEXT NOT NULL,
        prefix TEXT NOT NULL,
        methods TEXT NOT NULL DEFAULT '',
        UNIQUE (key_id, project, service, prefix, methods)
    );
    CREATE TABLE grants (
        id INTEGER PRIMARY KEY,
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
        id INTEGER PRIMARY KEY,
        key_id TEXT NOT NULL,
        resource TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        locations TEXT NOT NULL,
        outcome TEXT NOT NULL,
        duration REAL NOT NULL,
        request_id TEXT NOT NULL,
        at REAL NOT NULL
    );
    CREATE TABLE forwards (
        id INTEGER PRIMARY KEY,
        key_id TEXT NOT NULL,
        project TEXT NOT NULL,
        service TEXT NOT NULL,
        lineage_version INTEGER NOT NULL,
        method TEXT NOT NULL,
        route TEXT NOT NULL,
        status INTEGER NOT NULL,
        latency REAL NOT NULL,
        bytes_in INTEGER NOT NULL,
        request_id TEXT NOT NULL,
        at REAL NOT NULL
    );
    """,
)


def path_from_url(url: str) -> Path:
    """Return the file of a ``sqlite:///path`` URL.

    Raises:
        InvalidData: The URL is not a ``sqlite`` URL with a path.
    """
    parts = urlsplit(url)
    if parts.scheme != "sqlite" or not parts.path or parts.netloc:
        raise InvalidData("a SQLite store URL reads sqlite:///path/to/file.sqlite3")
    return Path(unquote(parts.path))


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except sqlite3.IntegrityError as exc:
        raise InvalidData("that record conflicts with one already stored") from exc
    except sqlite3.Error as exc:
        raise Unavailable("the key store is unavailable") from exc


class SqliteStore:
    """Keys, permissions, grants, services and records in one SQLite file.

    Implements the ``KeyStore`` and ``ServiceRegistry`` ports, and the admin
    operations the command line uses.

    Args:
        path: The database file; its folder is created if missing.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        path.parent.mkdir(parents=True, exist_ok=True)
        with _translated():
            self._migrate()

    # -- plumbing ---------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA foreign_keys=ON")
            connection.execute("PRAGMA synchronous=NORMAL")
            self._local.connection = connection
            log.debug("opened %s", self.path)
        return connection

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        connection = self._connection()
        with _translated():
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def _read(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with _translated():
            return self._connection().execute(sql, args).fetchall()

    def _migrate(self) -> None:
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")
                log.debug("migrated %s to schema %d", self.path, number)

    # -- KeyStore port ----------------------------------------------------

    def load(self, key_id: str) -> Credential | None:
        """Return the key with its permissions and grants, or ``None``."""
        rows = self._read("SELECT * FROM keys WHERE id = ?", key_id)
        if not rows:
            return None
        return self._credential(rows[0])

    def record_publish(self, record: PublishRecord) -> None:
        """Keep a publish attempt and mark the key as used."""
        with self._write() as db:
            db.execute(
                "INSERT INTO publishes (key_id, resource, size, sha256, locations,"
                " outcome, duration, request_id, at) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    record.key_id,
                    record.resource,
                    record.size,
                    record.sha256,
                    json.dumps(record.locations),
                    record.outcome,
                    record.duration,
                    record.request_id,
                    record.at,
                ),
            )
            db.execute(
                "UPDATE keys SET last_used = ? WHERE id = ?", (record.at, record.key_id)
            )

    def record_forward(self, record: ForwardRecord) -> None:
        """Keep a forwarded webhook call and mark the key as used."""
        with self._write() as db:
            db.execute(
                "INSERT INTO forwards (key_id, project, service, lineage_version,"
                " method, route, status, latency, bytes_in, request_id, at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
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
                ),
            )
            db.execute(
                "UPDATE keys SET last_used = ? WHERE id = ?", (record.at, record.key_id)
            )

    def _credential(self, row: sqlite3.Row) -> Credential:
        key = ApiKey(
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
        request = key.request
        with self._write() as db:
            db.execute(
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
        with self._write() as db:
            changed = db.execute(
                "UPDATE keys SET revoked = COALESCE(revoked, ?) WHERE id = ?",
                (now, key_id),
            ).rowcount
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

    def add_permission(self, key_id: str, permission: Permission) -> None:
        """Give a key a gateway permission.

        Raises:
            NotFound: No such key.
        """
        self._require_key(key_id)
        with self._write() as db:
            db.execute(
                "INSERT OR IGNORE INTO permissions (key_id, project, service, prefix, methods)"
                " VALUES (?,?,?,?,?)",
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
        with self._write() as db:
            db.execute(
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
        with self._write() as db:
            db.execute(
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

    def publishes(self, key_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """Return the latest publish records of a key, newest first."""
        rows = self._read(
            "SELECT * FROM publishes WHERE key_id = ? ORDER BY id DESC LIMIT ?",
            key_id,
            limit,
        )
        return [dict(row) | {"locations": json.loads(row["locations"])} for row in rows]

    def forwards(self, key_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """Return the latest forward records of a key, newest first."""
        rows = self._read(
            "SELECT * FROM forwards WHERE key_id = ? ORDER BY id DESC LIMIT ?",
            key_id,
            limit,
        )
        return [dict(row) for row in rows]

    def _require_key(self, key_id: str) -> None:
        if not self._read("SELECT 1 FROM keys WHERE id = ?", key_id):
            raise NotFound(f"no key {key_id!r}")


def _methods(text: str) -> frozenset[str]:
    return frozenset(m for m in text.split(",") if m)


_stores: dict[Path, SqliteStore] = {}
_stores_lock = threading.Lock()


def _shared(url: str) -> SqliteStore | None:
    if not url.startswith("sqlite:"):
        return None
    path = path_from_url(url).resolve()
    with _stores_lock:
        if path not in _stores:
            _stores[path] = SqliteStore(path)
        return _stores[path]


@hookimpl
def dais_key_store(url: str) -> SqliteStore | None:
    """Serve ``sqlite:///path`` key stores."""
    return _shared(url)


@hookimpl
def dais_service_registry(url: str) -> SqliteStore | None:
    """Serve ``sqlite:///path`` service registries (the same file as the keys)."""
    return _shared(url)
