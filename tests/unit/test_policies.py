"""Permissions, resource mapping, endpoints and throttling (dais_core.policies)."""

from __future__ import annotations

import math
import posixpath
import threading
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dais_core.errors import (
    Busy,
    Forbidden,
    InvalidData,
    NotFound,
    Throttled,
    UnauthorisedPublish,
    status_for,
)
from dais_core.policies import (
    ConcurrencyCap,
    KeyedLocks,
    RatePolicy,
    ServerCap,
    Throttler,
    gcra,
    map_resource,
    match_permission,
    reaches,
    require_permission,
    resolve_endpoint,
)
from dais_core.rules import Location, parse_location
from dais_core.testing import FakeClock, MemoryThrottleState
from dais_core.values import (
    ApiKey,
    Credential,
    DataType,
    Grant,
    Permission,
    ServiceEndpoint,
)
from tests import strategies

WEBHOOK = Permission("p1", "svc", "/api/webhook")
POST_ONLY = Permission("p1", "svc", "/api/admin", frozenset({"POST"}))


def _endpoint(version: int, service: str, project: str = "p1") -> ServiceEndpoint:
    return ServiceEndpoint(project, version, service, f"http://{service}-{version}:80")


ENDPOINTS = [
    _endpoint(1, "alpha"),
    _endpoint(1, "beta"),
    _endpoint(2, "alpha"),
    _endpoint(3, "beta"),
]


def _throttler(
    policy: RatePolicy, clock: FakeClock, scope: str = "upload"
) -> Throttler:
    return Throttler(MemoryThrottleState(), clock, policy, scope)


def _admitted(throttler: Throttler, key_id: str = "k1") -> bool:
    try:
        throttler.check(key_id)
    except Throttled:
        return False
    return True


class TestMatchPermission:
    @pytest.mark.parametrize(
        "route", ["/api/webhook", "/api/webhook/", "/api/webhook/schedule/now"]
    )
    def test_matches_at_or_under_the_prefix(self, route):
        """A permission covers its prefix and every route below it."""
        assert match_permission([WEBHOOK], "p1", "svc", route, "GET") == WEBHOOK

    @pytest.mark.parametrize(
        ("project", "service", "route"),
        [
            ("p2", "svc", "/api/webhook"),
            ("p1", "other", "/api/webhook"),
            ("p1", "svc", "/api/webhookx"),
            ("p1", "svc", "/api"),
        ],
    )
    def test_needs_project_service_and_route_to_match(self, project, service, route):
        """Another project, another service or a sibling route is not covered."""
        assert match_permission([WEBHOOK], project, service, route, "GET") is None

    def test_an_empty_method_set_covers_every_method(self):
        """A permission without methods lets any method through."""
        for method in ["GET", "POST", "DELETE", "PATCH"]:
            assert match_permission([WEBHOOK], "p1", "svc", "/api/webhook", method)

    def test_a_method_set_restricts_the_methods(self):
        """A permission listing methods covers only those."""
        perms = [POST_ONLY]
        assert match_permission(perms, "p1", "svc", "/api/admin", "POST") == POST_ONLY
        assert match_permission(perms, "p1", "svc", "/api/admin", "GET") is None

    def test_the_first_covering_permission_wins(self):
        """With several covering permissions the first is returned."""
        broad = Permission("p1", "svc", "/")
        assert (
            match_permission([broad, WEBHOOK], "p1", "svc", "/api/webhook", "GET")
            == broad
        )


class TestRequirePermission:
    def test_returns_the_covering_permission(self):
        """A covered call gets its permission back."""
        assert (
            require_permission([WEBHOOK], "p1", "svc", "/api/webhook/x", "GET")
            == WEBHOOK
        )

    def test_an_uncovered_call_is_forbidden(self):
        """A valid key without a covering permission gets 403."""
        with pytest.raises(Forbidden) as caught:
            require_permission([WEBHOOK], "p1", "svc", "/api/webhookx", "GET")
        assert status_for(caught.value) == 403


