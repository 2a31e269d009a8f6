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

__all__ = ["BinaryCheck", "ContentCheck", "CsvCheck", "SqliteCheck", "check_for"]

SQLITE_MAGIC = b"SQLite format 3\x00"
_SQLITE_HEADER = 100


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

    Records are cut at line ends outside quotes (a line with an odd number of
    ``"`` opens or closes a quoted field), then parsed by :mod:`csv` in strict
    mode, so the cost per byte stays in C.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._pending = ""
        self._record: list[str] = []
        self._quoted = False

    def feed(self, chunk: bytes) -> None:
        """Decode and parse the complete records in ``chunk``."""
        self._parse(self._decode(chunk, final=False), final=False)

    def finish(self, size: int) -> None:
        """Parse what is left.

        Raises:
            UnsupportedType: The file is not UTF-8 text or holds NUL bytes.
            CorruptData: The text does not parse as CSV.
        """
        self._parse(self._decode(b"", final=True), final=True)
        if self._quoted:
            raise CorruptData("the CSV file ends inside a quoted field")

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
        records = []
        for line in lines:
            self._record.append(line)
            if line.count('"') % 2:
                self._quoted = not self._quoted
            if not self._quoted:
                records.append("\n".join(self._record) + "\n")
                self._record = []
        try:
            for _ in csv.reader(records, strict=True):
                pass
        except csv.Error as exc:
            raise CorruptData(f"the file does not parse as CSV: {exc}") from None


def check_for(data_type: DataType) -> ContentCheck:
    """Return a fresh check for a declared data type."""
    if data_type is DataType.SQLITE:
        return SqliteCheck()
    if data_type is DataType.CSV:
        return CsvCheck()
    return BinaryCheck()
