"""Streaming checks of declared data types, fed chunk by chunk.

A check sees each chunk once, as it is written to the staged copies, and
gives its verdict at the end, before anything is committed. A file of the
wrong kind is :class:`UnsupportedType` (415); a file of the right kind that is
damaged is :class:`CorruptData` (400).
"""

from __future__ import annotations

import codecs
import csv
from typing import Protocol

from dais_core.errors import CorruptData, UnsupportedType
from dais_core.values import DataType

__all__ = [
    "MAX_CSV_RECORD",
    "BinaryCheck",
    "ContentCheck",
    "CsvCheck",
    "SqliteCheck",
    "check_for",
]

SQLITE_MAGIC = b"SQLite format 3\x00"
_SQLITE_HEADER = 100
#: Longest CSV record (or line) accepted, in characters.
MAX_CSV_RECORD = 8 * 2**20


class ContentCheck(Protocol):
    """Judge a stream of bytes against a declared type."""

    def feed(self, chunk: bytes) -> None:
        """Look at the next chunk."""
        ...

    def finish(self, size: int) -> None:
        """Give the verdict on the whole file of ``size`` bytes."""
        ...


class BinaryCheck:
    """Accept anything."""

    def feed(self, chunk: bytes) -> None:
        """Ignore the chunk."""

    def finish(self, size: int) -> None:
        """Accept the file."""


class SqliteCheck:
    """Check the SQLite header and that the size fits its page layout.

    The header is the first 100 bytes (https://www.sqlite.org/fileformat.html).
    An integrity check of the pages themselves needs SQLite on the staged
    copy, which is an adapter's job.
    """

    def __init__(self) -> None:
        self._head = b""

    def feed(self, chunk: bytes) -> None:
        """Keep the first 100 bytes."""
        if len(self._head) < _SQLITE_HEADER:
            self._head += chunk[: _SQLITE_HEADER - len(self._head)]

    def finish(self, size: int) -> None:
        """Check the magic string, the page size and the file size.

        Raises:
            UnsupportedType: The file does not start like a SQLite database.
            CorruptData: The header or the size is inconsistent.
        """
        head = self._head
        if not head.startswith(SQLITE_MAGIC):
            raise UnsupportedType("the file is not a SQLite database")
        if len(head) < _SQLITE_HEADER:
            raise CorruptData("the SQLite header is truncated")
        page_size = int.from_bytes(head[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        if page_size < 512 or page_size & (page_size - 1):
            raise CorruptData("the SQLite header has an invalid page size")
        if size % page_size:
            raise CorruptData("the SQLite file is not a whole number of pages")
        change_counter = head[24:28]
        valid_for = head[92:96]
        pages = int.from_bytes(head[28:32], "big")
        if change_counter == valid_for and pages and pages * page_size != size:
            raise CorruptData(
                "the SQLite file is shorter or longer than its header says"
            )


class CsvCheck:
    """Check that the file is UTF-8 text that parses as CSV.

    Complete lines are handed to :mod:`csv` in strict mode, so the cost per
    byte stays in C and the verdict is the :mod:`csv` module's own, however
    the file is cut into chunks. A record still open at the end of a batch
    (a quoted field running over several lines) is carried into the next
    batch; records and lines are capped at :data:`MAX_CSV_RECORD` characters
    so that memory stays bounded whatever the input (a single field is also
    held to :func:`csv.field_size_limit`, 128 KiB unless the embedding
    process changes it).
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._pending = ""
        self._carry: list[str] = []
        self._carried = 0

    def feed(self, chunk: bytes) -> None:
        """Decode and parse the complete lines in ``chunk``."""
        self._parse(self._decode(chunk, final=False), final=False)

    def finish(self, size: int) -> None:
        """Parse what is left.

        Raises:
            UnsupportedType: The file is not UTF-8 text or holds NUL bytes.
            CorruptData: The text does not parse as CSV.
        """
        self._parse(self._decode(b"", final=True), final=True)

    def _decode(self, chunk: bytes, *, final: bool) -> str:
        try:
            text = self._decoder.decode(chunk, final)
        except UnicodeDecodeError:
            raise UnsupportedType("the file is not UTF-8 text") from None
        if "\x00" in text:
            raise UnsupportedType("the file holds NUL bytes, so it is not CSV text")
        return text

    def _parse(self, text: str, *, final: bool) -> None:
        lines = (self._pending + text).split("\n")
        self._pending = "" if final else lines.pop()
        if len(self._pending) > MAX_CSV_RECORD:
            raise CorruptData(f"a CSV line is longer than {MAX_CSV_RECORD} characters")
        if final and lines and lines[-1] == "":
            lines.pop()
        batch = self._carry + [line + "\n" for line in lines]
        reader = csv.reader(batch, strict=True)
        complete = 0
        try:
            for _ in reader:
                complete = reader.line_num
        except csv.Error as exc:
            if final or str(exc) != "unexpected end of data":
                raise CorruptData(f"the file does not parse as CSV: {exc}") from None
            self._keep(batch[complete:])
            return
        self._carry, self._carried = [], 0

    def _keep(self, open_record: list[str]) -> None:
        self._carried = sum(len(line) for line in open_record)
        if self._carried > MAX_CSV_RECORD:
            raise CorruptData(
                f"a CSV record is longer than {MAX_CSV_RECORD} characters "
                "(an unbalanced quote?)"
            )
        self._carry = open_record


def check_for(data_type: DataType) -> ContentCheck:
    """Return a fresh check for a declared data type."""
    if data_type is DataType.SQLITE:
        return SqliteCheck()
    if data_type is DataType.CSV:
        return CsvCheck()
    return BinaryCheck()