class TestMapResource:
    def test_an_exact_grant_beats_a_prefix_grant(self):
        """A grant naming the resource wins over a prefix that also covers it."""
        grants = [
            Grant("exports/", ("s3://b/by-prefix/",)),
            Grant("exports/a.csv", ("s3://b/exact.csv",)),
        ]
        target = map_resource(grants, "exports/a.csv")
        assert target.grant == grants[1]
        assert target.locations == (Location("s3", "b", "exact.csv"),)

    def test_the_longest_prefix_wins(self):
        """Among prefix grants the most specific one is used."""
        grants = [
            Grant("exports/", ("s3://b/all/",)),
            Grant("exports/daily/", ("s3://b/daily/",)),
            Grant("exp/", ("s3://b/exp/",)),
        ]
        target = map_resource(grants, "exports/daily/2024/a.csv")
        assert target.grant == grants[1]
        assert target.locations == (Location("s3", "b", "daily/2024/a.csv"),)

    def test_an_exact_grant_with_a_folder_location_keeps_the_file_name(self):
        """An exact grant mapped to a folder puts the file in it under its name."""
        grants = [Grant("dirOne/dirTwo/report.csv", ("filemanager://P/inputs/",))]
        target = map_resource(grants, "dirOne/dirTwo/report.csv")
        assert target.locations == (Location("filemanager", "P", "inputs/report.csv"),)

    def test_a_prefix_grant_keeps_the_rest_of_the_path_in_the_folder(self):
        """A prefix grant places the part after the prefix inside each folder."""
        grants = [
            Grant(
                "exports/",
                ("filemanager://P/inputs/", "s3://bucket/"),
                DataType.CSV,
            )
        ]
        target = map_resource(grants, "exports/d/a.csv")
        assert [loc.uri for loc in target.locations] == [
            "filemanager://P/inputs/d/a.csv",
            "s3://bucket/d/a.csv",
        ]
        assert target.grant.data_type is DataType.CSV

    @pytest.mark.parametrize(
        ("resource", "grants"),
        [
            ("other.csv", [Grant("exports/a.csv", ("s3://b/a.csv",))]),
            ("exportsX/a.csv", [Grant("exports/", ("s3://b/",))]),
            ("exports/a.csv", [Grant("exports", ("s3://b/",))]),
            ("exports/a.csvx", [Grant("exports/a.csv", ("s3://b/a.csv",))]),
            ("a.csv", []),
        ],
    )
    def test_a_resource_no_grant_covers_is_an_unauthorised_publish(
        self, resource, grants
    ):
        """Publishing outside the key's grants is 401 unauthorised_publish."""
        with pytest.raises(UnauthorisedPublish) as caught:
            map_resource(grants, resource)
        assert status_for(caught.value) == 401

    @given(strategies.resource_with_grants())
    def test_picks_the_exact_grant_or_else_the_longest_covering_prefix(self, case):
        """The chosen grant is the one an exact-then-longest-prefix rule picks."""
        resource, grants = case
        exact = [g for g in grants if g.resource == resource]
        prefixes = [
            g for g in grants if g.is_prefix and resource.startswith(g.resource)
        ]
        try:
            target = map_resource(grants, resource)
        except UnauthorisedPublish:
            assert not exact
            assert not prefixes
            return
        if exact:
            assert target.grant == exact[0]
        else:
            assert len(target.grant.resource) == max(len(g.resource) for g in prefixes)

    @given(
        strategies.grants(), st.lists(st.sampled_from(["a", "b", "c.csv"]), min_size=1)
    )
    def test_every_placed_location_lies_inside_its_folder(self, grant, tail):
        """Each location a grant maps to is inside the folder the grant names."""
        resource = (
            grant.resource + "/".join(tail) if grant.is_prefix else grant.resource
        )
        target = map_resource([grant], resource)
        for uri, placed in zip(grant.locations, target.locations, strict=True):
            folder = parse_location(uri)
            resolved = posixpath.normpath("/filemanager/" + placed.path)
            assert resolved.startswith(
                posixpath.normpath("/filemanager/" + folder.path) + "/"
            )
            assert (placed.scheme, placed.authority) == (
                folder.scheme,
                folder.authority,
            )

    def test_a_prefix_grant_never_places_a_file_beside_its_location(self):
        """A prefix grant to 'inputs' places files in it (or refuses the grant)."""
        grants = [Grant("exports/", ("filemanager://P/inputs",))]
        try:
            target = map_resource(grants, "exports/a.csv")
        except InvalidData:
            return
        assert target.locations[0].uri == "filemanager://P/inputs/a.csv"


