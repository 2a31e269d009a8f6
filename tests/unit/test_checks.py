"""Streaming checks of declared data types (dais_core.checks)."""

from __future__ import annotations

import sqlite3
import tracemalloc
from collections.abc import Iterable

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from dais_core.checks import (
    MAX_CSV_RECORD,
    BinaryCheck,
    ContentCheck,
    CsvCheck,
    SqliteCheck,
    check_for,
)
from dais_core.errors import CorruptData, UnsupportedType
from dais_core.values import DataType
from tests import strategies

MULTILINE_CSV = (
    'id,comment,price\r\n1,"first line\nsecond, with comma",1.5\r\n'
    '2,"she said ""hi""\r\nthen left",€3\r\n3,"",😀\r\n'
).encode()

# A file whose records the line splitter and the csv module read differently:
# the quote in 'a"b' is a literal for csv, but opens a field for the splitter.
STRAY_QUOTE_CSV = b'a"b,"c\n",x"y\n'


def _sqlite_bytes(page_size: int = 4096, rows: int = 3) -> bytes:
    conn = sqlite3.connect(":memory:")
    conn.execute(f"PRAGMA page_size = {page_size}")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)")
    conn.executemany("INSERT INTO t (name) VALUES (?)", [("x" * 200,)] * rows)
    conn.commit()
    data = conn.serialize()
    conn.close()
    return data


SQLITE = _sqlite_bytes()


def _run(check: ContentCheck, chunks: Iterable[bytes]) -> None:
    size = 0
    for chunk in chunks:
        check.feed(chunk)
        size += len(chunk)
    check.finish(size)


def _accepted(check: ContentCheck, chunks: Iterable[bytes]) -> bool:
    try:
        _run(check, chunks)
    except (CorruptData, UnsupportedType):
        return False
    return True


def _peak_memory(check: ContentCheck, chunk: bytes, count: int) -> int:
    tracemalloc.start()
    try:
        for _ in range(count):
            check.feed(chunk)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class TestCheckFor:
    @pytest.mark.parametrize(
        ("data_type", "kind"),
        [
            (DataType.BINARY, BinaryCheck),
            (DataType.SQLITE, SqliteCheck),
            (DataType.CSV, CsvCheck),
        ],
    )
    def test_gives_a_fresh_check_per_type(self, data_type, kind):
        """Each declared type gets its own, new check."""
        check = check_for(data_type)
        assert isinstance(check, kind)
        assert check_for(data_type) is not check


class TestBinaryCheck:
    @pytest.mark.parametrize("data", [b"", b"\x00\xff" * 10, MULTILINE_CSV])
    def test_accepts_anything(self, data):
        """Undeclared data is any bytes at all, empty included."""
        _run(BinaryCheck(), [data])


class TestSqliteCheck:
    @pytest.mark.parametrize("page_size", [512, 4096, 65536])
    def test_accepts_a_real_database(self, page_size):
        """A database written by SQLite passes, whatever its page size."""
        _run(SqliteCheck(), [_sqlite_bytes(page_size)])

    @given(st.lists(st.integers(0, len(SQLITE)), max_size=6))
    def test_accepts_a_real_database_in_any_chunks(self, cuts):
        """The verdict does not depend on where the stream is cut."""
        _run(SqliteCheck(), strategies.chunked(SQLITE, cuts))

    @pytest.mark.parametrize(
        "data",
        [b"", b"hello", b"id,name\n1,x\n", b"SQLite format 2\x00" + b"\x00" * 84],
        ids=["empty", "text", "csv", "wrong-magic"],
    )
    def test_refuses_what_is_not_sqlite_as_unsupported(self, data):
        """A file that does not start like SQLite is of the wrong type (415)."""
        with pytest.raises(UnsupportedType):
            _run(SqliteCheck(), [data])

    def test_refuses_a_truncated_header_as_corrupt(self):
        """The magic string alone, without the rest of the header, is corrupt."""
        with pytest.raises(CorruptData, match="truncated"):
            _run(SqliteCheck(), [SQLITE[:60]])

    @pytest.mark.parametrize("page_size", [0, 256, 1000, 3000])
    def test_refuses_an_invalid_page_size_as_corrupt(self, page_size):
        """A page size that is not a power of two from 512 up is corrupt."""
        data = SQLITE[:16] + page_size.to_bytes(2, "big") + SQLITE[18:]
        with pytest.raises(CorruptData, match="page size"):
            _run(SqliteCheck(), [data])

    @pytest.mark.parametrize(
        "data",
        [SQLITE[:-1], SQLITE + b"\x00", SQLITE[:-4096], SQLITE + b"\x00" * 4096],
        ids=["byte-short", "byte-long", "page-short", "page-long"],
    )
    def test_refuses_a_size_its_header_does_not_allow_as_corrupt(self, data):
        """A file cut or padded against its header's page count is corrupt."""
        with pytest.raises(CorruptData):
            _run(SqliteCheck(), [data])

    def test_trusts_the_page_count_only_when_the_header_vouches_for_it(self):
        """A page count whose change counter and valid-for differ is not checked."""
        bumped = SQLITE[:24] + (1).to_bytes(4, "big") + SQLITE[28:]
        _run(SqliteCheck(), [bumped + b"\x00" * 4096])


