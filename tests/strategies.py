"""Shared Hypothesis strategies and profiles for the tests of dais.

Two profiles are registered here and loaded by ``tests/conftest.py``:
``fast`` (50 examples, the default) and ``thorough`` (1000 examples), chosen
with the ``HYPOTHESIS_PROFILE`` environment variable.

The route and resource-id strategies mix clean values with the spellings an
attacker would try (encoded dots and separators, double encoding, NUL,
``;`` parameters, backslashes, fullwidth look-alikes, control characters), so
that a property over "everything accepted" sees plenty of near misses.
"""

from __future__ import annotations

import csv
import io
import itertools
import re
import string
from urllib.parse import quote

from hypothesis import settings
from hypothesis import strategies as st

from dais_core.policies import RatePolicy
from dais_core.values import DataType, Grant

__all__ = [
    "NASTY_RESOURCE_SEGMENTS",
    "NASTY_ROUTE_SEGMENTS",
    "canonical_routes",
    "canonical_segments",
    "chunked",
    "csv_texts",
    "dyadic_rate_policies",
    "grants",
    "raw_resource_targets",
    "raw_routes",
    "request_gaps",
    "resource_ids",
    "resource_segments",
    "resource_with_grants",
    "route_segments",
    "smuggled_routes",
]

# No deadline: other suites share the machine, and time is not under test.
settings.register_profile("fast", max_examples=50, deadline=None)
settings.register_profile("thorough", max_examples=1000, deadline=None)

# RFC 3986 pchar without "%" and ";": what a canonical route keeps literal.
_PCHAR = string.ascii_letters + string.digits + "-._~!$&'()*+,=:@"

NASTY_ROUTE_SEGMENTS = (
    ".",
    "..",
    "...",
    "%2e",
    "%2E",
    "%2e%2e",
    ".%2E",
    "%2E.",
    "%2f",
    "%2F",
    "a%2Fb",
    "%5c",
    "%5C",
    "..%5c",
    "%25",
    "%252e",
    "%252F",
    "%25%32%65",
    "%00",
    "a%00b",
    ";",
    "x;y=1",
    "..;",
    "\\",
    "..\\x",
    "\x00",
    "\t",
    "\x7f",
    "%09",
    "%0a",
    "%0D",
    "%7F",
    "%C0%AE",
    "%C0%AF",
    "%ff",
    "%E2%80%AE",
    "%E2%80%8B",
    "%C2%A0",
    "%EF%BC%8E",
    "%EF%BC%8F",
    "%EF%BC%BC",
    "\uff0e",
    "\uff0e\uff0e",
    "\uff0f",
    "\uff3c",
    "\uff052e",
    "é",
    " ",
    "%",
    "%2",
    "%zz",
    "",
)

NASTY_RESOURCE_SEGMENTS = (
    "",
    ".",
    "..",
    "...",
    ". .",
    ".. ",
    " ..",
    "a.",
    "a ",
    " a",
    "\uff0e\uff0e",
    "\u2024\u2024",
    "..\\x",
    "a\\b",
    "C:",
    "c:x",
    "a:b",
    "\x00",
    "a\x00b",
    "\x1f",
    "\x85",
    "\u200b",
    "\u202e",
    "\uff43\uff4f\uff4e",
    "%2e%2e",
    "%2F",
    "x" * 256,
)

# Percent-encoded segments that are the canonical form of non-ASCII text.
_CANONICAL_ENCODED = ("%C3%A9", "caf%C3%A9", "%20", "a%20b", "%E2%82%AC", "%3F", "%23")


def canonical_segments() -> st.SearchStrategy[str]:
    """Segments already in canonical route form: never a dot segment."""
    literal = st.text(_PCHAR, min_size=1, max_size=8).filter(
        lambda s: s not in {".", ".."}
    )
    return st.one_of(literal, st.sampled_from(_CANONICAL_ENCODED))


def canonical_routes() -> st.SearchStrategy[str]:
    """Routes in canonical form, with or without a trailing slash."""
    return st.builds(
        lambda segments, trailing: "/" + "/".join(segments) + trailing * bool(segments),
        st.lists(canonical_segments(), max_size=5),
        st.sampled_from(["", "/"]),
    )


def _lower_escapes(encoded: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda escape: escape.group().lower(), encoded)