class TestResolveEndpoint:
    def test_latest_picks_the_highest_version_that_has_the_service(self):
        """'latest' skips higher versions that lack the service."""
        assert resolve_endpoint(ENDPOINTS, "p1", None, "alpha") == _endpoint(2, "alpha")
        assert resolve_endpoint(ENDPOINTS, "p1", None, "beta") == _endpoint(3, "beta")

    def test_a_version_picks_that_version(self):
        """An explicit lineage version is used as it is."""
        assert resolve_endpoint(ENDPOINTS, "p1", 1, "alpha") == _endpoint(1, "alpha")

    def test_no_endpoints_is_no_such_project(self):
        """A project with no registered endpoint is 404 naming the project."""
        with pytest.raises(NotFound, match="no project 'p9'") as caught:
            resolve_endpoint([], "p9", None, "alpha")
        assert status_for(caught.value) == 404

    def test_a_missing_version_is_no_such_version(self):
        """A lineage version the project lacks is 404 naming the version."""
        with pytest.raises(NotFound, match="no lineage version 7 in 'p1'"):
            resolve_endpoint(ENDPOINTS, "p1", 7, "alpha")

    @pytest.mark.parametrize("version", [3, None])
    def test_a_missing_service_is_no_such_service(self, version):
        """A service absent at that version (or any, for latest) is 404 naming it."""
        with pytest.raises(NotFound, match="no service 'alpha'"):
            resolve_endpoint(ENDPOINTS[2:3] + ENDPOINTS[3:], "p1", 3, "alpha")
        with pytest.raises(NotFound, match="no service 'gamma'"):
            resolve_endpoint(ENDPOINTS, "p1", version, "gamma")


class TestRatePolicy:
    def test_defaults_are_one_request_per_second_without_burst(self):
        """The default policy admits one request a second and no burst."""
        policy = RatePolicy()
        assert (policy.interval, policy.tolerance) == (1.0, 0.0)

    def test_interval_and_tolerance(self):
        """The interval is period/rate; the tolerance is burst-1 intervals."""
        policy = RatePolicy(rate=4, period=2.0, burst=3)
        assert (policy.interval, policy.tolerance) == (0.5, 1.0)

    @pytest.mark.parametrize(
        "fields",
        [
            {"rate": 0},
            {"burst": 0},
            {"period": 0.0},
            {"period": -1.0},
            {"period": float("inf")},
            {"period": float("nan")},
            {"period": 1e300},
        ],
    )
    def test_a_policy_that_admits_nothing_sane_is_refused(self, fields):
        """No rate, no burst, or a period that is not a positive number."""
        with pytest.raises(ValueError):
            RatePolicy(**fields)


class TestGcra:
    def test_a_new_key_is_admitted_with_its_burst_left(self):
        """The first request of a key is admitted and counts against its burst."""
        tat, decision = gcra(None, 100.0, RatePolicy(rate=1, period=1.0, burst=3))
        assert decision.allowed
        assert (tat, decision.remaining, decision.retry_after) == (101.0, 2, 0.0)

    def test_a_refusal_says_when_to_come_back(self):
        """A refused request gets the exact wait and leaves the state unchanged."""
        policy = RatePolicy()
        tat, _ = gcra(None, 100.0, policy)
        again, decision = gcra(tat, 100.25, policy)
        assert not decision.allowed
        assert (again, decision.remaining, decision.retry_after) == (101.0, 0, 0.75)

    def test_an_idle_key_starts_afresh(self):
        """A stored arrival time in the past counts as a new key."""
        policy = RatePolicy(burst=2)
        assert gcra(50.0, 100.0, policy) == gcra(None, 100.0, policy)