class TestCsvCheck:
    @pytest.mark.parametrize(
        "data",
        [
            b"",
            b"a,b\n1,2\n",
            b"a,b\r\n1,2\r\n",
            b"a,b\n1,2",
            b"\xef\xbb\xbfa,b\n",
            MULTILINE_CSV,
        ],
        ids=["empty", "lf", "crlf", "no-final-newline", "bom", "multiline"],
    )
    def test_accepts_utf8_csv(self, data):
        """UTF-8 CSV passes, with LF or CRLF records and multi-line quoted fields."""
        _run(CsvCheck(), [data])

    def test_accepts_multiline_fields_cut_at_every_position(self):
        """Cutting the stream anywhere, even inside a character, changes nothing."""
        for cut in range(len(MULTILINE_CSV) + 1):
            _run(CsvCheck(), [MULTILINE_CSV[:cut], MULTILINE_CSV[cut:]])

    def test_accepts_one_byte_at_a_time(self):
        """Feeding single bytes gives the same verdict as one chunk."""
        _run(CsvCheck(), [bytes([b]) for b in MULTILINE_CSV])

    @given(
        st.one_of(strategies.csv_texts("\r\n"), strategies.csv_texts("\n")),
        st.lists(st.integers(min_value=0), max_size=6),
    )
    def test_accepts_whatever_csv_writes_in_any_chunks(self, text, cuts):
        """Any file the csv module writes passes, however it is cut."""
        _run(CsvCheck(), strategies.chunked(text.encode(), cuts))

    @pytest.mark.parametrize(
        "data",
        [b'a,"open\n', b'a,"open\nstill open\n', b'"', MULTILINE_CSV + b'4,"x\r\n'],
        ids=["one-line", "two-lines", "lone-quote", "after-good-rows"],
    )
    def test_an_unterminated_quote_is_corrupt(self, data):
        """A file ending inside a quoted field is corrupt (400)."""
        with pytest.raises(CorruptData):
            _run(CsvCheck(), [data])

    def test_an_unterminated_quote_is_corrupt_wherever_it_is_cut(self):
        """The unterminated quote is found whatever the chunk boundaries."""
        data = b'a,b\n1,"never\nclosed\n'
        for cut in range(len(data) + 1):
            with pytest.raises(CorruptData):
                _run(CsvCheck(), [data[:cut], data[cut:]])

    @pytest.mark.parametrize(
        "data",
        [b'"a"b,c\n', b'a,"b"c\n', b'"a" ,b\n'],
        ids=["text-after-quote", "second-field", "space-after-quote"],
    )
    def test_text_after_a_closing_quote_is_corrupt(self, data):
        """Strict CSV wants a delimiter or line end right after a closing quote."""
        with pytest.raises(CorruptData):
            _run(CsvCheck(), [data])

    @pytest.mark.parametrize(
        "chunks",
        [[b"a,\xff\n"], [b"caf\xc3"], [b"caf\xc3", b"("], [b"\xfe\xff\x00a"]],
        ids=["bad-byte", "cut-character-at-end", "bad-continuation", "utf16"],
    )
    def test_non_utf8_is_unsupported(self, chunks):
        """Bytes that are not UTF-8 text are of the wrong type (415)."""
        with pytest.raises(UnsupportedType):
            _run(CsvCheck(), chunks)

    def test_a_character_split_across_chunks_is_fine(self):
        """A multi-byte character cut between two chunks decodes whole."""
        _run(CsvCheck(), [b"caf\xc3", b"\xa9,1\n"])

    def test_nul_bytes_are_unsupported(self):
        """Text with NUL bytes is not CSV (415)."""
        with pytest.raises(UnsupportedType, match="NUL"):
            _run(CsvCheck(), [b"a,b\n1,\x002\n"])

    def test_memory_stays_flat_for_a_large_well_formed_file(self):
        """Checking 4 MiB of ordinary records keeps well under 1 MiB live."""
        row = b"x" * 1023 + b"\n"
        assert _peak_memory(CsvCheck(), row * 64, 64) < 1 << 20

    def test_an_endless_quoted_field_is_refused_with_bounded_memory(self):
        """A stray quote does not make the check keep the rest of the file."""
        check = CsvCheck()
        check.feed(b'id,"opens here\n')
        row = b"x" * 1023 + b"\n"
        tracemalloc.start()
        try:
            with pytest.raises(CorruptData):
                for _ in range(64):
                    check.feed(row * 64)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 2 << 20

    def test_a_file_without_newlines_is_cut_off_with_bounded_memory(self):
        """One endless line is refused once it passes the cap."""
        with pytest.raises(CorruptData, match="line is longer"):
            _peak_memory(CsvCheck(), b"y" * 65536, (MAX_CSV_RECORD >> 16) + 2)

    @given(
        st.lists(st.sampled_from([b"a", b",", b'"', b"\n", b"\r\n"]), max_size=20).map(
            b"".join
        ),
        st.lists(st.integers(min_value=0), max_size=3),
    )
    @example(STRAY_QUOTE_CSV, [7])
    def test_the_verdict_does_not_depend_on_chunk_boundaries(self, data, cuts):
        """A file is accepted or refused the same however its chunks are cut."""
        whole = _accepted(CsvCheck(), [data])
        assert _accepted(CsvCheck(), strategies.chunked(data, cuts)) is whole
