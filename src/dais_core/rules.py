"""Pure rules for names, gateway routes, resource ids and storage locations.

Each rule either returns one canonical value or raises a precise error. The
gateway checks a route in its canonical form and forwards exactly that form,
so a route that two parsers could read differently is refused, never
"repaired" into another path.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection, Iterable
from urllib.parse import quote, unquote_to_bytes, urlsplit

import attrs

from dais_core.errors import InvalidData, InvalidResourceId, InvalidRoute
from dais_core.keys import shown
from dais_core.values import KeyRequest

__all__ = [
    "MAX_ROUTE_LENGTH",
    "Location",
    "MAX_LINEAGE_VERSION",
    "MAX_TIME",
    "MAX_BUSINESS_CASE",
    "MAX_DETAIL",
    "MAX_LABEL",
    "check_grant_locations",
    "check_key_details",
    "check_lineage_version",
    "check_methods",
    "check_name",
    "check_served",
    "check_service_url",
    "check_text",
    "check_time",
    "is_under",
    "normalise_prefix",
    "normalise_route",
    "parse_location",
    "resource_id_from_target",
    "check_resource_id",
]

MAX_ROUTE_LENGTH = 4096
#: Lineage versions are stored as 32-bit integers.
MAX_LINEAGE_VERSION = 2**31 - 1
#: The latest time a key may be set to expire: the end of the year 9998, so
#: that every stored time stays a valid date in every time zone.
MAX_TIME = 253370764800.0
MAX_RESOURCE_ID_LENGTH = 1024
MAX_SEGMENT_BYTES = 255
#: The longest label of a key or an admin token, in characters.
MAX_LABEL = 200
#: The longest requestor, approver or case code, in characters.
MAX_DETAIL = 254
#: The longest business case, in characters (line breaks allowed).
MAX_BUSINESS_CASE = 4000
#: The most app ids one key may name.
MAX_APP_IDS = 64

# Unicode categories refused in stored text: controls (C0, C1, DEL), format
# characters (bidi overrides and marks, zero-width characters, tags),
# surrogates, private use, unassigned, and the line and paragraph
# separators. They could rewrite a terminal that lists keys, hide text, or
# make a page show text in another order than it is stored.
_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_LINE_BREAKS = frozenset("\t\n\r")

# RFC 3986 pchar, less ";" (path parameters are refused), as a raw segment.
_RAW_SEGMENT = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,=:@]|%[0-9A-Fa-f]{2})+")
# A segment of path characters that are all canonical as they are.
_PLAIN_SEGMENT = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,=:@]+")
# Characters kept literal in a canonical segment; everything else is %XX.
_CANONICAL_SAFE = "-._~!$&'()*+,=:@"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_DRIVE = re.compile(r"[A-Za-z]:")
_FORBIDDEN_IN_SEGMENT = frozenset("/\\%;")
# Characters that NFKC leaves alone but that Windows' "best fit" code page
# conversion (or a font) turns into '/' or '\\': an upstream that converts
# would read them as separators the permission never saw.
_SEPARATOR_LOOKALIKES = frozenset(
    "\u2044\u2215\u2571\u27cb\u29f8"  # fraction, division, diagonal, big solidus
    "\u2216\u2572\u27cd\u29f5\u29f9"  # set minus, reverse diagonals, solidi
    "\u00a5\u20a9"  # yen and won signs: '\\' in Japanese and Korean code pages
)


def check_name(value: str, what: str) -> str:
    """Return ``value`` if it is a safe project or service name.

    Args:
        value: The candidate name.
        what: What the name is, for the error message.

    Raises:
        InvalidData: The name is empty, too long or has other characters
            than ASCII letters, digits, ``-`` and ``_``.
    """
    if not _NAME.fullmatch(value):
        raise InvalidData(
            f"{what} must be 1-128 letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return value


def check_text(value: str, what: str, limit: int, *, lines: bool = False) -> str:
    """Return ``value`` if it is free text an admin may store.

    Args:
        value: The text.
        what: What it is, for the error message.
        limit: The most characters allowed.
        lines: Allow tabs and line breaks.

    Raises:
        InvalidData: Longer than ``limit``, holding control or invisible
            characters (see ``_UNPRINTABLE``), or a lone UTF-16 surrogate.
    """
    if len(value) > limit:
        raise InvalidData(f"{what} is longer than {limit} characters")
    allowed = _LINE_BREAKS if lines else frozenset()
    for char in value:
        category = unicodedata.category(char)
        if category == "Cs":
            raise InvalidData(f"{what} is not valid Unicode text")
        if category in _UNPRINTABLE and char not in allowed:
            raise InvalidData(
                f"{what} holds control or invisible characters (U+{ord(char):04X})"
            )
    return value


def check_key_details(label: str, request: KeyRequest) -> None:
    """Check a key's label and the record of who asked for it and why.

    Raises:
        InvalidData: A field too long or not printable text (see
            :func:`check_text`), too many app ids, or one that is no name.
    """
    check_text(label, "the label", MAX_LABEL)
    check_text(request.requestor, "the requestor", MAX_DETAIL)
    check_text(request.approver, "the approver", MAX_DETAIL)
    check_text(request.case_code, "the case code", MAX_DETAIL)
    check_text(
        request.business_case, "the business case", MAX_BUSINESS_CASE, lines=True
    )
    if len(request.app_ids) > MAX_APP_IDS:
        raise InvalidData(f"a key names at most {MAX_APP_IDS} app ids")
    for app_id in request.app_ids:
        check_name(app_id, "an app id")


_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}")


def check_methods(methods: Iterable[str]) -> frozenset[str]:
    """Return HTTP methods, upper case, if each is an RFC 9110 token.

    Raises:
        InvalidData: A method is empty or has other characters.
    """
    checked = set()
    for method in methods:
        if not _METHOD.fullmatch(method):
            raise InvalidData(f"{shown(method)} is not an HTTP method")
        checked.add(method.upper())
    return frozenset(checked)


def check_lineage_version(value: int) -> int:
    """Return ``value`` if it is a lineage version that can be stored.

    Raises:
        InvalidData: Not between 1 and :data:`MAX_LINEAGE_VERSION`.
    """
    if isinstance(value, bool) or not 1 <= value <= MAX_LINEAGE_VERSION:
        raise InvalidData(
            f"a lineage version is a whole number from 1 to {MAX_LINEAGE_VERSION}"
        )
    return value


#: What a URL can carry as it is: visible ASCII (RFC 3986, section 2).
_URL_CHARACTERS = re.compile(r"[\x21-\x7e]+")


def check_service_url(url: str) -> str:
    """Return a service's base URL, without a trailing ``/``, if it is usable.

    Raises:
        InvalidData: Not an ``http`` or ``https`` URL with a host, or it has
            credentials, a query or a fragment, or characters a URL cannot
            carry as they are (spaces, controls, non-ASCII).
    """
    if _URL_CHARACTERS.fullmatch(url) is None:
        raise InvalidData(
            "the service URL may hold visible ASCII only: percent-encode "
            "spaces and other characters"
        )
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise InvalidData("the service URL does not parse") from None
    if parts.scheme not in {"http", "https"} or not host:
        raise InvalidData("the service URL must be http:// or https:// with a host")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise InvalidData(
            "the service URL may not carry credentials, query or fragment"
        )
    return url.rstrip("/")


def check_time(value: float) -> float:
    """Return an epoch time if it is a date every presentation can show.

    Raises:
        InvalidData: Not finite, or before 1970 or after :data:`MAX_TIME`.
    """
    if not 0.0 <= value <= MAX_TIME:
        raise InvalidData("times must fall between 1970 and the year 9998")
    return value


def _is_control(ch: str) -> bool:
    return unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def _canonical_segment(raw: str) -> str:
    if _PLAIN_SEGMENT.fullmatch(raw):
        # Hot path: no escapes, so the segment is its own decoded and
        # canonical form; only a dot segment is refused.
        if raw.strip(".") == "":
            raise InvalidRoute("dot segments are not allowed in a route")
        return raw
    return _decoded_segment(raw)


def _decoded_segment(raw: str) -> str:
    if not _RAW_SEGMENT.fullmatch(raw):
        raise InvalidRoute(
            "route segments may hold only RFC 3986 path characters "
            "(no ';', '\\', spaces, control or raw non-ASCII characters)"
        )
    try:
        decoded = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRoute("route segment is not valid UTF-8 once decoded") from None
    if "." in decoded and decoded.strip(". ") == "":
        # "." and "..", and what some servers trim down to them ("...", ".. ").
        raise InvalidRoute("dot segments are not allowed in a route")
    if any(ch in _FORBIDDEN_IN_SEGMENT or _is_control(ch) for ch in decoded):
        raise InvalidRoute(
            "encoded '/', '\\', '%', ';' or control characters are not allowed "
            "in a route"
        )
    if any(ch in _SEPARATOR_LOOKALIKES for ch in decoded):
        raise InvalidRoute(
            "characters that read as '/' or '\\' once converted (division or "
            "fraction slash, set minus, yen or won sign) are not allowed in a route"
        )
    if unicodedata.normalize("NFKC", decoded) != decoded:
        raise InvalidRoute("route segment is not in Unicode normal form NFKC")
    return quote(decoded, safe=_CANONICAL_SAFE)


def normalise_route(raw: str) -> str:
    """Return the canonical form of a raw gateway route.

    The canonical form starts with ``/``, has no empty segment except an
    optional trailing one, and percent-encodes exactly the characters that are
    not RFC 3986 path characters, in upper case. Normalising a canonical route
    returns it unchanged.

    Args:
        raw: The route as it appeared in the request target, percent-encoded,
            without the query string. ``""`` means ``/``.

    Returns:
        The canonical route.

    Raises:
        InvalidRoute: The route has dot segments, double slashes, encoded
            separators, double encoding, ``;`` parameters, control characters,
            invalid UTF-8 or a non-NFKC segment, or is too long.
    """
    if raw in {"", "/"}:
        return "/"
    if len(raw) > MAX_ROUTE_LENGTH:
        raise InvalidRoute(f"route is longer than {MAX_ROUTE_LENGTH} characters")
    if not raw.startswith("/"):
        raise InvalidRoute("route must start with '/'")
    segments = raw[1:].split("/")
    trailing = segments[-1] == ""
    if trailing:
        segments.pop()
    if any(segment == "" for segment in segments):
        raise InvalidRoute("empty path segments (double slashes) are not allowed")
    canonical = "/" + "/".join(_canonical_segment(s) for s in segments)
    return canonical + "/" if trailing else canonical


def normalise_prefix(prefix: str) -> str:
    """Return the canonical form of a permission's route prefix.

    A trailing slash is dropped: ``/api/webhook/`` and ``/api/webhook`` cover
    the same routes.

    Raises:
        InvalidRoute: The prefix is not a valid route.
    """
    canonical = normalise_route(prefix)
    return canonical.rstrip("/") or "/"


def _segments(route: str) -> list[str]:
    return [s for s in route.split("/") if s]


def is_under(route: str, prefix: str) -> bool:
    """Return whether a canonical route lies at or under a canonical prefix.

    The comparison is by whole segments and case-sensitive: ``/api/webhook``
    covers ``/api/webhook`` and ``/api/webhook/x``, never ``/api/webhookx``.
    """
    wanted = _segments(prefix)
    return _segments(route)[: len(wanted)] == wanted


def _check_resource_segment(segment: str) -> None:
    if segment == "":
        raise InvalidResourceId("resource id has an empty segment")
    if segment in {".", ".."}:
        raise InvalidResourceId("resource id has a dot segment")
    if any(ch in "\\:\x00" or _is_control(ch) for ch in segment):
        raise InvalidResourceId(
            "resource id segments may not hold '\\', ':' or control characters"
        )
    if any(ch in _SEPARATOR_LOOKALIKES for ch in segment):
        # A File Manager shared with Windows clients would show a folder.
        raise InvalidResourceId(
            "resource id segments may not hold characters that read as '/' or "
            "'\\' once converted (division or fraction slash, set minus, yen or "
            "won sign)"
        )
    if segment != segment.strip() or segment.endswith("."):
        raise InvalidResourceId(
            "resource id segments may not start or end with spaces or end with '.'"
        )
    if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
        raise InvalidResourceId(
            f"resource id segments are at most {MAX_SEGMENT_BYTES} bytes"
        )
    if unicodedata.normalize("NFKC", segment) != segment:
        raise InvalidResourceId("resource id is not in Unicode normal form NFKC")


def check_resource_id(value: str, *, allow_prefix: bool = False) -> str:
    """Return ``value`` if it is a safe resource id, relative and contained.

    ``dirOne/dirTwo/name`` is fine; empty segments, ``.`` and ``..``,
    absolute paths, backslashes and what converts to one or to ``/``, drive
    letters, ``:``, NUL and control characters are refused. Joined under
    any root, an accepted id stays under that root.

    Args:
        value: The decoded resource id.
        allow_prefix: Accept one trailing ``/`` (a prefix grant).

    Raises:
        InvalidResourceId: The id breaks one of the rules above.
    """
    if not value:
        raise InvalidResourceId("resource id is empty")
    if len(value) > MAX_RESOURCE_ID_LENGTH:
        raise InvalidResourceId(
            f"resource id is longer than {MAX_RESOURCE_ID_LENGTH} characters"
        )
    if value.startswith("/") or _DRIVE.match(value):
        raise InvalidResourceId("resource id must be relative")
    body = value[:-1] if allow_prefix and value.endswith("/") else value
    for segment in body.split("/"):
        _check_resource_segment(segment)
    return value


def resource_id_from_target(raw: str) -> str:
    """Decode a resource id from the percent-encoded tail of a request target.

    Each segment is decoded on its own, so an encoded ``/`` can never create
    a directory.

    Raises:
        InvalidResourceId: A segment is not valid percent-encoded UTF-8, or
            the decoded id breaks :func:`check_resource_id`.
    """
    decoded = []
    for segment in raw.split("/"):
        if not _RAW_SEGMENT.fullmatch(segment):
            raise InvalidResourceId(
                "resource id segments may hold only RFC 3986 path characters"
            )
        try:
            text = unquote_to_bytes(segment).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidResourceId("resource id is not valid UTF-8") from None
        if "/" in text or "%" in text:
            raise InvalidResourceId("encoded '/' or '%' in a resource id")
        decoded.append(text)
    return check_resource_id("/".join(decoded))


@attrs.frozen
class Location:
    """A storage location: ``scheme://authority/path``.

    For ``filemanager://P/inputs/x.csv`` the authority is the project ``P`` and
    the path ``inputs/x.csv``; for ``s3://bucket/key`` it is the bucket.
    A location whose path ends in ``/`` is a folder that a prefix grant fills.
    """

    scheme: str
    authority: str
    path: str

    @property
    def is_folder(self) -> bool:
        """Whether this location names a folder rather than a file."""
        return self.path.endswith("/") or self.path == ""

    @property
    def uri(self) -> str:
        """The location written as a URI."""
        return f"{self.scheme}://{self.authority}/{self.path}"

    def join(self, relative: str) -> Location:
        """Return the location of ``relative`` inside this folder.

        A path without a trailing ``/`` is taken as a folder all the same:
        the result is always inside it, never beside it.

        Raises:
            InvalidResourceId: ``relative`` is not a safe resource id.
        """
        check_resource_id(relative)
        folder = self.path if self.is_folder else self.path + "/"
        return Location(self.scheme, self.authority, folder + relative)


def check_served(uri: str, schemes: Collection[str]) -> str:
    """Return a location URI, checked and canonical, if a storage serves it.

    Raises:
        InvalidData: It does not parse (see :func:`parse_location`), or no
            storage serves its scheme, so every upload to it would fail.
    """
    location = parse_location(uri)
    if location.scheme not in schemes:
        served = ", ".join(f"{scheme}://" for scheme in sorted(schemes)) or "none"
        raise InvalidData(
            f"no storage serves {location.scheme}:// locations here (served: {served})"
        )
    return location.uri


def check_grant_locations(
    resource: str, uris: Iterable[str], schemes: Collection[str]
) -> tuple[str, ...]:
    """Return a grant's locations, checked and canonical, in their order.

    Args:
        resource: The grant's resource id (a prefix ends in ``/``).
        uris: The locations asked for.
        schemes: The schemes an installed storage serves.

    Raises:
        InvalidData: No location, one no storage serves (see
            :func:`check_served`), one named twice (it would be written
            twice by each upload), or a file location for a prefix grant.
    """
    locations = tuple(check_served(uri, schemes) for uri in uris)
    if not locations:
        raise InvalidData("a grant needs at least one location")
    if len(set(locations)) < len(locations):
        raise InvalidData("a grant names the same location twice")
    if resource.endswith("/") and not all(uri.endswith("/") for uri in locations):
        raise InvalidData(
            "a prefix grant (resource ending in '/') needs folder locations"
        )
    return locations


def parse_location(uri: str) -> Location:
    """Parse and check a storage location URI.

    Args:
        uri: ``scheme://authority/path``; the path follows the resource-id
            rules and may end in ``/`` to name a folder.

    Raises:
        InvalidData: No scheme or authority, a query or fragment, or an unsafe
            path.
    """
    parts = urlsplit(uri)
    if not parts.scheme or not parts.netloc:
        raise InvalidData("a location needs a scheme and an authority")
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise InvalidData("a location may not have credentials, query or fragment")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", parts.netloc):
        raise InvalidData("a location's authority must be a plain name")
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if path:
        check_resource_id(path, allow_prefix=True)
    return Location(parts.scheme.lower(), parts.netloc, path)