class TestThrottler:
    def test_admits_a_burst_then_refuses(self):
        """A burst of `burst` requests at one instant passes, the next is refused."""
        clock = FakeClock()
        throttler = _throttler(RatePolicy(rate=1, period=1.0, burst=3), clock)
        remaining = [throttler.check("k1").remaining for _ in range(3)]
        assert remaining == [2, 1, 0]
        with pytest.raises(Throttled) as caught:
            throttler.check("k1")
        assert caught.value.retry_after == 1.0
        assert status_for(caught.value) == 429

    def test_the_default_policy_admits_one_request_per_second(self):
        """With the defaults a second request within the second is refused."""
        clock = FakeClock()
        throttler = _throttler(RatePolicy(), clock)
        assert _admitted(throttler)
        clock.advance(0.5)
        assert not _admitted(throttler)
        clock.advance(0.5)
        assert _admitted(throttler)

    def test_keys_and_scopes_are_throttled_apart(self):
        """One key's use does not count against another key or another scope."""
        clock, state = FakeClock(), MemoryThrottleState()
        upload = Throttler(state, clock, RatePolicy(), "upload")
        gateway = Throttler(state, clock, RatePolicy(), "gateway")
        assert _admitted(upload, "k1")
        assert _admitted(upload, "k2")
        assert _admitted(gateway, "k1")
        assert not _admitted(upload, "k1")

    def test_the_bound_is_reached_so_it_is_not_loose(self):
        """A full burst then one request per interval hits burst + floor(W/I)."""
        clock = FakeClock()
        policy = RatePolicy(rate=2, period=1.0, burst=3)
        throttler = _throttler(policy, clock)
        admitted = sum(_admitted(throttler) for _ in range(3))
        for _ in range(4):
            clock.advance(policy.interval)
            admitted += _admitted(throttler)
        assert admitted == policy.burst + math.floor(
            4 * policy.interval / policy.interval
        )

    @given(st.data())
    def test_never_admits_more_than_the_policy_allows_in_any_window(self, data):
        """In any window of length W at most burst + floor(W / interval) pass."""
        # Times and intervals are whole 1/64 s ticks, so float arithmetic is
        # exact and the bound is checked to the tick, not to rounding error.
        # W runs from one admitted request to another: the tightest windows.
        policy = data.draw(strategies.dyadic_rate_policies(), label="policy")
        gaps = data.draw(strategies.request_gaps(policy), label="gaps")
        clock = FakeClock()
        throttler = _throttler(policy, clock)
        admitted = []
        for gap in gaps:
            clock.advance(gap)
            if _admitted(throttler):
                admitted.append(Fraction(clock()))

        interval = Fraction(policy.period) / policy.rate
        for first, start in enumerate(admitted):
            for last in range(first, len(admitted)):
                window = admitted[last] - start
                allowed = policy.burst + math.floor(window / interval)
                assert last - first + 1 <= allowed

    @given(st.data())
    def test_remaining_is_how_many_more_pass_at_that_instant(self, data):
        """After an admitted request, exactly `remaining` more pass at once."""
        policy = data.draw(strategies.dyadic_rate_policies(), label="policy")
        gaps = data.draw(strategies.request_gaps(policy), label="gaps")
        clock = FakeClock()
        throttler = _throttler(policy, clock)
        for gap in gaps:
            clock.advance(gap)
            _admitted(throttler)
        try:
            decision = throttler.check("k1")
        except Throttled:
            return
        more = 0
        while _admitted(throttler):
            more += 1
        assert more == decision.remaining

    def test_a_full_burst_passes_at_once_when_the_interval_is_inexact(self):
        """A burst at one instant passes even if 1/rate has no exact binary form."""
        clock = FakeClock(1_000_000.0)
        throttler = _throttler(RatePolicy(rate=3, period=1.0, burst=3), clock)
        assert sum(_admitted(throttler) for _ in range(4)) == 3

    @given(st.data())
    def test_coming_back_after_retry_after_is_admitted(self, data):
        """Whatever came before, a retry exactly retry_after later passes."""
        policy = data.draw(strategies.dyadic_rate_policies(), label="policy")
        gaps = data.draw(strategies.request_gaps(policy), label="gaps")
        clock = FakeClock()
        throttler = _throttler(policy, clock)
        for gap in gaps:
            clock.advance(gap)
            try:
                throttler.check("k1")
            except Throttled as refused:
                assert refused.retry_after > 0
                clock.advance(refused.retry_after)
                assert _admitted(throttler)


def _blocked(locks: KeyedLocks, names: list[str]) -> bool:
    """Return whether holding ``names`` from another thread has to wait."""
    entered = threading.Event()

    def hold() -> None:
        with locks.hold(names):
            entered.set()

    worker = threading.Thread(target=hold, daemon=True)
    worker.start()
    return not entered.wait(0.2)


