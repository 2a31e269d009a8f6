"""Names, gateway routes, resource ids and storage locations (dais_core.rules)."""

from __future__ import annotations

import posixpath
import re
import string
from collections.abc import Callable
from urllib.parse import unquote

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from dais_core import rules
from dais_core.errors import InvalidData, InvalidResourceId, InvalidRoute
from dais_core.rules import (
    MAX_BUSINESS_CASE,
    MAX_LABEL,
    MAX_ROUTE_LENGTH,
    Location,
    check_grant_locations,
    check_key_details,
    check_lineage_version,
    check_methods,
    check_name,
    check_resource_id,
    check_served,
    check_service_url,
    check_text,
    check_time,
    is_under,
    normalise_prefix,
    normalise_route,
    parse_location,
    resource_id_from_target,
)
from dais_core.values import KeyRequest
from tests import strategies

_SMUGGLED = re.compile(r"%2f|%5c|%25|%00", re.IGNORECASE)


def _accepted_route(raw: str) -> str | None:
    try:
        return normalise_route(raw)
    except InvalidRoute:
        return None


def _outcome(canonical: Callable[[str], str], segment: str) -> str | None:
    try:
        return canonical(segment)
    except InvalidRoute:
        return None


def _accepted_id(value: str) -> str | None:
    try:
        return check_resource_id(value)
    except InvalidResourceId:
        return None


class TestCheckName:
    @pytest.mark.parametrize("name", ["p", "Project-1", "svc_a", "9lives", "a" * 128])
    def test_accepts_plain_names(self, name):
        """Letters, digits, '-' and '_' starting with a letter or digit are names."""
        assert check_name(name, "projectId") == name

    @pytest.mark.parametrize(
        "name",
        ["", "-p", "_p", "a.b", "a/b", "a b", "a%41", "a" * 129, "é", "p\n", ".."],
    )
    def test_refuses_anything_else(self, name):
        """Empty, too long, or other characters are refused, naming the field."""
        with pytest.raises(InvalidData, match="serviceName"):
            check_name(name, "serviceName")