def _percent_encoded(text: str, upper: bool) -> str:
    encoded = quote(text, safe="")
    return encoded if upper else _lower_escapes(encoded)


def route_segments() -> st.SearchStrategy[str]:
    """Raw route segments: nasty ones, arbitrary text, and both glued to clean."""
    nasty = st.sampled_from(NASTY_ROUTE_SEGMENTS)
    clean = canonical_segments()
    encoded = st.builds(_percent_encoded, st.text(max_size=4), st.booleans())
    glued = st.builds(lambda a, b, c: a + b + c, clean, nasty, clean)
    return st.one_of(nasty, encoded, glued, st.text(max_size=6))


@st.composite
def _with_one_poison(
    draw: st.DrawFn, clean: st.SearchStrategy[str], poison: st.SearchStrategy[str]
) -> list[str]:
    segments = draw(st.lists(clean, max_size=5))
    if draw(st.booleans()):
        segments.insert(draw(st.integers(0, len(segments))), draw(poison))
    return segments


def raw_routes() -> st.SearchStrategy[str]:
    """Raw routes as they might appear in a request target.

    Mostly clean routes with at most one nasty segment, so that about half
    are accepted; now and then any text at all.
    """
    joined = st.builds(
        lambda segments, trailing: "/" + "/".join(segments) + trailing,
        _with_one_poison(canonical_segments(), route_segments()),
        st.sampled_from(["", "", "/", "//"]),
    )
    return st.one_of(joined, joined, joined, st.text(max_size=12))


_SMUGGLERS = ("%2f", "%2F", "%5c", "%5C", "%25", "%2541", "%252f", "%00", ";", "\\")


def smuggled_routes() -> st.SearchStrategy[str]:
    """Otherwise clean routes carrying an encoded separator, '%25', NUL, ';' or '\\'."""

    def smuggle(segments: list[str], at: int, where: int, token: str) -> str:
        segments = segments or ["x"]
        index = at % len(segments)
        segment = segments[index]
        cut = where % (len(segment) + 1)
        segments[index] = segment[:cut] + token + segment[cut:]
        return "/" + "/".join(segments)

    return st.builds(
        smuggle,
        st.lists(canonical_segments(), max_size=4),
        st.integers(0, 10),
        st.integers(0, 10),
        st.sampled_from(_SMUGGLERS),
    )


def resource_segments() -> st.SearchStrategy[str]:
    """Resource-id segments: plain names, look-alikes and traversal attempts."""
    plain = st.text(
        string.ascii_letters + string.digits + "-_.",
        min_size=1,
        max_size=10,
    ).filter(lambda s: not s.endswith("."))
    spaced = st.builds(lambda a, b: f"{a} {b}", plain, plain)
    unicode_names = st.text(
        st.characters(codec="utf-8", exclude_characters="/"), min_size=1, max_size=6
    )
    return st.one_of(
        plain,
        spaced,
        unicode_names,
        st.sampled_from(NASTY_RESOURCE_SEGMENTS),
    )


def resource_ids() -> st.SearchStrategy[str]:
    """Candidate resource ids: mostly clean, at most one nasty segment.

    Now and then the id is made absolute, given a drive, or ends in ``/``.
    """
    plain = st.text(
        string.ascii_letters + string.digits + "-_.", min_size=1, max_size=10
    ).filter(lambda s: not s.endswith("."))
    return st.builds(
        lambda lead, segments, trail: lead + "/".join(segments) + trail,
        st.sampled_from(["", "", "", "", "", "/", "C:", "\\"]),
        _with_one_poison(plain, resource_segments()).filter(bool),
        st.sampled_from(["", "", "", "", "/"]),
    )


def _encode_resource_segment(text: str, upper: bool, keep: str) -> str:
    encoded = quote(text, safe=keep)
    return encoded if upper else _lower_escapes(encoded)


