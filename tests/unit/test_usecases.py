"""Authenticating keys, authorising calls and publishing (dais_core.usecases)."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from collections.abc import Iterator

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dais_core.errors import (
    CorruptData,
    DaisError,
    Forbidden,
    InvalidData,
    LocationConflict,
    NotFound,
    PublishFailed,
    TooLarge,
    Unauthenticated,
    UnsupportedType,
    status_for,
)
from dais_core.gateway import GatewayCall
from dais_core.keys import new_key
from dais_core.policies import KeyedLocks, map_resource
from dais_core.rules import parse_location
from dais_core.testing import MemoryKeyStore, MemoryRegistry, MemoryStorage
from dais_core.usecases import authenticate, authorise_call, explain, publish
from dais_core.values import (
    ApiKey,
    Credential,
    DataType,
    Grant,
    Permission,
    ServiceEndpoint,
)
from tests import strategies

NOW = 1_000_000.0
DIGEST_OF_EMPTY = hashlib.sha256(b"").hexdigest()


def _random(seed: int):
    """Return a deterministic random_bytes: the same seed gives the same key id."""

    def random_bytes(count: int) -> bytes:
        return bytes((seed + i) % 248 for i in range(count))

    return random_bytes


def _store_with(**key_fields):
    made = new_key(_random(1))
    key = ApiKey(made.id, made.secret_hash, "p1", **key_fields)
    return MemoryKeyStore(Credential(key)), made


class TestAuthenticate:
    def test_a_valid_bearer_key_gives_its_credential(self):
        """The right token returns the stored key with its permissions and grants."""
        store, made = _store_with(expires=NOW + 60)
        credential = authenticate(store, f"Bearer {made.token}", NOW)
        assert credential.key.id == made.id

    @pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
    def test_the_scheme_is_case_insensitive(self, scheme):
        """'Bearer' is matched without regard to case."""
        store, made = _store_with()
        assert authenticate(store, f"{scheme} {made.token}", NOW).key.id == made.id

    @pytest.mark.parametrize("header", [None, ""])
    def test_a_missing_header_is_unauthenticated(self, header):
        """No Authorization header is 401 and says what is expected."""
        store, _ = _store_with()
        with pytest.raises(Unauthenticated, match="Bearer") as caught:
            authenticate(store, header, NOW)
        assert status_for(caught.value) == 401

    @pytest.mark.parametrize(
        "header", ["Basic dXNlcjpwYXNz", "Token abc", "Bearer", "Bearer   ", "dais_x"]
    )
    def test_a_header_that_is_not_bearer_is_unauthenticated(self, header):
        """Other schemes and an empty bearer are 401."""
        store, _ = _store_with()
        with pytest.raises(Unauthenticated, match="must be 'Bearer"):
            authenticate(store, header, NOW)

    def test_a_malformed_token_is_unauthenticated(self):
        """A token that is not of the dais form is 401 without a store lookup."""
        store, made = _store_with()
        # A different last character breaks the checksum (a key may end in "x").
        garbled = made.token[:-1] + ("y" if made.token.endswith("x") else "x")
        with pytest.raises(Unauthenticated, match="malformed"):
            authenticate(store, f"Bearer {garbled}", NOW)

    def test_an_unknown_key_is_unauthenticated(self):
        """A well-formed token of a key the store lacks is 401."""
        store, _ = _store_with()
        stranger = new_key(_random(99))
        with pytest.raises(Unauthenticated, match="not known"):
            authenticate(store, f"Bearer {stranger.token}", NOW)

    def test_a_wrong_secret_is_unauthenticated_like_an_unknown_key(self):
        """The right key id with another secret is refused as an unknown key."""
        store, made = _store_with()
        forged = new_key(lambda n: _random(1)(n) if n == 8 else bytes([5]) * n)
        assert forged.id == made.id
        assert forged.token != made.token
        with pytest.raises(Unauthenticated, match="not known"):
            authenticate(store, f"Bearer {forged.token}", NOW)

    @pytest.mark.parametrize("revoked", [NOW - 1, NOW])
    def test_a_revoked_key_is_unauthenticated(self, revoked):
        """A key revoked at or before now is 401."""
        store, made = _store_with(revoked=revoked)
        with pytest.raises(Unauthenticated, match="revoked"):
            authenticate(store, f"Bearer {made.token}", NOW)

    @pytest.mark.parametrize("expires", [NOW - 1, NOW])
    def test_an_expired_key_is_unauthenticated(self, expires):
        """A key whose expiry is now or past is 401."""
        store, made = _store_with(expires=expires)
        with pytest.raises(Unauthenticated, match="expired"):
            authenticate(store, f"Bearer {made.token}", NOW)

    def test_revocation_is_only_told_to_the_holder_of_the_secret(self):
        """A wrong secret for a revoked key is 'not known', not 'revoked'."""
        store, _ = _store_with(revoked=NOW - 1)
        forged = new_key(lambda n: _random(1)(n) if n == 8 else bytes([5]) * n)
        with pytest.raises(Unauthenticated, match="not known"):
            authenticate(store, f"Bearer {forged.token}", NOW)

    def test_no_refusal_echoes_the_token(self):
        """Error messages and bodies never carry the presented key material."""
        store, made = _store_with(revoked=NOW - 1)
        for header in [f"Bearer {made.token}", f"Bearer {made.token}x", made.token]:
            with pytest.raises(Unauthenticated) as caught:
                authenticate(store, header, NOW)
            assert made.token[5:-6] not in str(caught.value.body())


REGISTRY = MemoryRegistry(
    ServiceEndpoint("p1", 1, "svc", "http://svc-1:80"),
    ServiceEndpoint("p1", 2, "svc", "http://svc-2:80/"),
    ServiceEndpoint("p1", 3, "other", "http://other-3:80"),
)
CREDENTIAL = Credential(
    ApiKey("ab" * 8, "hash", "p1"),
    permissions=(
        Permission("p1", "svc", "/api/webhook"),
        Permission("p2", "svc", "/"),
        Permission("p1", "other", "/api/admin", frozenset({"POST"})),
    ),
)
GATEWAY = "/project-gateway/webhooks/"


class TestAuthoriseCall:
    REGISTRY = REGISTRY
    CREDENTIAL = CREDENTIAL

    def test_a_permitted_call_resolves_to_its_upstream_url(self):
        """A covered call gets the endpoint, the permission and the full URL."""
        call = GatewayCall("p1", None, "svc", "/api/webhook/run")
        route = authorise_call(self.CREDENTIAL, call, "POST", "a=1", self.REGISTRY)
        assert route.endpoint.lineage_version == 2
        assert route.permission == self.CREDENTIAL.permissions[0]
        assert route.url == "http://svc-2:80/api/webhook/run?a=1"

    def test_an_uncovered_route_is_forbidden(self):
        """A route outside every permission is 403."""
        call = GatewayCall("p1", 1, "svc", "/api/webhookx")
        with pytest.raises(Forbidden):
            authorise_call(self.CREDENTIAL, call, "GET", "", self.REGISTRY)

    def test_an_unreachable_project_is_forbidden_before_it_is_looked_up(self):
        """A key learns nothing about projects it may not reach: 403, not 404."""
        call = GatewayCall("p404", 1, "svc", "/api/webhook")
        with pytest.raises(Forbidden):
            authorise_call(self.CREDENTIAL, call, "GET", "", self.REGISTRY)

    @pytest.mark.parametrize(
        ("project", "version", "message"),
        [("p2", None, "no project"), ("p1", 9, "no lineage version 9")],
    )
    def test_a_permitted_call_to_nothing_is_not_found(self, project, version, message):
        """A permitted project, version or service that does not exist is 404."""
        call = GatewayCall(project, version, "svc", "/api/webhook")
        with pytest.raises(NotFound, match=message):
            authorise_call(self.CREDENTIAL, call, "GET", "", self.REGISTRY)


class TestExplain:
    def test_an_allowed_call_names_its_permission_and_upstream(self):
        """A call that would pass says which permission lets it and where it goes."""
        path = GATEWAY + "p1/lineage-version/latest/svc/api/webhook/%7Erun"
        explanation = explain(CREDENTIAL, "POST", path + "?a=1", REGISTRY, NOW)
        assert (explanation.allowed, explanation.status) == (True, 200)
        assert explanation.route == "/api/webhook/~run"
        assert explanation.lineage_version == 2
        assert explanation.permission == CREDENTIAL.permissions[0]
        assert explanation.upstream == "http://svc-2:80/api/webhook/~run?a=1"
        assert explanation.considered[0].endswith(": matches")

    @pytest.mark.parametrize("method", ["", "GE T", "POST\r\nX: 1", "post", "Get"])
    def test_a_method_no_call_could_have_is_refused(self, method):
        """Explaining a call the gateway could never receive is a 400, not a yes."""
        path = GATEWAY + "p1/lineage-version/latest/svc/api/webhook"
        with pytest.raises(InvalidData, match="is not an HTTP method"):
            explain(CREDENTIAL, method, path, REGISTRY, NOW)

    @pytest.mark.parametrize(
        ("change", "said"),
        [({"revoked": NOW}, "revoked"), ({"expires": NOW - 1}, "expired")],
        ids=["revoked", "expired"],
    )
    def test_a_key_that_no_longer_works_is_explained_as_401(self, change, said):
        """A revoked or expired key's call would be 401, whatever it could reach."""
        key = attrs.evolve(CREDENTIAL.key, **change)
        credential = attrs.evolve(CREDENTIAL, key=key)
        path = GATEWAY + "p1/lineage-version/latest/svc/api/webhook/%7Erun"
        explanation = explain(credential, "POST", path, REGISTRY, NOW)
        assert (explanation.allowed, explanation.status) == (False, 401)
        assert said in explanation.reason

    @pytest.mark.parametrize(
        ("target", "status"),
        [
            (GATEWAY + "p1/lineage-version/latest/svc/api/webhook#f", 400),
            (GATEWAY + "p1/lineage-version/latest/svc/api/webhook?a=1#f", 400),
            ("ftp://gw" + GATEWAY + "p1/lineage-version/latest/svc/api/webhook", 400),
            (
                "http://u@gw" + GATEWAY + "p1/lineage-version/latest/svc/api/webhook",
                400,
            ),
            ("http://" + GATEWAY + "p1/lineage-version/latest/svc/api/webhook", 400),
            ("//gw" + GATEWAY + "p1/lineage-version/latest/svc/api/webhook", 404),
            ("/other", 404),
            ("/project-gateway/webhooksx/p1", 404),
            ("*", 404),
            ("project-gateway/webhooks/p1/lineage-version/1/svc/x", 404),
            ("/project-gateway/webhooks", 400),
            ("/project-gateway/webhook%73/p1/lineage-version/1/svc/x", 400),
            ("/project-gateway%2Fwebhooks/p1/lineage-version/1/svc/x", 400),
            ("/" + GATEWAY + "p1/lineage-version/1/svc/x", 400),
        ],
        ids=[
            "fragment",
            "query-fragment",
            "ftp",
            "userinfo",
            "no-host",
            "two-slashes",
            "elsewhere",
            "look-alike",
            "asterisk",
            "no-leading-slash",
            "no-slash",
            "encoded-letter",
            "encoded-slash",
            "double-slash",
        ],
    )
    def test_a_target_the_gateway_refuses_is_explained_as_refused(self, target, status):
        """A target refused before any key is looked at gets that status."""
        explanation = explain(CREDENTIAL, "POST", target, REGISTRY, NOW)
        assert (explanation.allowed, explanation.status) == (False, status)

    def test_an_absolute_target_is_read_as_the_gateway_reads_it(self):
        """``http(s)://host[:port]`` before the path changes nothing else."""
        target = (
            "HTTPS://gw:8443" + GATEWAY + "p1/lineage-version/latest/svc/api/webhook?a"
        )
        explanation = explain(CREDENTIAL, "POST", target, REGISTRY, NOW)
        assert (explanation.allowed, explanation.status) == (True, 200)
        assert explanation.upstream == "http://svc-2:80/api/webhook?a"

    def test_a_bad_path_is_explained_as_its_400(self):
        """A path the gateway would refuse gets that status and message."""
        path = GATEWAY + "p1/lineage-version/0/svc/x"
        explanation = explain(CREDENTIAL, "GET", path + "?", REGISTRY, NOW)
        assert (explanation.allowed, explanation.status) == (False, 400)
        assert "lineageVersion" in explanation.reason

    def test_a_forbidden_call_says_why_each_permission_did_not_match(self):
        """Each permission is listed with the reason it does not cover the call."""
        path = GATEWAY + "p1/lineage-version/3/other/api/admin/x"
        explanation = explain(CREDENTIAL, "GET", path + "?", REGISTRY, NOW)
        assert (explanation.allowed, explanation.status) == (False, 403)
        assert explanation.route == "/api/admin/x"
        assert [c.rsplit(": ", 1)[1] for c in explanation.considered] == [
            "another project or service",
            "another project or service",
            "method GET not allowed",
        ]

    def test_a_route_outside_the_prefix_is_named_as_such(self):
        """A permission for the right service but another route says so."""
        path = GATEWAY + "p1/lineage-version/1/svc/api/webhookx"
        explanation = explain(CREDENTIAL, "GET", path + "?", REGISTRY, NOW)
        assert explanation.status == 403
        assert explanation.considered[0].endswith("route not at or under the prefix")

    def test_a_permitted_call_to_nothing_is_explained_as_404(self):
        """A permitted project without the service or version is 404."""
        path = GATEWAY + "p1/lineage-version/9/svc/api/webhook"
        explanation = explain(CREDENTIAL, "GET", path + "?", REGISTRY, NOW)
        assert (explanation.allowed, explanation.status) == (False, 404)
        assert "no lineage version 9" in explanation.reason