class TestNormaliseRoute:
    @pytest.mark.parametrize(
        ("raw", "canonical"),
        [
            ("", "/"),
            ("/", "/"),
            ("/api/webhooks/schedule", "/api/webhooks/schedule"),
            ("/api/webhooks/", "/api/webhooks/"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/%41%7e", "/A~"),
            ("/a%3Fb", "/a%3Fb"),
            ("/a%20b", "/a%20b"),
            ("/.well-known/x", "/.well-known/x"),
        ],
    )
    def test_canonical_forms(self, raw, canonical):
        """A route is canonicalised: upper-case escapes, unreserved bytes decoded."""
        assert normalise_route(raw) == canonical

    @pytest.mark.parametrize(
        "raw",
        [
            "api",
            "/api//x",
            "//api",
            "/api/./x",
            "/api/../x",
            "/api/..",
            "/api/...",
            "/api/..%20",
            "/api/.%20./x",
            "/api/%2e%2e/x",
            "/api/.%2E/x",
            "/api/%2E/x",
            "/api%2fx",
            "/api%2Fx",
            "/api%5cx",
            "/api\\x",
            "/api/x;jsessionid=1",
            "/api/..;/x",
            "/api/%3b",
            "/api/%252e%252e",
            "/api/%25",
            "/api/%00",
            "/api/\x00",
            "/api/%0a",
            "/api/a b",
            "/api/é",
            "/api/%ff",
            "/api/%C0%AE%C0%AE",
            "/api/%EF%BC%8E%EF%BC%8E",
            "/api/%EF%BC%8F",
            "/api/%E2%80%AE",
            "/api/..%E2%88%95secret",
            "/api/%E2%81%84x",
            "/api/%E2%88%96x",
            "/api/%E2%A7%B8x",
            "/api/%C2%A5x",
            "/api/%E2%82%A9x",
            "/api/%",
            "/api/%zz",
            "/" + "a" * MAX_ROUTE_LENGTH,
        ],
    )
    def test_refuses_what_two_parsers_could_read_differently(self, raw):
        """Dot segments, encoded separators, double encoding and the like are 400."""
        with pytest.raises(InvalidRoute):
            normalise_route(raw)

    @given(strategies.raw_routes())
    @example("/%2e%2e/%2F")
    def test_is_idempotent_on_everything_it_accepts(self, raw):
        """Normalising a canonical route returns it unchanged."""
        canonical = _accepted_route(raw)
        if canonical is None:
            return
        assert normalise_route(canonical) == canonical

    @given(strategies.raw_routes())
    def test_accepted_routes_hold_nothing_that_could_be_reread(self, raw):
        """An accepted route has no dot segment, '//', encoded separator, ';' or '\\'."""
        canonical = _accepted_route(raw)
        if canonical is None:
            return

        assert canonical.startswith("/")
        assert "//" not in canonical
        assert ";" not in canonical
        assert "\\" not in canonical
        assert not _SMUGGLED.search(canonical)
        segments = canonical.split("/")
        assert not {unquote(s) for s in segments} & {".", ".."}

    @given(strategies.smuggled_routes())
    def test_a_smuggled_separator_is_refused_never_repaired(self, raw):
        """A route carrying an encoded separator, '%25', NUL, ';' or '\\' is refused."""
        with pytest.raises(InvalidRoute):
            normalise_route(raw)

    @given(
        st.text(
            alphabet=string.ascii_letters + string.digits + "-._~!$&'()*+,=:@.",
            min_size=1,
            max_size=8,
        )
    )
    @example(".")
    @example("..")
    @example("...")
    def test_the_plain_segment_shortcut_agrees_with_full_decoding(self, segment):
        """A segment without escapes comes out as full decoding gives it."""
        assert _outcome(rules._canonical_segment, segment) == _outcome(
            rules._decoded_segment, segment
        )

    @given(st.text(max_size=20))
    def test_any_text_is_either_canonicalised_or_an_invalid_route(self, raw):
        """No input makes it fail with anything but InvalidRoute."""
        canonical = _accepted_route(raw)
        assert canonical is None or canonical.startswith("/")


class TestNormalisePrefix:
    @pytest.mark.parametrize(
        ("prefix", "canonical"),
        [
            ("/api/webhook/", "/api/webhook"),
            ("/api/webhook", "/api/webhook"),
            ("/", "/"),
        ],
    )
    def test_drops_the_trailing_slash(self, prefix, canonical):
        """'/api/webhook/' and '/api/webhook' are the same prefix."""
        assert normalise_prefix(prefix) == canonical

    def test_refuses_an_invalid_route(self):
        """A prefix is held to the same rules as a route."""
        with pytest.raises(InvalidRoute):
            normalise_prefix("/api/../admin")


class TestIsUnder:
    @pytest.mark.parametrize(
        ("route", "prefix", "covered"),
        [
            ("/api/webhook", "/api/webhook", True),
            ("/api/webhook/", "/api/webhook", True),
            ("/api/webhook/x", "/api/webhook", True),
            ("/api/webhookx", "/api/webhook", False),
            ("/api/webhookx/y", "/api/webhook", False),
            ("/api", "/api/webhook", False),
            ("/API/webhook", "/api/webhook", False),
            ("/anything", "/", True),
            ("/", "/", True),
        ],
    )
    def test_examples(self, route, prefix, covered):
        """A prefix covers itself and what lies below it, by whole segments."""
        assert is_under(route, prefix) is covered

    @given(strategies.canonical_routes(), strategies.canonical_routes())
    def test_matches_whole_segments(self, route, prefix_route):
        """is_under holds iff the route's segments start with the prefix's."""
        prefix = normalise_prefix(prefix_route)
        route_segments = [s for s in route.split("/") if s]
        prefix_segments = [s for s in prefix.split("/") if s]

        expected = route_segments[: len(prefix_segments)] == prefix_segments
        assert is_under(route, prefix) is expected
        as_text = prefix == "/" or route.rstrip("/") == prefix
        assert expected is (as_text or route.startswith(prefix + "/"))

    @given(
        st.lists(strategies.canonical_segments(), min_size=1, max_size=4),
        strategies.canonical_segments(),
        st.lists(strategies.canonical_segments(), max_size=3),
    )
    def test_a_longer_last_segment_is_never_covered(self, segments, extra, rest):
        """'/api/webhook' never covers '/api/webhookx...' whatever follows."""
        prefix = "/" + "/".join(segments)
        route = prefix + extra + "".join("/" + s for s in rest)
        assert not is_under(normalise_route(route), prefix)


class TestCheckResourceId:
    @pytest.mark.parametrize(
        "value",
        ["a.csv", "dirOne/dirTwo/resourceName", ".hidden", "a..b", "é/ü", "a b/c-d_e"],
    )
    def test_accepts_relative_ids(self, value):
        """Relative ids with directories are returned as they are."""
        assert check_resource_id(value) == value

    @pytest.mark.parametrize(
        "value",
        [
            "",
            "/etc/passwd",
            "a//b",
            "a/",
            "./a",
            "a/../b",
            "..",
            "a\\b",
            "C:x",
            "c:/x",
            "a:b",
            "a\x00b",
            "a\x1fb",
            "a\u202eb",
            "a./b",
            "a /b",
            " a",
            "\uff0e\uff0e/x",
            "\uff41",
            "a\u2215b",
            "a\u2044b",
            "a\u29f5b",
            "a\u00a5b",
            "x" * 256,
            "a/" * 600,
        ],
    )
    def test_refuses_unsafe_ids(self, value):
        """Absolute, dotted, drive, control, slash-like or non-NFKC ids are 400."""
        with pytest.raises(InvalidResourceId):
            check_resource_id(value)

    def test_a_prefix_may_end_with_one_slash_when_allowed(self):
        """A prefix grant's id may end in '/', but only one."""
        assert check_resource_id("exports/", allow_prefix=True) == "exports/"
        with pytest.raises(InvalidResourceId):
            check_resource_id("exports//", allow_prefix=True)

    @given(strategies.resource_ids(), st.sampled_from(["/srv/data", "/r", "/a/b/c"]))
    @example("..", "/srv/data")
    @example("\uff0e\uff0e/x", "/srv/data")
    def test_no_accepted_id_resolves_outside_its_root(self, value, root):
        """posixpath.normpath(root + '/' + id) of an accepted id stays under root."""
        accepted = _accepted_id(value)
        if accepted is None:
            return
        resolved = posixpath.normpath(root + "/" + accepted)
        assert resolved.startswith(root + "/")
        assert resolved == root + "/" + accepted

    @given(strategies.resource_ids())
    def test_no_accepted_segment_trims_to_a_dot_segment(self, value):
        """Trimming trailing dots and spaces, as Windows does, leaves a real name."""
        accepted = _accepted_id(value)
        if accepted is None:
            return
        for segment in accepted.split("/"):
            assert segment.rstrip(". ") not in {"", ".", ".."}

    @given(st.text(max_size=30))
    def test_any_text_is_either_an_id_or_an_invalid_resource_id(self, value):
        """No input makes it fail with anything but InvalidResourceId."""
        assert _accepted_id(value) in {None, value}


class TestResourceIdFromTarget:
    @pytest.mark.parametrize(
        ("raw", "decoded"),
        [
            ("dirOne/dirTwo/resourceName", "dirOne/dirTwo/resourceName"),
            ("caf%C3%A9.csv", "café.csv"),
            ("a%20b/c", "a b/c"),
        ],
    )
    def test_decodes_each_segment(self, raw, decoded):
        """Each segment is percent-decoded on its own."""
        assert resource_id_from_target(raw) == decoded

    @pytest.mark.parametrize(
        "raw",
        [
            "a%2Fb",
            "a%2fb",
            "%2e%2e/x",
            "x/%2E",
            "a%5Cb",
            "a%00b",
            "a%25b",
            "%C0%AE%C0%AE/x",
            "%EF%BC%8E%EF%BC%8E/x",
            "a;b",
            "a//b",
            "/a",
            "%ff",
            "a%zz",
        ],
    )
    def test_refuses_encoded_escapes(self, raw):
        """An encoded '/' never makes a directory, and decoded ids obey the rules."""
        with pytest.raises(InvalidResourceId):
            resource_id_from_target(raw)

    @given(strategies.raw_resource_targets(), st.sampled_from(["/srv/data", "/r"]))
    def test_never_yields_an_id_that_escapes(self, raw, root):
        """A decoded id keeps its segment count and stays under any root."""
        try:
            decoded = resource_id_from_target(raw)
        except InvalidResourceId:
            return
        assert decoded.count("/") == raw.count("/")
        resolved = posixpath.normpath(root + "/" + decoded)
        assert resolved == root + "/" + decoded


class TestLocation:
    def test_folder_and_uri(self):
        """A path ending in '/' (or empty) is a folder; uri writes it back."""
        folder = Location("filemanager", "P", "inputs/")
        assert folder.is_folder
        assert Location("s3", "bucket", "").is_folder
        assert not Location("s3", "bucket", "a.csv").is_folder
        assert folder.uri == "filemanager://P/inputs/"

    def test_join_places_a_file_inside_the_folder(self):
        """Joining an id onto a folder yields the file's location inside it."""
        joined = Location("s3", "bucket", "in/").join("d/a.csv")
        assert joined == Location("s3", "bucket", "in/d/a.csv")

    def test_join_refuses_an_unsafe_id(self):
        """Join checks the id it is given."""
        with pytest.raises(InvalidResourceId):
            Location("s3", "bucket", "in/").join("../a.csv")

    @given(strategies.resource_ids(), st.sampled_from(["", "in/", "a/b/"]))
    def test_join_of_an_accepted_id_stays_in_the_folder(self, value, folder):
        """Location.join of an accepted id resolves under the folder."""
        accepted = _accepted_id(value)
        if accepted is None:
            return
        path = Location("filemanager", "P", folder).join(accepted).path
        root = "/filemanager/" + folder.rstrip("/")
        assert posixpath.normpath("/filemanager/" + path).startswith(
            root.rstrip("/") + "/"
        )

    def test_join_never_yields_a_sibling_of_a_non_folder_path(self):
        """Joining onto a path without a trailing '/' never lands beside it."""
        try:
            joined = Location("filemanager", "P", "inputs").join("a.csv")
        except InvalidData:
            return
        assert joined.path == "inputs/a.csv"


class TestParseLocation:
    @pytest.mark.parametrize(
        ("uri", "location"),
        [
            (
                "filemanager://P/inputs/x.csv",
                Location("filemanager", "P", "inputs/x.csv"),
            ),
            ("S3://bucket/key", Location("s3", "bucket", "key")),
            ("s3://bucket/in/", Location("s3", "bucket", "in/")),
            ("s3://bucket", Location("s3", "bucket", "")),
        ],
    )
    def test_parses_scheme_authority_and_path(self, uri, location):
        """A location URI splits into a lower-case scheme, authority and path."""
        assert parse_location(uri) == location

    @pytest.mark.parametrize(
        "uri",
        [
            "inputs/x.csv",
            "file:///tmp/x",
            "s3://bucket/x?versionId=1",
            "s3://bucket/x#frag",
            "s3://user:pw@bucket/x",
            "s3://bucket:9000/x",
            "s3://bucket/../x",
            "s3://bucket//x",
            "s3://bucket/a\\b",
            "s3://bucket/in//",
        ],
    )
    def test_refuses_unsafe_locations(self, uri):
        """No scheme or authority, credentials, query, port or unsafe path is 400."""
        with pytest.raises(InvalidData):
            parse_location(uri)


class TestAdminInputs:
    """Values an admin sends are checked before they are stored."""

    @pytest.mark.parametrize("value", [1, 7, 2**31 - 1])
    def test_storable_lineage_versions_pass(self, value):
        """Versions from 1 to 2**31 - 1 are kept."""
        assert check_lineage_version(value) == value

    @pytest.mark.parametrize("value", [0, -1, 2**31, 2**64, True])
    def test_other_lineage_versions_are_refused(self, value):
        """Zero, negatives, what a 32-bit column cannot hold, and booleans fail."""
        with pytest.raises(InvalidData):
            check_lineage_version(value)

    @pytest.mark.parametrize(
        "url",
        [
            "http://[",
            "ftp://host/x",
            "http:///x",
            "http://u:p@host",
            "http://h/?q=1",
            "http://h:99999",
            "javascript:alert(1)",
            "http://127.0.0.1:19081/a b",
            "http://h/tab\there",
            "http://h/\u00e9t\u00e9",
            "http://h/x\r\nX-Injected: 1",
        ],
    )
    def test_unusable_service_urls_are_refused(self, url):
        """Only plain http(s) URLs with a host are service URLs."""
        with pytest.raises(InvalidData):
            check_service_url(url)

    def test_a_location_is_served_only_by_an_installed_storage(self):
        """A scheme no storage serves is refused, naming the ones served."""
        assert check_served("FileManager://p1/x", {"filemanager"}) == (
            "filemanager://p1/x"
        )
        with pytest.raises(InvalidData, match="served: filemanager://, s3://"):
            check_served("foo://x/w", {"s3", "filemanager"})

    def test_grant_locations_come_back_canonical_in_order(self):
        """Each location is checked and canonical; the order is kept."""
        assert check_grant_locations(
            "dir/x", ["s3://b/x", "FileManager://p1/x"], {"s3", "filemanager"}
        ) == ("s3://b/x", "filemanager://p1/x")

    @pytest.mark.parametrize(
        ("resource", "uris", "said"),
        [
            ("x", [], "at least one location"),
            ("x", ["filemanager://p1/x", "FILEMANAGER://p1/x"], "twice"),
            ("dir/", ["filemanager://p1/dir/", "filemanager://p1/x"], "folder"),
            ("x", ["foo://x/w"], "no storage serves"),
        ],
        ids=["none", "twice", "file-for-prefix", "unserved"],
    )
    def test_unusable_grant_locations_are_refused(self, resource, uris, said):
        """No location, one named twice, a file for a prefix, or none served: 400."""
        with pytest.raises(InvalidData, match=said):
            check_grant_locations(resource, uris, {"filemanager"})

    def test_a_service_url_loses_its_trailing_slash(self):
        """The base URL is kept without a trailing slash."""
        assert check_service_url("https://svc.internal:8443/base/") == (
            "https://svc.internal:8443/base"
        )

    def test_key_details_within_their_limits_pass(self):
        """Unicode text up to each limit passes; a business case may have lines."""
        request = KeyRequest(
            "al\u00efce@example.org",
            "bob",
            ("app-1",) * 64,
            "C-9",
            True,
            "Nightly exports\r\nfor the \u65e5\u672c team.\t" + "x" * 3900,
        )
        check_key_details("n" * MAX_LABEL, request)

    @pytest.mark.parametrize(
        ("field", "value", "said"),
        [
            ("label", "n" * (MAX_LABEL + 1), "longer than 200"),
            ("label", "red\x1b[31m", "control or invisible characters"),
            ("label", "evil\u202etxt.exe", "control or invisible characters"),
            ("label", "half \ud800 pair", "not valid Unicode"),
            ("requestor", "a\nb", "control or invisible characters"),
            ("business_case", "x" * (MAX_BUSINESS_CASE + 1), "longer than 4000"),
            ("business_case", "nul \x00 inside", "control or invisible characters"),
            ("app_ids", ("a",) * 65, "at most 64 app ids"),
            ("app_ids", ("ok", "bad\x07"), "an app id must be 1-128 letters"),
            ("app_ids", ("",), "an app id must be 1-128 letters"),
            ("label", "zero\u200bwidth", "invisible characters"),
            ("label", "mark\u200fhere", "invisible characters"),
            ("label", "tag\U000e0041", "invisible characters"),
            ("requestor", "line\u2028break", "invisible characters"),
            ("business_case", "para\u2029graph", "invisible characters"),
        ],
    )
    def test_key_details_out_of_bounds_are_refused(self, field, value, said):
        """Overlong text, control characters, lone surrogates, too many ids: 400."""
        fields = {"label": "ok", "requestor": "", "business_case": "", "app_ids": ()}
        fields[field] = value
        request = KeyRequest(
            fields["requestor"],
            "",
            fields["app_ids"],
            "",
            False,
            fields["business_case"],
        )
        with pytest.raises(InvalidData, match=said):
            check_key_details(fields["label"], request)

    def test_text_names_what_it_checked(self):
        """The message says which field failed."""
        with pytest.raises(InvalidData, match=r"^the case code is longer than 3"):
            check_text("abcd", "the case code", 3)

    @pytest.mark.parametrize("value", [-1.0, 1e300, float("inf"), float("nan")])
    def test_times_outside_1970_to_9998_are_refused(self, value):
        """Times every presentation can show are the only ones stored."""
        with pytest.raises(InvalidData):
            check_time(value)


class TestMethods:
    """Permission methods are HTTP tokens."""

    def test_methods_are_upper_cased_tokens(self):
        """Tokens pass, upper-cased."""
        assert check_methods(["post", "PURGE"]) == frozenset({"POST", "PURGE"})

    @pytest.mark.parametrize("method", ["", "g e t", "GET\r\n", "a" * 33])
    def test_other_methods_are_refused(self, method):
        """Empty, spaced or control-laden methods are refused."""
        with pytest.raises(InvalidData):
            check_methods([method])