class TestKeyedLocks:
    def test_a_shared_name_makes_the_second_holder_wait(self):
        """Two holders of one location commit one after the other."""
        locks = KeyedLocks()
        with locks.hold(["s3://b/a.csv", "filemanager://P/a.csv"]):
            assert _blocked(locks, ["filemanager://P/a.csv"])
        assert not _blocked(locks, ["filemanager://P/a.csv"])

    def test_disjoint_names_do_not_wait_for_each_other(self):
        """Publishes to different locations commit side by side."""
        locks = KeyedLocks()
        with locks.hold(["s3://b/a.csv"]):
            assert not _blocked(locks, ["s3://b/b.csv"])

    def test_a_name_given_twice_is_held_once(self):
        """Repeating a location in one call does not deadlock on itself."""
        locks = KeyedLocks()
        with locks.hold(["s3://b/a.csv", "s3://b/a.csv"]):
            pass
        assert not _blocked(locks, ["s3://b/a.csv"])


class TestServerCap:
    def test_refuses_beyond_the_limit_whatever_the_key(self):
        """Past the limit the server is busy; a release lets the next one in."""
        cap = ServerCap(2)
        cap.acquire()
        cap.acquire()
        with pytest.raises(Busy) as refused:
            cap.acquire()
        assert refused.value.retry_after == 1.0
        cap.release()
        cap.acquire()

    def test_a_limit_of_zero_means_no_cap(self):
        """With limit 0 any number of requests may be held."""
        cap = ServerCap(0)
        for _ in range(100):
            cap.acquire()

    def test_a_request_past_the_cap_waits_for_a_place(self):
        """One that ends within the wait lets the next in; none, and it is refused."""
        import threading

        cap = ServerCap(1, wait=2.0)
        cap.acquire()
        threading.Timer(0.1, cap.release).start()
        cap.acquire()  # let in when the first ended
        quick = ServerCap(1, wait=0.05)
        quick.acquire()
        with pytest.raises(Busy):
            quick.acquire()

    def test_releasing_more_than_acquired_leaves_no_credit(self):
        """An extra release does not let two in where the limit is one."""
        cap = ServerCap(1)
        cap.release()
        cap.acquire()
        with pytest.raises(Busy):
            cap.acquire()


class TestConcurrencyCap:
    def test_refuses_beyond_the_limit_until_one_is_released(self):
        """A key at its limit is throttled; releasing one lets the next in."""
        cap = ConcurrencyCap(2, "uploads")
        cap.acquire("k1")
        cap.acquire("k1")
        with pytest.raises(Throttled, match="2 uploads in flight"):
            cap.acquire("k1")
        cap.release("k1")
        cap.acquire("k1")

    def test_keys_are_capped_apart(self):
        """One key's uploads do not count against another key."""
        cap = ConcurrencyCap(1)
        cap.acquire("k1")
        cap.acquire("k2")

    def test_a_limit_of_zero_means_no_cap(self):
        """With limit 0 any number of requests may be in flight."""
        cap = ConcurrencyCap(0)
        for _ in range(100):
            cap.acquire("k1")

    def test_releasing_more_than_acquired_does_no_harm(self):
        """An extra release does not leave credit for later acquires."""
        cap = ConcurrencyCap(1)
        cap.release("k1")
        cap.acquire("k1")
        with pytest.raises(Throttled):
            cap.acquire("k1")


class TestReaches:
    """A key reaches its own project, and those it has permissions or folders in."""

    @pytest.mark.parametrize(
        ("permissions", "grants", "expected"),
        [
            ((), (), False),
            ((Permission("q_1", "svc", "/"),), (), True),
            ((), (Grant("x", ("s3://b/x", "filemanager://q_1/x")),), True),
            ((), (Grant("x", ("filemanager://Q_1/x", "filemanager://q_1x/y")),), False),
        ],
        ids=["nothing", "permission", "grant", "look-alikes"],
    )
    def test_another_projects_key(self, permissions, grants, expected):
        """Only a permission in it or a location in its File Manager counts."""
        key = ApiKey("k1", "hash", "p2")
        credential = Credential(key, permissions, grants)
        assert reaches(credential, "q_1") is expected
        assert reaches(credential, "p2")
