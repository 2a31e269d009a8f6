"""PostgreSQL key store and service registry, for several gateways at once.

The queries are those of :class:`~dais_adapters._sql.SqlStore`; this module
adds a psycopg connection pool, a schema that the store creates and migrates
itself (under an advisory lock, so two processes starting together do not
race), and change notifications: every admin change to a key sends
``NOTIFY dais_keys, '<key id>'`` in the same transaction, and
:class:`KeyChangeListener` turns them into cache invalidations in every
gateway process.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from dais_adapters._sql import Row, SqlStore, migrations
from dais_adapters.cache import SERVICES_PREFIX
from dais_adapters.hooks import hookimpl
from dais_core.errors import InvalidData, Unavailable

__all__ = ["CHANNEL", "KeyChangeListener", "PgCommitLocks", "PostgresStore"]

log = logging.getLogger(__name__)

#: The NOTIFY channel that carries the ids of changed keys, and the projects
#: whose services changed (prefixed with ``SERVICES_PREFIX``).
CHANNEL = "dais_keys"
# An arbitrary constant naming the advisory lock held while migrating.
_MIGRATION_LOCK = 0x6461_6973

_MIGRATIONS = migrations(
    {"real": "DOUBLE PRECISION", "serial": "BIGSERIAL PRIMARY KEY", "bigint": "BIGINT"}
)


def _pg(sql: str) -> str:
    # The shared queries use "?" placeholders; psycopg wants "%s".
    return sql.replace("?", "%s")


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except psycopg.errors.IntegrityError as exc:
        raise InvalidData("that record conflicts with one already stored") from exc
    except (psycopg.Error, PoolTimeout) as exc:
        raise Unavailable("the key store is unavailable") from exc


class PostgresStore(SqlStore):
    """Keys, permissions, grants, services and records in PostgreSQL.

    Args:
        url: A libpq connection URL (``postgresql://user@host:port/db``).
        pool_size: Most connections kept open.
        timeout: Seconds to wait for a connection before giving up (503).
    """

    def __init__(self, url: str, pool_size: int = 10, timeout: float = 5.0) -> None:
        self.url = url
        self.pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            timeout=timeout,
            kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": 5},
            open=False,
            name="dais-store",
            # A pooled connection the server ended (a restart, a failover, an
            # idle reaper) is found out before use and replaced, not handed
            # out to fail its call with a 503.
            check=ConnectionPool.check_connection,
        )
        with _translated():
            self.pool.open(wait=True, timeout=timeout)
            self._migrate()

    def close(self) -> None:
        """Close every pooled connection."""
        self.pool.close()

    def _read(self, sql: str, *args: Any) -> list[Row]:
        with (
            _translated(),
            self.pool.connection() as connection,
            connection.cursor(row_factory=dict_row) as cursor,
        ):
            return list(cursor.execute(_pg(sql), args).fetchall())

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection[Any]]:
        with (
            _translated(),
            self.pool.connection() as connection,
            connection.transaction(),
        ):
            yield connection

    def _exec(self, db: Any, sql: str, args: Sequence[Any] = ()) -> int:
        return int(db.execute(_pg(sql), args).rowcount)

    def _execmany(self, db: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with db.cursor() as cursor:
            cursor.executemany(_pg(sql), rows)

    def _changed(self, db: Any, key_id: str) -> None:
        db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, key_id))

    def _services_changed(self, db: Any, project: str) -> None:
        db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, SERVICES_PREFIX + project))

    def _migrate(self) -> None:
        with self._transaction() as db:
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            db.execute(
                "CREATE TABLE IF NOT EXISTS dais_schema (version INTEGER NOT NULL)"
            )
            row = db.execute(
                "SELECT max(version) AS version FROM dais_schema"
            ).fetchone()
            version = (row or {}).get("version") or 0
            for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT INTO dais_schema (version) VALUES (%s)", (number,))
                log.debug("migrated the PostgreSQL store to schema %d", number)

    def commit_locks(self) -> PgCommitLocks:
        """Return commit locks that hold across every process on this database."""
        return PgCommitLocks(self.pool)

    def listener(
        self, on_change: Callable[[str], None], on_state: Callable[[bool], None]
    ) -> KeyChangeListener:
        """Return a listener for key changes made by any process."""
        return KeyChangeListener(self.url, on_change, on_state)


def _lock_key(name: str) -> int:
    # A signed 64-bit key for pg_advisory_lock, from the name's SHA-256.
    return int.from_bytes(
        hashlib.sha256(name.encode()).digest()[:8], "big", signed=True
    )


class PgCommitLocks:
    """Session advisory locks, so that of two gateways publishing the same
    locations one commits after the other, everywhere.

    Each hold takes a pooled connection for its duration and the locks in a
    fixed order, so two holders never wait on each other in a cycle.
    """

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool

    @contextlib.contextmanager
    def hold(self, names: Iterable[str]) -> Iterator[None]:
        """Hold the advisory locks of ``names`` for the duration of the block.

        Raises:
            Unavailable: The database could not be reached for the locks.
        """
        keys = sorted({_lock_key(name) for name in names})
        with _translated(), self.pool.connection() as connection:
            try:
                for key in keys:
                    connection.execute("SELECT pg_advisory_lock(%s)", (key,))
                yield
            finally:
                connection.execute("SELECT pg_advisory_unlock_all()")


class KeyChangeListener:
    """Hear ``NOTIFY dais_keys`` on a connection of its own, in a thread.

    ``on_state(True)`` is called once notifications flow, ``on_state(False)``
    when the connection is lost (the cache then forgets everything and leans
    on its short TTL); the listener reconnects with a growing pause, up to 5
    seconds.

    Args:
        url: The PostgreSQL URL.
        on_change: Called with the id of each changed key.
        on_state: Called with whether notifications flow.
    """

    def __init__(
        self,
        url: str,
        on_change: Callable[[str], None],
        on_state: Callable[[bool], None],
    ) -> None:
        self.url = url
        self.on_change = on_change
        self.on_state = on_state
        self.connected = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, daemon=True, name="dais-listen"
        )

    def start(self) -> KeyChangeListener:
        """Start listening; return ``self``."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening (within about a second)."""
        self._stopping.set()
        self._thread.join(5)

    def _run(self) -> None:
        pause = 0.1
        while not self._stopping.is_set():
            try:
                self._listen()
                pause = 0.1
            except psycopg.Error as exc:
                log.warning("key change notifications lost: %s", exc)
            self.connected.clear()
            self.on_state(False)
            self._stopping.wait(pause)
            pause = min(pause * 2, 5.0)

    def _listen(self) -> None:
        with psycopg.connect(
            self.url, autocommit=True, connect_timeout=5
        ) as connection:
            connection.execute(f"LISTEN {CHANNEL}")
            self.connected.set()
            self.on_state(True)
            log.debug("listening for key changes")
            while not self._stopping.is_set():
                for notice in connection.notifies(timeout=1.0):
                    self.on_change(notice.payload)


_stores: dict[str, PostgresStore] = {}
_stores_lock = threading.Lock()


def _shared(url: str) -> PostgresStore | None:
    if not url.startswith(("postgresql://", "postgres://")):
        return None
    with _stores_lock:
        if url not in _stores:
            _stores[url] = PostgresStore(url)
        return _stores[url]


@hookimpl
def dais_key_store(url: str) -> PostgresStore | None:
    """Serve ``postgresql://`` key stores."""
    return _shared(url)


@hookimpl
def dais_service_registry(url: str) -> PostgresStore | None:
    """Serve ``postgresql://`` service registries (the same database)."""
    return _shared(url)