FM = "filemanager://P/inputs/"
S3 = "s3://bucket/exports/"
MORE = "s3://bucket/more/"


def _sqlite_bytes() -> bytes:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    data = conn.serialize()
    conn.close()
    return data


SQLITE_BYTES = _sqlite_bytes()


class RefusingInspector:
    """An inspector that records what it saw and finds the file damaged."""

    def __init__(self) -> None:
        self.seen: list[tuple[DataType, list[str]]] = []

    def scratch_for(self, data_type, staged) -> None:
        return None

    def inspect(self, data_type, staged) -> None:
        self.seen.append((data_type, [copy.location.uri for copy in staged]))
        raise CorruptData("the SQLite integrity check failed")


class ScratchInspector:
    """An inspector that asks for a copy of its own and reads it."""

    def __init__(self, verdict: DaisError | None = None) -> None:
        self.scratch = MemoryStorage()
        self.verdict = verdict
        self.seen: list[bytes] = []

    def scratch_for(self, data_type, staged):
        return self.scratch.stage(parse_location("scratch://x/copy"))

    def inspect(self, data_type, staged) -> None:
        self.seen = [b"".join(copy.parts) for copy in staged]
        if self.verdict is not None:
            raise self.verdict


def _target(
    data_type: DataType = DataType.BINARY, locations=(FM, S3), resource="a.csv"
):
    return map_resource([Grant(resource, tuple(locations), data_type)], resource)


