"""Deeper checks of staged copies: SQLite's own integrity check.

The core checks the SQLite header and size as the bytes stream by; this
adapter opens a staged local copy read-only with SQLite and runs
``PRAGMA integrity_check`` before anything is committed. It reads the whole
database once more, which is the price of knowing it is sound.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from urllib.parse import quote

from dais_adapters.hooks import StorageContext, hookimpl
from dais_adapters.localfs import LocalFolderStorage
from dais_core.errors import CorruptData
from dais_core.ports import Inspector, StagedWrite
from dais_core.values import DataType

__all__ = ["SqliteIntegrity"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    uri = f"file:{quote(str(path))}?mode=ro&immutable=1"
    connection = sqlite3.connect(uri, uri=True)
    try:
        # The file is untrusted: no schema-defined functions, no mmap.
        connection.execute("PRAGMA trusted_schema = OFF")
        connection.execute("PRAGMA mmap_size = 0")
        connection.execute("PRAGMA cell_size_check = ON")
        yield connection
    finally:
        connection.close()


def _local(staged: Sequence[StagedWrite]) -> list[Callable[[], Path]]:
    """The ``flushed_path`` of each staged copy that is a local file."""
    flushers = [getattr(copy, "flushed_path", None) for copy in staged]
    return [flush for flush in flushers if callable(flush)]


class SqliteIntegrity:
    """Run SQLite's integrity check on a staged local copy of a database.

    Args:
        scratch: Opens a private local copy, for a database none of whose
            locations is a local file (every one in object storage, say).
            Without it such a database is checked only as it streams by.
    """

    def __init__(self, scratch: Callable[[], StagedWrite] | None = None) -> None:
        self._scratch = scratch

    def scratch_for(
        self, data_type: DataType, staged: Sequence[StagedWrite]
    ) -> StagedWrite | None:
        """Ask for a local copy of a declared SQLite file that has none."""
        if data_type is not DataType.SQLITE or _local(staged):
            return None
        return self._scratch() if self._scratch is not None else None

    def inspect(self, data_type: DataType, staged: Sequence[StagedWrite]) -> None:
        """Check a declared SQLite resource; other types pass.

        Raises:
            CorruptData: SQLite cannot open the file or finds damage.
        """
        if data_type is not DataType.SQLITE:
            return
        local = _local(staged)
        if not local:
            log.warning("no local copy to check a SQLite database with SQLite")
            return
        path = Path(local[0]())
        try:
            with _read_only(path) as connection:
                rows = connection.execute("PRAGMA integrity_check(20)").fetchall()
        except sqlite3.DatabaseError as exc:
            raise CorruptData(f"SQLite cannot read the database: {exc}") from exc
        if rows != [("ok",)]:
            raise CorruptData(
                f"the SQLite database fails its integrity check: {rows[0][0]}"
            )


@hookimpl
def dais_inspectors(context: StorageContext) -> Sequence[Inspector]:
    """Check declared SQLite databases with SQLite itself."""
    scratch = LocalFolderStorage(context.filemanager_root).scratch
    return [SqliteIntegrity(scratch)]