def raw_resource_targets() -> st.SearchStrategy[str]:
    """Percent-encoded resource-id tails of a request target."""
    encoded = st.builds(
        _encode_resource_segment,
        resource_segments(),
        st.booleans(),
        st.sampled_from(["", "-._~", "-._~:@!$&'()*+,="]),
    )
    nasty = st.sampled_from(
        (
            "%2e%2e",
            "%2E%2e",
            ".%2e",
            "%2f",
            "a%2Fb",
            "%5c",
            "..%5C",
            "%00",
            "%25",
            "%252e%252e",
            "%C0%AE%C0%AE",
            "%EF%BC%8E%EF%BC%8E",
            "..",
            ".",
            "",
            ";",
            "a;b",
        )
    )
    return st.lists(st.one_of(encoded, nasty), min_size=1, max_size=5).map("/".join)


_NAME = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=4)


def _folder_location(scheme: str, folder: list[str]) -> str:
    path = "".join(f"{segment}/" for segment in folder)
    return f"{scheme}://store/{path}"


def grants() -> st.SearchStrategy[Grant]:
    """Grants whose locations are folders: prefix or exact, of any data type."""
    resource = st.lists(_NAME, min_size=1, max_size=3).map("/".join)
    location = st.builds(
        _folder_location,
        st.sampled_from(["filemanager", "s3"]),
        st.lists(_NAME, max_size=2),
    )
    return st.builds(
        Grant,
        st.one_of(resource, resource.map(lambda r: r + "/")),
        st.lists(location, min_size=1, max_size=3).map(tuple),
        st.sampled_from(DataType),
    )


@st.composite
def resource_with_grants(draw: st.DrawFn) -> tuple[str, list[Grant]]:
    """A resource id and grants that cover it, nearly cover it, or miss it.

    Near misses share a textual prefix with the resource but not its
    segments (``a/bx/`` against ``a/b/c``).
    """
    segments = draw(st.lists(_NAME, min_size=1, max_size=4))
    resource = "/".join(segments)
    candidates = [resource, resource + "x", "x" + resource]
    for depth in range(1, len(segments)):
        head = "/".join(segments[:depth])
        candidates += [head + "/", head + "x/", head]
    chosen = draw(st.lists(st.sampled_from(candidates), max_size=6, unique=True))
    chosen += draw(st.lists(_NAME.map(lambda n: n + "/"), max_size=2))
    folder = draw(st.lists(_NAME, max_size=2))
    return resource, [
        Grant(name, (_folder_location("filemanager", folder),)) for name in chosen
    ]


# Powers of two and quarters keep every throttle time exact in a float, so
# a bound can be checked to the tick rather than to within rounding error.
_TICK = 1 / 64


def dyadic_rate_policies() -> st.SearchStrategy[RatePolicy]:
    """Rate policies whose interval is a whole number of 1/64 s ticks."""
    return st.builds(
        RatePolicy,
        rate=st.sampled_from([1, 2, 4, 8]),
        period=st.integers(1, 16).map(lambda quarters: quarters / 4),
        burst=st.integers(1, 5),
    )


def request_gaps(policy: RatePolicy) -> st.SearchStrategy[list[float]]:
    """Gaps between successive requests, in whole 1/64 s ticks.

    Bursts (gap 0), whole intervals and the ticks just either side of an
    interval are drawn often, since that is where an off-by-one would show.
    """
    ticks = round(policy.interval / _TICK)
    gap_ticks = st.one_of(
        st.just(0),
        st.sampled_from([ticks - 1, ticks, ticks + 1, 2 * ticks]),
        st.integers(0, 4 * ticks * policy.burst),
    )
    return st.lists(gap_ticks.map(lambda n: max(n, 0) * _TICK), max_size=60)


def csv_texts(lineterminator: str = "\r\n") -> st.SearchStrategy[str]:
    """Text that :mod:`csv` writes: quoted commas, quotes and line breaks.

    Lone ``\\r`` is only in fields when records end in ``\\r\\n``: with a
    ``\\n`` terminator the writer of Python 3.11 would leave it unquoted.
    """
    alphabet = 'ab ,"\n\r\té€😀' if "\r" in lineterminator else 'ab ,"\n\té€😀'
    rows = st.lists(st.lists(st.text(alphabet, max_size=6), max_size=4), max_size=5)

    def write(rows: list[list[str]], quoting: int) -> str:
        out = io.StringIO()
        csv.writer(out, lineterminator=lineterminator, quoting=quoting).writerows(rows)
        return out.getvalue()

    return st.builds(write, rows, st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split ``data`` at the given cut points (taken modulo its length + 1)."""
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]
