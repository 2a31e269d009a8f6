"""SQLite key store and service registry: the embedded default.

One file holds keys (the secret only as a hash), permissions, grants,
services and the records of use. The store creates and migrates its schema
itself (``PRAGMA user_version``). Each thread gets its own connection; WAL
mode lets readers go on while one writer writes. One store serves each file
in a process; ``close()`` (when a gateway stops) ends the connections of
every thread, and those of threads that have ended go as new ones open.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from dais_adapters._sql import Row, SqlStore, migrations
from dais_adapters.hooks import hookimpl
from dais_core.errors import InvalidData, PublishFailed, Unavailable

__all__ = ["FileCommitLocks", "SqliteStore", "path_from_url"]

log = logging.getLogger(__name__)

_MIGRATIONS = migrations(
    {"real": "REAL", "serial": "INTEGER PRIMARY KEY", "bigint": "INTEGER"}
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


class FileCommitLocks:
    """One lock file beside the database, so that of two gateways sharing
    the store (``serve --workers N``, or two ``serve`` on one home) one
    commits after the other at every location.

    The lock covers every location at once: commits are short (renames and
    fsyncs, or completing an object upload), and a store that one machine's
    processes share sees few at a time. ``flock`` locks belong to an open
    file, so each hold opens its own and threads exclude each other too.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def hold(self, names: Iterable[str]) -> Iterator[None]:
        """Hold the lock for the duration of the block (``names`` all share it).

        Raises:
            PublishFailed: The lock file cannot be opened or locked.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise PublishFailed(f"cannot open the commit lock: {exc.strerror}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                raise PublishFailed(
                    f"cannot take the commit lock: {exc.strerror}"
                ) from exc
            yield
        finally:
            os.close(fd)


class SqliteStore(SqlStore):
    """Keys, permissions, grants, services and records in one SQLite file.

    Implements the ``KeyStore`` and ``ServiceRegistry`` ports, and the admin
    operations the command line uses.

    Args:
        path: The database file; its folder is created if missing.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        # Every connection opened, by thread, so that close() reaches them
        # all; those of threads that have ended are closed as new ones open.
        self._opened: dict[threading.Thread, sqlite3.Connection] = {}
        self._opened_lock = threading.Lock()
        created = not path.exists()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise Unavailable(
                f"cannot make the key store's folder {path.parent}: {exc.strerror}"
            ) from exc
        self._migrate()
        if created:
            # A mistyped store URL would otherwise pass for a store with no keys.
            log.info("created a new, empty key store at %s", path)

    def close(self) -> None:
        """Close every connection this store opened, whichever thread did."""
        with self._opened_lock:
            opened, self._opened = list(self._opened.values()), {}
            self._local = threading.local()
        for connection in opened:
            with contextlib.suppress(sqlite3.Error):
                connection.close()

    def _keep(self, connection: sqlite3.Connection) -> None:
        with self._opened_lock:
            ended = [t for t in self._opened if not t.is_alive()]
            left = [self._opened.pop(thread) for thread in ended]
            self._opened[threading.current_thread()] = connection
        for old in left:
            with contextlib.suppress(sqlite3.Error):
                old.close()

    def commit_locks(self) -> FileCommitLocks:
        """Return commit locks that hold across the processes sharing this file."""
        return FileCommitLocks(self.path.with_name(self.path.name + ".commit-lock"))

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            with _translated():
                # Used by its own thread only; close() may end it from another.
                connection = sqlite3.connect(
                    self.path,
                    timeout=10.0,
                    isolation_level=None,
                    check_same_thread=False,
                )
                connection.row_factory = sqlite3.Row
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA foreign_keys=ON")
                connection.execute("PRAGMA synchronous=NORMAL")
            self._local.connection = connection
            self._keep(connection)
            log.debug("opened %s", self.path)
        return connection

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        connection = self._connection()
        with _translated():
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def _read(self, sql: str, *args: Any) -> list[Row]:
        with _translated():
            return self._connection().execute(sql, args).fetchall()

    def _exec(self, db: Any, sql: str, args: Sequence[Any] = ()) -> int:
        return int(db.execute(sql, args).rowcount)

    def _execmany(self, db: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        db.executemany(sql, rows)

    def _migrate(self) -> None:
        with self._transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")
                log.debug("migrated %s to schema %d", self.path, number)


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