def _storages() -> dict[str, MemoryStorage]:
    return {"filemanager": MemoryStorage(), "s3": MemoryStorage()}


def _seed(storages: dict[str, MemoryStorage], content: bytes) -> None:
    storages["filemanager"].files[FM + "a.csv"] = content
    storages["s3"].files[S3 + "a.csv"] = content


def _files(storages: dict[str, MemoryStorage]) -> dict[str, bytes]:
    return {uri: data for s in storages.values() for uri, data in s.files.items()}


def _nothing_staged(storages: dict[str, MemoryStorage]) -> bool:
    return not _staged(storages)


def _staged(storages: dict[str, MemoryStorage]) -> set[str]:
    return {copy.location.uri for s in storages.values() for copy in s.staged}


class TestPublish:
    def test_writes_the_file_to_every_location(self):
        """Every mapped location gets the whole file; the result describes it."""
        storages = _storages()
        result = publish(
            "a.csv", _target(), [b"id,x\n", b"1,2\n"], storages, max_size=100
        )
        assert _files(storages) == {
            FM + "a.csv": b"id,x\n1,2\n",
            S3 + "a.csv": b"id,x\n1,2\n",
        }
        assert result.resource == "a.csv"
        assert result.size == 9
        assert result.sha256 == hashlib.sha256(b"id,x\n1,2\n").hexdigest()
        assert result.locations == (FM + "a.csv", S3 + "a.csv")
        assert _nothing_staged(storages)

    def test_overwrites_what_was_there(self):
        """A location that held the resource holds the new file afterwards."""
        storages = _storages()
        _seed(storages, b"old")
        publish("a.csv", _target(), [b"new"], storages, max_size=100)
        assert set(_files(storages).values()) == {b"new"}

    def test_a_zero_byte_file_is_published(self):
        """An empty file is valid and is written as empty everywhere."""
        storages = _storages()
        _seed(storages, b"old")
        result = publish("a.csv", _target(), [], storages, max_size=100)
        assert (result.size, result.sha256) == (0, DIGEST_OF_EMPTY)
        assert set(_files(storages).values()) == {b""}

    @given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=5))
    def test_every_location_holds_exactly_the_bytes_sent(self, data, cuts):
        """However the body is chunked, each location gets it byte for byte."""
        storages = _storages()
        chunks = strategies.chunked(data, cuts)
        result = publish("a.csv", _target(), chunks, storages, max_size=300)
        assert set(_files(storages).values()) == {data}
        assert result.sha256 == hashlib.sha256(data).hexdigest()

    @pytest.mark.parametrize("failing", [FM + "a.csv", S3 + "a.csv"])
    def test_a_failing_write_aborts_every_copy(self, failing):
        """A write error anywhere leaves every location with its earlier file."""
        storages = _storages()
        _seed(storages, b"old")
        for storage in storages.values():
            storage.fail_on_write.add(failing)

        with pytest.raises(PublishFailed) as caught:
            publish("a.csv", _target(), [b"new", b"er"], storages, max_size=100)

        assert set(_files(storages).values()) == {b"old"}
        assert _nothing_staged(storages)
        assert status_for(caught.value) == 500
        outcomes = {
            o["location"]: o["outcome"] for o in caught.value.detail["locations"]
        }
        assert outcomes == {
            uri: "failed" if uri == failing else "aborted"
            for uri in [FM + "a.csv", S3 + "a.csv"]
        }

    def test_a_name_clashing_at_one_location_is_a_conflict(self):
        """A clash of names at one location is 409 and stages nothing anywhere."""
        storages = _storages()
        _seed(storages, b"old")
        storages["s3"].clash_on_stage.add(S3 + "a.csv")

        with pytest.raises(LocationConflict) as caught:
            publish("a.csv", _target(), [b"new"], storages, max_size=100)

        assert status_for(caught.value) == 409
        assert caught.value.message.startswith("a location holds something else")
        assert set(_files(storages).values()) == {b"old"}
        assert _nothing_staged(storages)
        assert [o["outcome"] for o in caught.value.detail["locations"]] == [
            "aborted",
            "failed",
        ]

    def test_a_failing_first_commit_aborts_every_copy(self):
        """A commit error on the first location leaves every earlier file in place."""
        storages = _storages()
        _seed(storages, b"old")
        storages["filemanager"].fail_on_commit.add(FM + "a.csv")

        with pytest.raises(PublishFailed) as caught:
            publish("a.csv", _target(), [b"new"], storages, max_size=100)

        assert set(_files(storages).values()) == {b"old"}
        assert _nothing_staged(storages)
        assert [o["outcome"] for o in caught.value.detail["locations"]] == [
            "failed",
            "aborted",
        ]
        assert caught.value.detail["locations"][0]["reason"] == "commit refused"

    def test_a_failing_later_commit_rolls_back_the_committed_copies(self):
        """A commit error on a later location puts back every earlier file."""
        storages = _storages()
        _seed(storages, b"old")
        storages["s3"].files[MORE + "a.csv"] = b"old"
        storages["s3"].fail_on_commit.add(S3 + "a.csv")
        target = _target(locations=(FM, S3, MORE))

        with pytest.raises(PublishFailed) as caught:
            publish("a.csv", target, [b"new"], storages, max_size=100)

        assert set(_files(storages).values()) == {b"old"}
        assert _nothing_staged(storages)
        assert [o["outcome"] for o in caught.value.detail["locations"]] == [
            "rolled_back",
            "failed",
            "aborted",
        ]

    def test_a_rolled_back_new_resource_is_gone_again(self):
        """Rolling back a location that had no file leaves it without one."""
        storages = _storages()
        storages["s3"].fail_on_commit.add(MORE + "a.csv")

        with pytest.raises(PublishFailed):
            publish(
                "a.csv",
                _target(locations=(FM, S3, MORE)),
                [b"new"],
                storages,
                max_size=9,
            )

        assert _files(storages) == {}
        assert _nothing_staged(storages)

    @pytest.mark.parametrize("failing", [FM + "a.csv", S3 + "a.csv"])
    def test_a_failing_commit_leaves_no_staged_copy(self, failing):
        """After a commit error no staged copy is left, the failed one included."""
        storages = _storages()
        for storage in storages.values():
            storage.fail_on_commit.add(failing)
        with pytest.raises(PublishFailed):
            publish("a.csv", _target(), [b"new"], storages, max_size=100)
        assert _nothing_staged(storages)

    def test_an_inspector_sees_the_staged_copies_and_can_refuse_them(self):
        """A deeper check runs on the staged copies; its refusal changes nothing."""
        storages = _storages()
        _seed(storages, b"old")
        inspector = RefusingInspector()

        with pytest.raises(CorruptData):
            publish(
                "a.csv",
                _target(DataType.SQLITE),
                [SQLITE_BYTES],
                storages,
                max_size=len(SQLITE_BYTES),
                inspector=inspector,
            )

        assert inspector.seen == [(DataType.SQLITE, [FM + "a.csv", S3 + "a.csv"])]
        assert set(_files(storages).values()) == {b"old"}
        assert _nothing_staged(storages)

    @pytest.mark.parametrize(
        "verdict",
        [None, CorruptData("damaged")],
        ids=["sound", "damaged"],
    )
    def test_an_inspectors_own_copy_gets_the_file_and_is_only_dropped(self, verdict):
        """The scratch copy holds the whole file when inspected, then goes."""
        storages = _storages()
        inspector = ScratchInspector(verdict)
        context = pytest.raises(CorruptData) if verdict else contextlib.nullcontext()

        with context:
            publish(
                "a.csv",
                _target(),
                [b"ne", b"w"],
                storages,
                max_size=9,
                inspector=inspector,
            )

        assert inspector.seen == [b"new", b"new", b"new"]
        assert not inspector.scratch.staged
        assert not inspector.scratch.files
        expected = {b"new"} if verdict is None else set()
        assert set(_files(storages).values()) == expected

    def test_a_scratch_copy_that_fails_to_write_fails_the_publish(self):
        """A failing scratch copy is a 500 with every location aborted, unchanged."""
        storages = _storages()
        _seed(storages, b"old")
        inspector = ScratchInspector()
        inspector.scratch.fail_on_write.add("scratch://x/copy")

        with pytest.raises(PublishFailed) as caught:
            publish(
                "a.csv", _target(), [b"new"], storages, max_size=9, inspector=inspector
            )

        assert caught.value.message.startswith("the copy kept to check the file")
        assert [o["outcome"] for o in caught.value.detail["locations"]] == [
            "aborted",
            "aborted",
        ]
        assert set(_files(storages).values()) == {b"old"}
        assert _nothing_staged(storages)
        assert not inspector.scratch.staged

    def test_commits_under_the_locks_of_every_location(self):
        """With locks given, the publish commits and leaves every lock free again."""
        storages = _storages()
        locks = KeyedLocks()
        publish("a.csv", _target(), [b"new"], storages, max_size=9, locks=locks)
        with locks.hold([FM + "a.csv", S3 + "a.csv"]):
            pass
        assert set(_files(storages).values()) == {b"new"}

    def test_a_location_without_storage_fails_before_anything_is_written(self):
        """A scheme with no storage is a publish error and nothing is staged."""
        storages = {"filemanager": MemoryStorage()}
        with pytest.raises(PublishFailed) as caught:
            publish("a.csv", _target(), [b"new"], storages, max_size=100)
        assert _nothing_staged(storages)
        assert not _files(storages)
        outcomes = [o["outcome"] for o in caught.value.detail["locations"]]
        assert outcomes == ["aborted", "failed"]

    def test_a_file_over_the_limit_is_too_large_and_changes_nothing(self):
        """One byte over max_size is 413 and every location keeps its file."""
        storages = _storages()
        _seed(storages, b"old")
        with pytest.raises(TooLarge) as caught:
            publish("a.csv", _target(), [b"12345", b"6"], storages, max_size=5)
        assert status_for(caught.value) == 413
        assert set(_files(storages).values()) == {b"old"}
        assert _nothing_staged(storages)

    def test_a_file_of_exactly_the_limit_is_published(self):
        """max_size itself is allowed."""
        storages = _storages()
        publish("a.csv", _target(), [b"123", b"45"], storages, max_size=5)
        assert set(_files(storages).values()) == {b"12345"}

    def test_a_matching_digest_is_accepted(self):
        """A client-announced SHA-256 that matches lets the publish through."""
        storages = _storages()
        digest = hashlib.sha256(b"new").hexdigest()
        result = publish(
            "a.csv", _target(), [b"new"], storages, max_size=10, expected_sha256=digest
        )
        assert result.sha256 == digest

    def test_a_digest_mismatch_is_invalid_and_changes_nothing(self):
        """A wrong announced SHA-256 is 400 with the real digest; nothing changes."""
        storages = _storages()
        _seed(storages, b"old")
        with pytest.raises(InvalidData) as caught:
            publish(
                "a.csv",
                _target(),
                [b"new"],
                storages,
                max_size=10,
                expected_sha256=DIGEST_OF_EMPTY,
            )
        assert caught.value.detail["sha256"] == hashlib.sha256(b"new").hexdigest()
        assert set(_files(storages).values()) == {b"old"}
        assert _nothing_staged(storages)

    @pytest.mark.parametrize(
        ("data_type", "data", "error"),
        [
            (DataType.CSV, b'a,"open\n', CorruptData),
            (DataType.CSV, b"\xff\xfe", UnsupportedType),
            (DataType.SQLITE, b"id,x\n1,2\n", UnsupportedType),
        ],
    )
    def test_a_file_not_of_its_declared_type_changes_nothing(
        self, data_type, data, error
    ):
        """A declared type that does not check out aborts every copy."""
        storages = _storages()
        _seed(storages, b"old")
        with pytest.raises(error):
            publish("a.csv", _target(data_type), [data], storages, max_size=100)
        assert set(_files(storages).values()) == {b"old"}
        assert _nothing_staged(storages)

    def test_a_body_that_breaks_off_changes_nothing(self):
        """An error from the chunk source (a client gone) aborts every copy."""
        storages = _storages()
        _seed(storages, b"old")

        def chunks() -> Iterator[bytes]:
            yield b"partial"
            raise InvalidData("the multipart body ended early")

        with pytest.raises(InvalidData, match="ended early"):
            publish("a.csv", _target(), chunks(), storages, max_size=100)
        assert set(_files(storages).values()) == {b"old"}
        assert _nothing_staged(storages)


class TestPublishLocks:
    """A publish whose commit locks cannot be had changes nothing."""

    def test_unavailable_locks_abort_every_staged_copy(self):
        """The error passes through and no staged copy is left."""
        import contextlib

        from dais_core.errors import Unavailable
        from dais_core.policies import map_resource
        from dais_core.testing import MemoryStorage
        from dais_core.usecases import publish
        from dais_core.values import Grant

        class DownLocks:
            @contextlib.contextmanager
            def hold(self, names):
                raise Unavailable("the lock service is down")
                yield

        storage = MemoryStorage()
        target = map_resource([Grant("x", ("mem://a/x", "mem://b/x"))], "x")
        with pytest.raises(Unavailable):
            publish(
                "x", target, [b"data"], {"mem": storage}, max_size=10, locks=DownLocks()
            )
        assert storage.files == {}
        assert storage.staged == set()
